"""apply_moka / trainable_parameters / moka_summary / merge_and_unload on tiny random LLaMA models
(full precision, NF4 and int8 through transformers' BitsAndBytesConfig, on CPU)."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

import moka_ext  # noqa: E402
from moka_ext import MoKAConfig, MoKALinear, apply_moka, merge_and_unload, moka_summary, trainable_parameters  # noqa: E402
from bnb_cpu import is_repacked, needs_avx512bf16, repack_for_cpu_inference  # noqa: E402
from tiny_llama import N_TARGETS, batch, tiny_llama  # noqa: E402


def _moka(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MoKALinear)}


def _randomize(model, scale=0.05, seed=0):
    """Give every adapter a non-zero dW (training would do this)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _moka(model).values():
            for n, p in m.named_parameters():
                if n.startswith("moka_"):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_nf4_model_wraps_every_projection_and_freezes_the_base():
    model = tiny_llama("nf4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    out = apply_moka(model, MoKAConfig(r=2))
    assert out is model
    layers = _moka(model)
    assert len(layers) == N_TARGETS
    assert all(m.base_kind == "linear4bit" for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".moka_" in n for n in trainable)
    counts = trainable_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == counts["base"] + counts["adapter"]
    assert 0 < counts["share"] < 0.1
    # dW = 0 at init: the patched model computes exactly what the base computed.
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_apply_moka_computes_the_base_through_the_non_repacked_4bit_path_on_every_layer():
    """The rule of apply_moka's docstring and the README: with repacking on (the default on
    AVX512-BF16 CPUs, forced here on any CPU), and an adapter on q_proj only, the model at init
    computes exactly what the base computes with repacking off, in eval no-grad forwards: no
    4-bit layer, wrapped or not, is left free to repack."""
    ids = batch(seed=2)["input_ids"]
    want = _logits(tiny_llama("nf4", cpu_repack=False), ids)
    model = apply_moka(tiny_llama("nf4", cpu_repack=True), MoKAConfig(r=2, target_modules=["q_proj"]))
    got = _logits(model, ids)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == N_TARGETS
    assert not any(m.support_avx512bf16_for_cpu or is_repacked(m) for m in four_bit)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_apply_moka_undoes_repacking_that_already_happened():
    """A model that was evaluated before apply_moka on an AVX512-BF16 CPU is already repacked
    (done here by bitsandbytes' own conversion, on any CPU): apply_moka restores every layer to
    the trainable layout. The repacked layout keeps each block's absmax in bf16, so the restored
    weights equal the originals up to that rounding (relative 2**-8), checked against
    bitsandbytes' dequantization of the never-repacked model."""
    def dense(model):
        return {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    want = dense(tiny_llama("nf4"))
    model = tiny_llama("nf4", cpu_repack=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        repack_for_cpu_inference(m)
    apply_moka(model, MoKAConfig(r=1, target_modules=["v_proj"]))
    assert not any(is_repacked(m) or m.support_avx512bf16_for_cpu for m in layers)
    got = {n.replace(".base_layer", ""): w for n, w in dense(model).items()}
    assert got.keys() == want.keys() and len(got) == N_TARGETS
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2.0**-8, atol=0, msg=n)


@needs_avx512bf16
def test_repacked_cpu_layout_changes_logits_by_bf16_rounding_only():
    """What apply_moka's rule changes on an AVX512-BF16 CPU: the base model evaluated through the
    repacked layout against the same model through the trainable path (README's stated size)."""
    ids = batch(seed=4)["input_ids"]
    plain = _logits(tiny_llama("nf4", cpu_repack=False), ids)
    packed_model = tiny_llama("nf4", cpu_repack=True)
    packed = _logits(packed_model, ids)
    assert all(is_repacked(m) for m in packed_model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert not torch.equal(packed, plain)
    torch.testing.assert_close(packed, plain, rtol=0, atol=0.05 * plain.abs().max().item())


def test_summary_lists_every_module_with_its_shapes():
    model = apply_moka(tiny_llama(), MoKAConfig(r=2, shapes={"q_proj": [(8, 8, 8, 8), (4, 8, 16, 8)]}))
    text = moka_summary(model)
    assert text.count("\n") == N_TARGETS  # one line per layer plus the total line
    assert "model.layers.0.self_attn.q_proj [default]: linear 64x64 moka r=2" in text
    assert "[8x8 (x) 8x8]  [4x8 (x) 16x8]" in text
    assert f"{N_TARGETS} MoKA layers" in text


def test_target_selection_exclude_layers_and_overrides():
    model = tiny_llama()
    cfg = MoKAConfig(r=2, target_modules=["q_proj", "down_proj"], exclude_modules=["model.layers.0.mlp.down_proj"],
                     layers_to_transform=[0, 1], overrides={r"\.mlp\.": {"r": 1, "variant": "mokas"}})
    apply_moka(model, cfg)
    names = set(_moka(model))
    assert names == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert model.model.layers[1].mlp.down_proj.variant["default"] == "mokas" and model.model.layers[1].mlp.down_proj.r["default"] == 1
    m2 = apply_moka(tiny_llama(), MoKAConfig(r=1, layers_to_transform=1))
    assert all(".layers.1." in n for n in _moka(m2)) and len(_moka(m2)) == 7
    with pytest.raises(ValueError, match="no module of the model matches"):
        apply_moka(tiny_llama(), MoKAConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="already has an adapter called 'default'"):
        apply_moka(model, MoKAConfig(r=1, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="target module 'model.embed_tokens'"):
        apply_moka(tiny_llama(), MoKAConfig(target_modules=["embed_tokens"]))


def _train(model, steps=8, lr=2e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = batch(seed=3, b=4, t=12)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_when_training_an_nf4_model():
    torch.manual_seed(0)
    model = apply_moka(tiny_llama("nf4"), MoKAConfig(r=2))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen {n} changed"


def test_generate_then_train_gradients_unchanged_on_nf4():
    """Gradients through wrapped 4-bit layers are identical before and after generate()
    (and an eval no-grad pass), with bnb's AVX512-BF16 CPU repacking enabled as on such CPUs."""
    model = tiny_llama("nf4", cpu_repack=True)
    apply_moka(model, MoKAConfig(r=2))
    _randomize(model)
    data = batch(seed=5)

    def grads():
        model.train()
        model.zero_grad()
        model(**data).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model.generate(data["input_ids"][:, :4], max_new_tokens=3, do_sample=False)
        model(data["input_ids"])
    after = grads()
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n], after[n]), n
    assert all(g.abs().sum() > 0 for g in before.values())


def test_merge_and_unload_float32_model_exact():
    model = apply_moka(tiny_llama(), MoKAConfig(r=2))
    _randomize(model)
    ids = batch(seed=1)["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    # Independent merged weight: base + the reference dW of each layer.
    expect = {n: (m.base_layer.weight + moka_ext.reference.delta_weight(*m.factors(), m.gates())).detach()
              for n, m in _moka(model).items()}
    merged = merge_and_unload(model)
    assert not _moka(merged)
    for n, W in expect.items():
        layer = merged.get_submodule(n)
        assert type(layer) is torch.nn.Linear
        torch.testing.assert_close(layer.weight, W, rtol=0, atol=0)
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merge_and_unload_nf4_requantizes_within_tolerance_or_full_precision():
    ids = batch(seed=2)["input_ids"]

    def patched():
        m = apply_moka(tiny_llama("nf4"), MoKAConfig(r=2))
        _randomize(m, scale=0.02)
        return m

    model = patched()
    with torch.no_grad():
        want = model(ids).logits
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = merge_and_unload(model)
    assert not _moka(merged)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        got = merged(ids).logits
    # NF4 rounding of the merged weights: compare with the rounding the base itself had.
    plain = tiny_llama()
    with torch.no_grad():
        quant_gap = (tiny_llama("nf4")(ids).logits - plain(ids).logits).abs().max()
    assert (got - want).abs().max() <= 2 * quant_gap

    fp = merge_and_unload(patched(), full_precision=True)
    assert type(fp.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(fp(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_int8_base_trains():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_moka(tiny_llama("int8"), MoKAConfig(r=2))
        assert all(m.base_kind == "linear8bit" for m in _moka(model).values())
        assert len(_moka(model)) == N_TARGETS
        losses = _train(model, steps=6)
    assert losses[-1] < losses[0] - 0.1, losses


def test_bf16_compute_nf4_model_and_autocast_train_with_float32_adapters():
    import tiny_llama as T
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        T._saved_dir(), device_map="cpu", dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    apply_moka(model, MoKAConfig(r=2))
    out = model(**batch())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.moka_B["default"][0].dtype == torch.float32 and q.moka_B["default"][0].grad.abs().sum() > 0

    fp = apply_moka(tiny_llama("nf4"), MoKAConfig(r=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp(**batch())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert fp.model.layers[1].mlp.down_proj.moka_B["default"][1].grad.abs().sum() > 0


def test_dequantize_4bit_layers_computes_what_the_nf4_model_computes():
    from moka_ext.finetune.models import dequantize_4bit_layers

    ids = batch(seed=7)["input_ids"]
    nf4 = tiny_llama("nf4")
    with torch.no_grad():
        want = nf4(ids).logits
    dense = tiny_llama("nf4")
    assert dequantize_4bit_layers(dense) == N_TARGETS
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    assert not any(p.requires_grad for n, p in dense.named_parameters() if "proj" in n)
    with torch.no_grad():
        got = dense(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # ...and not the unquantized model: the NF4 rounding is kept.
    with torch.no_grad():
        assert (tiny_llama()(ids).logits - got).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["moka", "lora", "dora"])
def test_adapter_trained_on_nf4_scores_the_same_merged_on_the_dequantized_base(tmp_path, method):
    """The quality benchmark's scoring path: an adapter saved from the NF4 model, loaded onto the
    dequantized base and merged, computes what the NF4 model with the adapter computes."""
    from moka_ext.finetune import baselines
    from moka_ext.finetune.models import dequantize_4bit_layers

    ids = batch(seed=8)["input_ids"]
    torch.manual_seed(0)
    trained = baselines.apply_method(tiny_llama("nf4"), method, r=2, quant="nf4")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training: every adapter weight non-zero
        for n, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        want = trained(ids).logits
    baselines.save_method_adapter(trained, method, tmp_path / "adapter")

    base = tiny_llama("nf4")
    dequantize_4bit_layers(base)
    model = baselines.load_method_adapter(base, tmp_path / "adapter")
    model = merge_and_unload(model) if method == "moka" else model.merge_and_unload()
    assert not _moka(model) and not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_gating_off_fixes_equal_mixture_weights_and_is_moka_only():
    from moka_ext.finetune import baselines

    model = baselines.apply_method(tiny_llama(), "moka", r=4, quant="none", gating=False)
    layers = _moka(model)
    assert layers and all(len(m.moka_gate_logits) == 0 for m in layers.values())
    first = next(iter(layers.values()))
    torch.testing.assert_close(first.gates(), torch.full((4,), first.scale["default"] / 4))
    with pytest.raises(baselines.MethodError, match="gating is a MoKA setting.*'lora'"):
        baselines.apply_method(tiny_llama(), "lora", r=4, quant="none", gating=False)
