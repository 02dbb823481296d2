"""Several named adapters on one model: each adapter's update, their sums, switching, deleting,
merging per adapter and mixed batches, against moka_ext.reference (dense delta_weight from the
raw parameters) and a per-row loop."""
from __future__ import annotations

import pytest
import torch

import moka_ext
from moka_ext import MoKAConfig, MoKALinear, apply_moka, reference
from moka_ext import layers as layers_mod
from tiny_llama import batch, tiny_llama

F64 = torch.float64


def ref_delta(m: MoKALinear, a: str) -> torch.Tensor:
    """The adapter's dW from its raw parameters (the layer's own factors()/gates() not used)."""
    B = [p.detach() for p in m.moka_B[a]]
    if m.variant[a] == "moka":
        A = [p.detach() for p in m.moka_A[a]]
    else:
        # MoKAs: B is (r, out/k, in/k) and A the k x k identity.
        A = [torch.eye(m.out_features // b.shape[1], dtype=b.dtype).expand(b.shape[0], -1, -1) for b in B]
    r = m.r[a]
    if m.gating[a] and r > 1:
        g = m.scale[a] * reference.gate_softmax(m.moka_gate_logits[a].detach(), m.temperature[a])
    elif m.gating[a]:
        g = torch.full((1,), m.scale[a], dtype=B[0].dtype)
    else:
        g = torch.full((r,), m.scale[a] / r, dtype=B[0].dtype)
    return reference.delta_weight(A, B, g)


def three_adapter_layer(seed=0):
    """One 48 -> 32 layer with adapters a (MoKA, gating), a2 (same structure as a), b (MoKAs,
    no gating) and c (r = 1, gating), all random, float64."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(48, 32, dtype=F64)
    shapes = [(4, 6, 8, 8), (4, 6, 8, 8), (8, 4, 4, 12)]
    m = MoKALinear(lin, r=3, shapes=shapes, init="random", temperature=0.7, scale=1.3, dtype=F64, adapter_name="a")
    m.update_layer("a2", r=3, shapes=shapes, init="random", dtype=F64)
    m.update_layer("b", r=2, shapes=[(4, 4, 8, 12), (2, 2, 16, 24)], variant="mokas", gating=False, init="random",
                   dtype=F64)
    m.update_layer("c", r=1, init="random", dtype=F64)
    with torch.no_grad():
        for a in ("a", "a2"):
            m.moka_gate_logits[a].normal_()
    return lin, m


def test_r1_with_gating_creates_no_gate_logit():
    _, m = three_adapter_layer()
    assert "c" not in m.moka_gate_logits and m.gating["c"]
    assert not any(n.startswith("moka_gate_logits.c") for n, _ in m.named_parameters())
    m.set_adapter("c")
    torch.testing.assert_close(m.gates("c"), torch.full((1,), 1.0, dtype=F64))


@pytest.mark.parametrize("active", [["a"], ["b"], ["c"], ["a", "b"], ["b", "c", "a"]])
def test_active_adapters_add_their_updates(active, monkeypatch):
    lin, m = three_adapter_layer()
    m.set_adapter(active)
    assert m.active_adapters == active
    calls = []
    real = layers_mod.kron_mix_add
    monkeypatch.setattr(layers_mod, "kron_mix_add", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 5, 48, dtype=F64, requires_grad=True)
    y = m(x)
    assert len(calls) == 1, "several active adapters are one kron_mix call"
    W = lin.weight.detach() + sum(ref_delta(m, a) for a in active)
    torch.testing.assert_close(y, x @ W.T + lin.bias, rtol=1e-10, atol=1e-10)
    # Gradients reach exactly the active adapters' parameters.
    y.square().sum().backward()
    for a in ("a", "a2", "b", "c"):
        for p in m._adapter_params(a):
            assert p.requires_grad == (a in active)
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (a in active)


def test_gradients_of_a_sum_match_the_dense_reference():
    lin, m = three_adapter_layer(seed=1)
    m.set_adapter(["a", "b"])
    params = m._adapter_params("a") + m._adapter_params("b")
    x = torch.randn(3, 48, dtype=F64, requires_grad=True)
    gy = torch.randn(3, 32, dtype=F64)
    got = torch.autograd.grad(m(x), [x, *params], gy)
    # The same leaves through the reference math, built independently.
    leaves = [p.detach().clone().requires_grad_() for p in params]
    Aa, Ba, logits, Bb = leaves[0:2], leaves[2:4], leaves[4], leaves[5:7]
    ga = m.scale["a"] * reference.gate_softmax(logits, m.temperature["a"])
    eyes = [torch.eye(4, dtype=F64).expand(1, 4, 4), torch.eye(2, dtype=F64).expand(1, 2, 2)]
    dW = reference.delta_weight(Aa, Ba, ga) + reference.delta_weight(eyes, Bb, torch.full((2,), 0.5, dtype=F64))
    xr = x.detach().clone().requires_grad_()
    want = torch.autograd.grad(xr @ (lin.weight.detach() + dW).T + lin.bias, [xr, *leaves], gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_merge_and_unmerge_per_adapter():
    lin, m = three_adapter_layer(seed=2)
    W0 = lin.weight.detach().clone()
    x = torch.randn(4, 48, dtype=F64)
    with pytest.raises(ValueError, match="no adapter called 'nope'"):
        m.merge(adapter_names=["nope"])
    assert not m.merged and torch.equal(lin.weight, W0)
    m.merge(adapter_names=["a"])
    torch.testing.assert_close(lin.weight.detach(), W0 + ref_delta(m, "a"), rtol=1e-12, atol=1e-12)
    m.merge(adapter_names=["b", "c"])
    assert m.merged_adapters == ["a", "b", "c"]
    torch.testing.assert_close(lin.weight.detach(), W0 + ref_delta(m, "a") + ref_delta(m, "b") + ref_delta(m, "c"),
                               rtol=1e-12, atol=1e-12)
    with pytest.warns(UserWarning, match="already merged"):
        m.merge(adapter_names=["a"])
    m.unmerge(adapter_names=["a", "c"])
    assert m.merged_adapters == ["b"]
    torch.testing.assert_close(lin.weight.detach(), W0 + ref_delta(m, "b"), rtol=1e-12, atol=1e-12)
    m.set_adapter("b")
    torch.testing.assert_close(m(x), x @ lin.weight.detach().T + lin.bias)  # merged: the base alone
    m.unmerge()
    assert torch.equal(lin.weight, W0)
    with pytest.raises(ValueError, match="is merged"):
        m.merge(adapter_names=["b"])
        m.delete_adapter("b")


def test_safe_merge_refuses_non_finite_and_keeps_the_previous_merge():
    lin, m = three_adapter_layer(seed=5)
    W0 = lin.weight.detach().clone()
    m.merge(adapter_names=["b"])
    with torch.no_grad():
        m.moka_B["a"][0][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m.merge(safe_merge=True, adapter_names=["a"])
    assert m.merged_adapters == ["b"]
    torch.testing.assert_close(lin.weight.detach(), W0 + ref_delta(m, "b"), rtol=1e-12, atol=1e-12)


def test_delete_and_disable():
    lin, m = three_adapter_layer(seed=3)
    m.set_adapter(["a", "b"])
    m.delete_adapter("a")
    assert "a" not in m.moka_A and "a" not in m.moka_gate_logits and "a" not in m.r
    assert m.active_adapters == ["b"]
    assert not any(".a." in f".{n}." for n, _ in m.named_parameters())
    x = torch.randn(3, 48, dtype=F64)
    torch.testing.assert_close(m(x), x @ (lin.weight.detach() + ref_delta(m, "b")).T + lin.bias)
    m.enable_adapters(False)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in m.parameters())
    m.enable_adapters(True)
    assert all(p.requires_grad for p in m._adapter_params("b"))
    m.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in m.parameters())


def row_loop(m: MoKALinear, x: torch.Tensor, names):
    """The reference for mixed batches: every row alone, with its adapter active."""
    out = []
    for i, a in enumerate(names):
        if a == "__base__":
            out.append(m.base_layer(x[i : i + 1]))
        else:
            m.set_adapter(a)
            out.append(m(x[i : i + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("names, indexed", [
    (["a", "__base__", "a2", "a", "a2", "__base__"], True),   # one structure: kron_mix_indexed
    (["b", "a", "__base__", "c", "a2", "b"], False),         # several structures: grouped per adapter
    (["__base__", "__base__"], None),
])
def test_mixed_batch_matches_a_per_row_loop(names, indexed, monkeypatch):
    lin, m = three_adapter_layer(seed=4)
    calls = []
    real = layers_mod.kron_mix_indexed
    monkeypatch.setattr(layers_mod, "kron_mix_indexed", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(len(names), 5, 48, dtype=F64, requires_grad=True)
    params = [p for a in ("a", "a2", "b", "c") for p in m._adapter_params(a)]
    for p in params:
        p.requires_grad_(True)
    y = m(x, adapter_names=names)
    assert len(calls) == (1 if indexed else 0)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], gy, allow_unused=True)
    want_y = row_loop(m, x, names)
    for p in params:
        p.requires_grad_(True)
    want = torch.autograd.grad(want_y, [x, *params], gy, allow_unused=True)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_mixed_batch_bad_names():
    _, m = three_adapter_layer()
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but got 2 names"):
        m(torch.randn(3, 48, dtype=F64), adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="adapter_names must be a list of str"):
        m(torch.randn(3, 48, dtype=F64), adapter_names="a")


# ------------------------------------------------------------------ a model


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".moka_" in f".{n}":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def two_adapter_model():
    model = apply_moka(tiny_llama(), MoKAConfig(r=2))
    apply_moka(model, MoKAConfig(r=1, target_modules=["q_proj", "v_proj", "down_proj"], variant="mokas"),
               adapter_name="b")
    _randomize(model, 0)
    return model


def dense_reference(model, names):
    """A plain tiny LLaMA whose adapted weights are W + sum over names of the reference dW."""
    ref = tiny_llama()
    with torch.no_grad():
        for n, m in moka_ext.model.moka_layers(model).items():
            W = m.base_layer.weight.detach().clone()
            for a in names:
                if a in m.r:
                    W += ref_delta(m, a)
            ref.get_submodule(n).weight.copy_(W)
    return ref


def test_model_level_switch_combine_delete_merge():
    model = two_adapter_model()
    ids = batch()["input_ids"]
    assert model.moka_active_adapters == ["default"]
    for active in (["default"], ["b"], ["default", "b"]):
        moka_ext.set_adapter(model, active)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, dense_reference(model, active)(ids).logits,
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no adapter called \\['x'\\]"):
        moka_ext.set_adapter(model, ["x"])
    with pytest.raises(ValueError, match="no adapter called \\['x'\\]"):
        moka_ext.merge_and_unload(model, adapter_names=["x"])
    want = dense_reference(model, ["b"])(ids).logits
    merged = moka_ext.merge_and_unload(two_adapter_model(), adapter_names=["b"])
    assert not moka_ext.model.moka_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
    moka_ext.delete_adapter(model, "default")
    assert model.moka_active_adapters == ["b"] and list(model.moka_configs) == ["b"]
    layers = moka_ext.model.moka_layers(model)
    assert len(layers) == 6  # q, v, down in 2 layers; the others went back to their base
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_model_level_mixed_batch_matches_a_per_row_loop():
    model = two_adapter_model()
    ids = batch(b=4)["input_ids"]
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad(), moka_ext.mixed_batch(model, names):
        got = model(ids).logits
    rows = []
    with torch.no_grad():
        for i, a in enumerate(names):
            if a == "__base__":
                rows.append(tiny_llama()(ids[i : i + 1]).logits)
            else:
                moka_ext.set_adapter(model, a)
                rows.append(model(ids[i : i + 1]).logits)
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no adapter called \\['nope'\\]"):
        with moka_ext.mixed_batch(model, ["nope"] * 4):
            pass
