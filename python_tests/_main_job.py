"""Shared set-up of the main-job tests (CLI, data, evaluation, DDP): a private cache directory,
an environment for ``python -m moka_ext`` subprocesses, and small runs on the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Small, quick settings for the tiny model: byte-level tokens, so short sequences.
TINY_RUN = ["--model", "tiny", "--quant", "none", "--batch-size", "2", "--seq-len", "64",
            "--eval-limit", "6", "--lr", "1e-2"]


def use_private_cache(tmp_path_factory, monkeypatch) -> Path:
    """Point MOKA_CACHE_DIR at a fresh directory (the tiny model and data get built there)."""
    cache = tmp_path_factory.mktemp("moka_cache")
    monkeypatch.setenv("MOKA_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def run_moka(*args, timeout=240, **popen_kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moka_ext", *args], env=subprocess_env(), text=True,
                          capture_output=True, timeout=timeout, cwd=REPO, **popen_kw)


def metrics(out_dir) -> dict:
    return json.loads((Path(out_dir) / "metrics.json").read_text())
