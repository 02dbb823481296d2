"""Two-process data-parallel fine-tuning on CPU (torchrun, gloo) on the tiny model."""
import subprocess
import sys

import pytest

from _main_job import REPO, TINY_RUN, metrics, subprocess_env, use_private_cache


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield use_private_cache(tmp_path_factory, mp)


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "moka_ext", "finetune", *TINY_RUN, "--max-steps", "3", "--output-dir", str(out)]
    r = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = metrics(out)
    assert m["world_size"] == 2 and m["config"]["world_size"] == 2
    assert len(m["loss"]["per_step"]) == 3
    # The 6 evaluation questions were split between the ranks and summed back.
    assert m["accuracy"]["before"]["n"] == 6 and m["accuracy"]["after"]["n"] == 6
    # Rank 0 alone reports and writes: one summary line, one adapter.
    assert r.stdout.count("accuracy after") == 1
    assert (out / "adapter" / "adapter_config.json").exists()
    assert "2 process(es)" in r.stdout
