"""``moka merge``: the merged model directory loads in plain transformers (no moka_ext) and
computes what the adapted model computes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

import moka_ext  # noqa: E402
from moka_ext import MoKAConfig, apply_moka, save_adapter  # noqa: E402
from moka_ext.finetune.cli import main  # noqa: E402
from tiny_llama import _saved_dir, batch, tiny_llama  # noqa: E402


@pytest.fixture
def base_dir(tmp_path):
    """The tiny LLaMA as a model directory with a tokenizer, as `moka merge --model DIR` takes it."""
    from moka_ext.finetune.models import _tiny_tokenizer

    d = tmp_path / "base"
    shutil.copytree(_saved_dir(), d)
    _tiny_tokenizer().save_pretrained(d)
    return d


def _trained_adapter(quant, directory):
    model = apply_moka(tiny_llama(quant), MoKAConfig(r=2, overrides={"down_proj": {"variant": "mokas"}}, init="random"))
    save_adapter(model, directory)
    return model


def _logits_without_moka_ext(model_dir, ids):
    """Load the directory in a fresh interpreter where moka_ext cannot be imported."""
    code = (
        "import sys, torch; sys.modules['moka_ext'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        f"torch.save(out, {str(model_dir / 'logits.pt')!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(model_dir / "logits.pt")


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_merged_model_loads_in_plain_transformers_with_the_adapted_logits(tmp_path, base_dir, quant):
    _trained_adapter(None if quant == "none" else quant, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base_dir), "--quant", quant, "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "moka" not in json.dumps(config).lower()
    assert (out / "tokenizer.json").exists()
    # The adapted model, as the adapter was trained: base as loaded for training + the adapter.
    from moka_ext.finetune.models import load_model

    adapted, _ = load_model(str(base_dir), quant)
    moka_ext.load_adapter(adapted, tmp_path / "adapter")
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = adapted(ids).logits
        base = load_model(str(base_dir), quant)[0](ids).logits
    got = _logits_without_moka_ext(out, ids)
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_requantized_merge_warns_and_loads(tmp_path, base_dir):
    _trained_adapter("nf4", tmp_path / "adapter")
    out = tmp_path / "merged"
    with pytest.warns(UserWarning, match="re-quantized"):
        assert main(["merge", "--model", str(base_dir), "--quant", "nf4", "--adapter", str(tmp_path / "adapter"),
                     "--out", str(out), "--requantize"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    logits = _logits_without_moka_ext(out, batch()["input_ids"])
    assert torch.isfinite(logits).all()


def test_merge_refuses_a_non_empty_output_and_a_missing_adapter(tmp_path, base_dir, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert main(["merge", "--model", str(base_dir), "--quant", "none", "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
