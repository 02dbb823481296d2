"""save_adapter / load_adapter: exact round trips, atomic writes, and rejection of bad files
without touching the model."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("transformers")

import moka_ext.adapter_io as adapter_io  # noqa: E402
from moka_ext import MoKAConfig, MoKALinear, apply_moka, load_adapter, save_adapter  # noqa: E402
from moka_ext.adapter_io import AdapterFileError  # noqa: E402
from tiny_llama import N_TARGETS, batch, tiny_llama  # noqa: E402

CFG = dict(r=2, overrides={r"\.mlp\.": {"variant": "mokas", "r": 3}})


def _adapter_state(model):
    return {f"{n}.{k}": p.detach().clone() for n, m in model.named_modules() if isinstance(m, MoKALinear)
            for k, p in m.named_parameters() if k.startswith("moka_")}


def _trained(seed=0, quant=None, cfg=CFG):
    model = apply_moka(tiny_llama(quant), MoKAConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_round_trip_is_exact_into_a_fresh_model_and_a_patched_one(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    state = _adapter_state(model)
    assert len({k.rsplit(".moka_", 1)[0] for k in state}) == N_TARGETS

    fresh = load_adapter(tiny_llama(), tmp_path / "a")  # creates the layers from the stored config
    patched = load_adapter(apply_moka(tiny_llama(), MoKAConfig(**CFG)), tmp_path / "a")
    for m in (fresh, patched):
        got = _adapter_state(m)
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)
        with torch.no_grad():
            torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=0)
    # The config is PEFT's JSON; the layout is in the weights file's metadata; keys are PEFT's.
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "MOKA (import moka_ext first)" and meta["r"] == 2
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["moka_config"])
        keys = set(f.keys())
    assert header["moka_modules"]["model.layers.0.mlp.up_proj"]["variant"] == "mokas"
    assert "base_model.model.model.layers.0.self_attn.q_proj.moka_A.0" in keys
    assert "base_model.model.model.layers.0.mlp.up_proj.moka_gate_logits" in keys


def test_nf4_trained_adapter_loads_onto_the_nf4_model(tmp_path):
    model = _trained(quant="nf4")
    save_adapter(model, tmp_path)
    other = load_adapter(tiny_llama("nf4"), tmp_path)
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


def _expect_rejected(directory, match):
    target = apply_moka(tiny_llama(), MoKAConfig(**CFG))
    before = _adapter_state(target)
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(target, directory)
    after = _adapter_state(target)
    assert all(torch.equal(before[k], after[k]) for k in before), "a rejected load changed the model"
    fresh = tiny_llama()
    names_before = [n for n, _ in fresh.named_modules()]
    with pytest.raises(AdapterFileError):
        load_adapter(fresh, directory)
    assert [n for n, _ in fresh.named_modules()] == names_before, "a rejected load patched the model"


def test_truncated_and_corrupt_files_are_rejected(tmp_path):
    save_adapter(_trained(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_rejected(tmp_path, "truncated or corrupt")
    path.write_bytes(b"\x00" * 64)
    _expect_rejected(tmp_path, "truncated or corrupt")
    path.write_bytes(b"\x80\x04\x95garbage pickle")  # never unpickled
    _expect_rejected(tmp_path, "truncated or corrupt")
    os.remove(path)
    _expect_rejected(tmp_path, "has no adapter_model.safetensors")


def _rewrite(src, dst, edit_tensors=None, edit_header=None):
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["moka_config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"moka_config": json.dumps(header)})


def test_mismatched_adapters_are_rejected_with_clear_messages(tmp_path):
    src = tmp_path / "ok"
    save_adapter(_trained(), src)
    key = "base_model.model.model.layers.0.self_attn.q_proj.moka_B.0"

    _rewrite(src, tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
    _expect_rejected(tmp_path / "missing", r"missing \['model.layers.0.self_attn.q_proj.moka_B.0'\]")

    _rewrite(src, tmp_path / "extra",
             edit_tensors=lambda t: t.update({"base_model.model.lm_head.moka_B.0": torch.zeros(1)}))
    _expect_rejected(tmp_path / "extra", r"unexpected \['lm_head.moka_B.0'\]")

    _rewrite(src, tmp_path / "prefix", edit_tensors=lambda t: t.update({"lm_head.moka_B.0": torch.zeros(1)}))
    _expect_rejected(tmp_path / "prefix", r"must start with 'base_model.model.'")

    def bad_shape(t):
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1, t[key].shape[2])
    short = key.removeprefix("base_model.model.")
    _rewrite(src, tmp_path / "shape", edit_tensors=bad_shape)
    _expect_rejected(tmp_path / "shape", rf"{short}: expected shape .* got")

    _rewrite(src, tmp_path / "dtype", edit_tensors=lambda t: t.update({key: t[key].to(torch.float16)}))
    _expect_rejected(tmp_path / "dtype", rf"{short}: expected dtype torch.float32, got torch.float16")

    _rewrite(src, tmp_path / "nan", edit_tensors=lambda t: t[key].view(-1)[0].fill_(float("nan")))
    _expect_rejected(tmp_path / "nan", "non-finite")

    _rewrite(src, tmp_path / "cfg", edit_header=lambda h: h.update(r=3))
    _expect_rejected(tmp_path / "cfg", "differs from the model's|shapes is")

    _rewrite(src, tmp_path / "fmt", edit_header=lambda h: h.update(format="lora"))
    _expect_rejected(tmp_path / "fmt", "expected format 'moka_ext.adapter'")

    # An adapter for a model with a different layout (other dims) does not fit.
    other = torch.nn.Sequential()
    other.add_module("q_proj", torch.nn.Linear(32, 32))
    with pytest.raises(AdapterFileError, match="does not fit this model|other modules"):
        load_adapter(other, src)


def test_interrupted_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    old = _trained(seed=1)
    save_adapter(old, tmp_path)
    old_state = _adapter_state(old)
    new = _trained(seed=2, cfg={"r": 1})  # another config, so a stale adapter_config.json shows

    real_replace = os.replace

    def crash_on_weights(src, dst):
        if str(dst).endswith("adapter_model.safetensors"):
            raise KeyboardInterrupt("simulated crash before the weights are replaced")
        return real_replace(src, dst)

    monkeypatch.setattr(adapter_io.os, "replace", crash_on_weights)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, tmp_path)
    monkeypatch.setattr(adapter_io.os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"], "temp files left"

    # A crash mid-way through writing the temp file leaves the old one too.
    def crash_while_writing(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr("safetensors.torch.save_file", crash_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, tmp_path)
    monkeypatch.undo()

    with pytest.warns(UserWarning, match="does not match the config stored"):
        loaded = load_adapter(tiny_llama(), tmp_path)
    got = _adapter_state(loaded)
    assert all(torch.equal(got[k], old_state[k]) for k in old_state)

    save_adapter(new, tmp_path)  # a completed save replaces it
    got = _adapter_state(load_adapter(tiny_llama(), tmp_path))
    assert all(torch.equal(got[k], v) for k, v in _adapter_state(new).items())


def _save_format_v1(model, directory):
    """What moka_ext wrote before PEFT's layout (format version 1), rebuilt from a model:
    keys ``<module>.moka_A.<j>`` without the adapter name or PEFT's prefix, one gate logit
    even for r = 1, and the header (config + layout) as both the metadata and the JSON file."""
    from moka_ext.adapter_io import _layout_entry

    cfg = model.moka_configs["default"]
    tensors, layout = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, MoKALinear):
            continue
        if "default" in m.moka_A:
            tensors.update({f"{name}.moka_A.{j}": p.detach().clone() for j, p in enumerate(m.moka_A["default"])})
        tensors.update({f"{name}.moka_B.{j}": p.detach().clone() for j, p in enumerate(m.moka_B["default"])})
        if m.gating["default"]:
            logits = m.moka_gate_logits["default"] if "default" in m.moka_gate_logits else torch.zeros(1)
            tensors[f"{name}.moka_gate_logits"] = logits.detach().clone()
        layout[name] = _layout_entry(m, "default")
    header = {"format": "moka_ext.adapter", "format_version": 1, "moka_ext_version": "0.1.0", "peft_type": "MOKA",
              **cfg.moka_dict(), "moka_modules": layout}
    text = json.dumps(header, indent=2, sort_keys=True)
    os.makedirs(directory, exist_ok=True)
    (directory / "adapter_config.json").write_text(text + "\n")
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"moka_config": text})


@pytest.mark.parametrize("cfg", [CFG, {"r": 1}])
def test_files_in_the_old_format_still_load(tmp_path, cfg):
    model = _trained(cfg=cfg)
    _save_format_v1(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.moka_B.0" in set(f.keys())
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    for target in (tiny_llama(), apply_moka(tiny_llama(), MoKAConfig(**cfg))):
        loaded = load_adapter(target, tmp_path)
        got = _adapter_state(loaded)
        assert got.keys() == _adapter_state(model).keys()
        assert all(torch.equal(got[k], v) for k, v in _adapter_state(model).items())
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    # Saved again, it is in PEFT's layout.
    save_adapter(loaded, tmp_path / "new")
    with safe_open(str(tmp_path / "new" / "adapter_model.safetensors"), "pt") as f:
        assert all(k.startswith("base_model.model.") for k in f.keys())


def test_several_named_adapters_save_and_load_by_name(tmp_path):
    model = _trained(seed=0)
    apply_moka(model, MoKAConfig(r=1, target_modules=["q_proj"], init="random"), adapter_name="other")
    with pytest.raises(ValueError, match="say which"):
        save_adapter(model, tmp_path / "x")
    save_adapter(model, tmp_path / "default", adapter_name="default")
    save_adapter(model, tmp_path / "other", adapter_name="other")
    with pytest.raises(ValueError, match="no adapter called 'nope'"):
        save_adapter(model, tmp_path / "nope", adapter_name="nope")
    fresh = load_adapter(tiny_llama(), tmp_path / "default")
    load_adapter(fresh, tmp_path / "other", adapter_name="other")
    assert _adapter_state(fresh).keys() == _adapter_state(model).keys()
    assert all(torch.equal(_adapter_state(fresh)[k], v) for k, v in _adapter_state(model).items())
    # A loaded second adapter is inactive, as in PEFT; the outputs agree under every choice.
    ids = batch()["input_ids"]
    for active in (["default"], ["other"], ["default", "other"]):
        moka_ext_set_adapter(model, active)
        moka_ext_set_adapter(fresh, active)
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Loading into an existing adapter of another config is refused, naming the adapter.
    with pytest.raises(AdapterFileError, match="adapter 'other'"):
        load_adapter(fresh, tmp_path / "default", adapter_name="other")


def moka_ext_set_adapter(model, names):
    import moka_ext

    moka_ext.set_adapter(model, names)
