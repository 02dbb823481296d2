"""MoKA as a PEFT method (against the installed peft) and training with transformers.Trainer."""
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import moka_ext  # noqa: E402
from moka_ext import MoKAConfig, MoKALinear, apply_moka, load_adapter, save_adapter, trainable_parameters  # noqa: E402
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


# ---------------------------------------------------------------- named adapters in PEFT


def _two_adapter_peft():
    model = get_peft_model(tiny_llama(), MoKAConfig(r=2, init="random"))
    model.add_adapter("b", MoKAConfig(r=1, target_modules=["q_proj", "down_proj"], variant="mokas", init="random"))
    _randomize(model)
    return model


def _dense_reference(model, names):
    """A plain tiny LLaMA with W + sum over names of each layer's dW from the reference."""
    from test_named_adapters import ref_delta

    ref = tiny_llama()
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, MoKALinear):
                W = m.base_layer.weight.detach().clone()
                for a in names:
                    if a in m.r:
                        W += ref_delta(m, a)
                ref.get_submodule(n.removeprefix("base_model.model.")).weight.copy_(W)
    return ref


def test_peft_several_adapters_switch_combine_merge_delete():
    model = _two_adapter_peft()
    assert model.active_adapters == ["default"]
    assert "base_model.model.model.layers.0.self_attn.q_proj.moka_A.b.0" not in dict(model.named_parameters())
    assert "base_model.model.model.layers.0.self_attn.q_proj.moka_B.b.0" in dict(model.named_parameters())
    ids = batch()["input_ids"]
    for active in (["default"], ["b"], ["default", "b"]):
        model.base_model.set_adapter(active)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, _dense_reference(model, active)(ids).logits,
                                       rtol=1e-5, atol=1e-5)
        trainable = {n.split(".moka_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(active)
    with pytest.raises(ValueError, match=r"no adapter called \['nope'\]"):
        model.merge_and_unload(adapter_names=["nope"])
    with pytest.raises(ValueError, match=r"no adapter called \['nope'\]"):
        model.base_model.merge_adapter(["nope"])
    want = _dense_reference(model, ["b"])(ids).logits
    model.base_model.merge_adapter(["b"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['b'\] while they are merged"):
        model.delete_adapter("b")
    model.base_model.unmerge_adapter()
    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"] and model.active_adapters == ["b"]
    assert not any(".default" in n for n, _ in model.named_parameters())
    merged = model.merge_and_unload()
    assert not any(isinstance(m, MoKALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_mixed_batch_matches_a_per_row_loop():
    model = _two_adapter_peft().eval()
    ids = batch(b=5)["input_ids"]
    names = ["b", "__base__", "default", "b", "default"]
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=names).logits
        rows = []
        for i, a in enumerate(names):
            if a == "__base__":
                with model.disable_adapter():
                    rows.append(model(input_ids=ids[i : i + 1]).logits)
            else:
                model.set_adapter(a)
                rows.append(model(input_ids=ids[i : i + 1]).logits)
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"no adapter called \['c'\]"):
        model(input_ids=ids, adapter_names=["c"] * 5)


def test_save_pretrained_and_save_adapter_write_the_same_format(tmp_path):
    model = _two_adapter_peft()
    ids = batch()["input_ids"]
    model.save_pretrained(tmp_path / "peft")  # default at the top, b in a subdirectory
    for a in ("default", "b"):
        save_adapter(model, tmp_path / f"moka_{a}", adapter_name=a)
    from safetensors import safe_open

    for a, sub in (("default", ""), ("b", "b")):
        with safe_open(str(tmp_path / "peft" / sub / "adapter_model.safetensors"), "pt") as f, \
                safe_open(str(tmp_path / f"moka_{a}" / "adapter_model.safetensors"), "pt") as g:
            assert set(f.keys()) == set(g.keys())
            assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    model.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        want = model(ids).logits
    # PEFT reads moka_ext's files ...
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "moka_default")
    loaded.load_adapter(tmp_path / "moka_b", adapter_name="b")
    loaded.base_model.set_adapter(["default", "b"])
    # ... and moka_ext reads PEFT's.
    plain = load_adapter(tiny_llama(), tmp_path / "peft")
    load_adapter(plain, tmp_path / "peft" / "b", adapter_name="b")
    moka_ext.set_adapter(plain, ["default", "b"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(plain(ids).logits, want, rtol=0, atol=0)


def test_loading_with_only_peft_says_import_moka_ext_first(tmp_path):
    import subprocess
    import sys

    save_adapter(apply_moka(tiny_llama(), MoKAConfig(r=1)), tmp_path)
    code = ("import sys, peft; from peft import PeftConfig; assert 'moka_ext' not in sys.modules\n"
            f"PeftConfig.from_pretrained({str(tmp_path)!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode != 0
    assert "KeyError: 'MOKA (import moka_ext first)'" in out.stderr


def test_low_cpu_mem_usage_loads_onto_an_8bit_base(tmp_path):
    model = get_peft_model(tiny_llama("int8"), MoKAConfig(r=2, init="random"))
    model.save_pretrained(tmp_path)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
        got = PeftModel.from_pretrained(tiny_llama("int8"), tmp_path, low_cpu_mem_usage=True)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("autocast, want", [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype(autocast, want):
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, MoKAConfig(r=2), autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for n, p in model.named_parameters() if ".moka_" in n}
    assert dtypes == {want}
    assert model(batch()["input_ids"]).logits.dtype == torch.bfloat16


def test_peft_generate_with_one_adapter_per_row_matches_a_per_row_loop():
    model = _two_adapter_peft().eval()
    ids = batch(b=3)["input_ids"]
    names = ["b", "__base__", "default"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
        rows = []
        for i, a in enumerate(names):
            one = dict(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kw)
            if a == "__base__":
                with model.disable_adapter():
                    rows.append(model.generate(**one))
            else:
                model.set_adapter(a)
                rows.append(model.generate(**one))
        with model.disable_adapter():
            base0 = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), **kw)
    assert torch.equal(got, torch.cat(rows))
    assert not torch.equal(base0, rows[0])  # the adapter changes what is generated
