"""MoKA as a PEFT method (against the installed peft) and training with transformers.Trainer."""
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from moka_ext import MoKAConfig, MoKALinear, apply_moka, load_adapter, trainable_parameters  # noqa: E402
from moka_ext.adapter_io import SaveAdapterCallback  # noqa: E402
from tiny_llama import N_TARGETS, batch, tiny_llama  # noqa: E402
from peft import PeftModel, PeftType, get_peft_model  # noqa: E402


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_peft_type_is_extended_without_disturbing_the_enum():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from moka_ext.peft_method import MoKAModel, register

    assert PeftType.MOKA is PeftType("MOKA (import moka_ext first)") is PeftType["MOKA"] is PeftType("MOKA")
    assert PeftType.MOKA == "MOKA (import moka_ext first)" and PeftType.MOKA in list(PeftType)
    assert PeftType.LORA is PeftType("LORA") and len(set(PeftType)) == len(list(PeftType))
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOKA] is MoKAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MOKA] is MoKAModel
    assert register() is PeftType.MOKA  # idempotent
    assert MoKAConfig().peft_type is PeftType.MOKA
    # Other methods keep working in the same process.
    lora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    assert lora(torch.randn(2, 8)).shape == (2, 8)


def test_registration_happens_on_import_in_a_fresh_interpreter():
    import subprocess
    import sys

    # moka_ext first, peft later: the registration must follow peft's import.
    code = ("import moka_ext, peft; from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as M; "
            "print(M[peft.PeftType('MOKA')].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "MoKAModel"


def test_get_peft_model_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = get_peft_model(tiny_llama("nf4"), MoKAConfig(r=2, overrides={"down_proj": {"variant": "mokas"}}))
    layers = [m for m in model.modules() if isinstance(m, MoKALinear)]
    assert len(layers) == N_TARGETS and all(m.base_kind == "linear4bit" for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".moka_" in n for n in trainable)
    assert trainable_parameters(model)["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    _randomize(model)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        base_ref = tiny_llama("nf4")(ids).logits
    torch.testing.assert_close(base, base_ref, rtol=0, atol=0)
    assert (want - base).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama("nf4"), tmp_path)
    assert isinstance(loaded.peft_config["default"], MoKAConfig)
    assert loaded.peft_config["default"].overrides == {"down_proj": {"variant": "mokas"}}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable_again = PeftModel.from_pretrained(tiny_llama("nf4"), tmp_path, is_trainable=True)
    assert {n for n, p in trainable_again.named_parameters() if p.requires_grad} == trainable


def test_peft_rejects_a_bad_shape_naming_the_module():
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.k_proj'.*does not factor a 32 x 64 layer"):
        get_peft_model(tiny_llama(), MoKAConfig(r=1, shapes={"k_proj": [(8, 8, 8, 8)]}))


def test_peft_merge_and_unload_full_precision():
    model = get_peft_model(tiny_llama(), MoKAConfig(r=2))
    _randomize(model)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, MoKALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)


def _dataset(n=8, same=False):
    return [{k: v[0] for k, v in batch(seed=0 if same else i, b=1, t=8).items()} for i in range(n)]


def _args(out):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=2e-2,
        report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, save_strategy="steps",
    )


def test_trainer_trains_a_peft_nf4_model_and_checkpoints_the_adapter(tmp_path):
    model = get_peft_model(tiny_llama("nf4"), MoKAConfig(r=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    result = trainer.train()
    assert result.global_step == 4
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    for step in (2, 4):
        files = set(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert "model.safetensors" not in files  # the adapter only, not the base
    ids = batch()["input_ids"]
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        got = PeftModel.from_pretrained(tiny_llama("nf4"), tmp_path / "checkpoint-4")(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_trainer_trains_an_apply_moka_model_and_saves_the_adapter_at_checkpoints(tmp_path):
    model = apply_moka(tiny_llama(), MoKAConfig(r=2))
    data = batch(seed=0, b=1, t=8)
    with torch.no_grad():
        loss_before = model(**data).loss.item()
    # One repeated example, so the Trainer's steps must lower its loss.
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(same=True),
                                   callbacks=[SaveAdapterCallback()])
    trainer.train()
    assert trainer.state.global_step == 4
    ids = batch()["input_ids"]
    model.eval()
    with torch.no_grad():
        assert model(**data).loss.item() < loss_before - 0.05
        want = model(ids).logits
    for step in (2, 4):
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(
            os.listdir(tmp_path / f"checkpoint-{step}" / "moka_adapter"))
    with torch.no_grad():
        got = load_adapter(tiny_llama(), tmp_path / "checkpoint-4" / "moka_adapter")(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
