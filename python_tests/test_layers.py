"""MoKALinear against independent references: moka_ext.reference, bitsandbytes' own
dequantization, and PEFT's LoKr layer."""

import pytest
import torch

from moka_ext import MoKALinear, reference

bnb = pytest.importorskip("bitsandbytes")

from bnb_cpu import is_repacked, needs_avx512bf16, repack_for_cpu_inference  # noqa: E402


def _nf4(lin: torch.nn.Linear, cpu_repack: bool = False, nested: bool = True) -> "bnb.nn.Linear4bit":
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          quant_type="nf4", compute_dtype=torch.float32, compress_statistics=nested)
    q.load_state_dict(lin.state_dict())
    q.support_avx512bf16_for_cpu = cpu_repack  # explicit: its default follows the CPU (bnb_cpu)
    return q.to("cpu")  # bitsandbytes quantizes on .to()


def _int8(lin: torch.nn.Linear) -> "bnb.nn.Linear8bitLt":
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


def _nf4_dense(q) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


def _dense_ref(x, W, bias, layer, A=None, B=None, logits=None):
    """x @ (W + dW).T + bias with dW materialized by the reference (torch.kron)."""
    fA, fB = layer.factors()
    A = fA if A is None else A
    B = fB if B is None else B
    a = "default"
    if layer.gating[a]:
        g = layer.scale[a] * reference.gate_softmax(layer.moka_gate_logits[a] if logits is None else logits,
                                                    layer.temperature[a])
    else:
        g = torch.full((layer.r[a],), layer.scale[a] / layer.r[a], dtype=x.dtype)
    y = x @ (W + reference.delta_weight(A, B, g)).T
    return y if bias is None else y + bias


@pytest.mark.parametrize("variant", ["moka", "mokas"])
@pytest.mark.parametrize("gating", [True, False])
def test_forward_and_gradients_match_dense_reference_float64(variant, gating):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 32, dtype=torch.float64)
    shapes = [(4, 4, 8, 12), (4, 4, 8, 12), (2, 2, 16, 24)] if variant == "mokas" else [(4, 6, 8, 8), (4, 6, 8, 8), (8, 4, 4, 12)]
    m = MoKALinear(lin, r=3, shapes=shapes, variant=variant, gating=gating, temperature=0.7, scale=1.3,
                   init="random", dtype=torch.float64)
    if gating:
        with torch.no_grad():
            m.moka_gate_logits["default"].normal_()
    assert len(m.groups["default"]) == 2  # equal shapes share one stacked group
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    nA = len(m.moka_A["default"]) if variant == "moka" else 0
    names = [f"moka_A.default.{j}" for j in range(nA)] + [f"moka_B.default.{j}" for j in range(len(m.moka_B["default"]))]
    names += ["moka_gate_logits.default"] if gating else []
    params = [m.get_parameter(n) for n in names]
    assert set(names) == {n for n, p in m.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(y, [x, *params], gy)

    # Independent copy of the same leaves through the reference math.
    xr = x.detach().clone().requires_grad_()
    leaves = [p.detach().clone().requires_grad_() for p in params]
    it = iter(leaves)
    A = [next(it) for _ in range(nA)] if variant == "moka" else None
    B = [next(it) for _ in m.moka_B["default"]]
    logits = next(it) if gating else None
    yr = _dense_ref(xr, lin.weight, lin.bias, m, A=A, B=B, logits=logits)
    ref_grads = torch.autograd.grad(yr, [xr, *leaves], gy)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    for g, gr in zip(grads, ref_grads):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-10)


def test_nf4_gradients_match_dequantized_dense_reference_float32():
    torch.manual_seed(1)
    q = _nf4(torch.nn.Linear(64, 32))
    m = MoKALinear(q, r=2, init="random")
    x = torch.randn(3, 7, 64, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    params = [*m.moka_A["default"], *m.moka_B["default"], m.moka_gate_logits["default"]]
    grads = torch.autograd.grad(y, [x, *params], gy)
    xr = x.detach().clone().requires_grad_()
    leaves = [p.detach().clone().requires_grad_() for p in params]
    yr = _dense_ref(xr, _nf4_dense(q), q.bias, m, A=leaves[:2], B=leaves[2:4], logits=leaves[4])
    ref_grads = torch.autograd.grad(yr, [xr, *leaves], gy)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for g, gr in zip(grads, ref_grads):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)
    assert q.weight.grad is None and not q.weight.requires_grad


def test_int8_base_forward_matches_dequantized_reference():
    torch.manual_seed(2)
    q = _int8(torch.nn.Linear(64, 32))
    m = MoKALinear(q, r=2, init="random")
    W = bnb.functional.int8_vectorwise_dequant(q.weight.CB if q.weight.CB is not None else q.state.CB,
                                               q.weight.SCB if q.weight.SCB is not None else q.state.SCB).float()
    x = torch.randn(4, 64)
    y = m(x)
    yr = _dense_ref(x, W, q.bias, m)
    # bitsandbytes' int8 matmul quantizes the activations too: compare to its own scale of error.
    base_err = (q(x) - (x @ W.T + q.bias)).abs().max()
    assert (y - yr).abs().max() <= 1.5 * base_err + 1e-5
    y.sum().backward()
    assert m.moka_B["default"][0].grad is not None and m.moka_B["default"][0].grad.abs().sum() > 0


@pytest.mark.parametrize("variant, init", [("moka", "zero_b"), ("moka", "zero_a"), ("mokas", "zero_b")])
def test_zero_init_then_training_moves(variant, init):
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 64)
    m = MoKALinear(lin, r=3, variant=variant, init=init)
    assert torch.count_nonzero(m.delta_weight()) == 0
    x = torch.randn(8, 64)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    m(x).pow(2).sum().backward()
    zero = m.moka_B["default"] if init == "zero_b" else m.moka_A["default"]
    assert all(p.grad.abs().sum() > 0 for p in zero), "the zero factor must receive gradient"
    other = (m.moka_A["default"] if "default" in m.moka_A else []) if init == "zero_b" else m.moka_B["default"]
    for p in other:
        # unit-gain init: variance 1/cols
        assert abs(p.detach().var().item() * p.shape[-1] - 1.0) < 0.5


def test_only_adapter_parameters_train_and_gates_are_uniform_without_gating():
    lin = torch.nn.Linear(32, 32)
    m = MoKALinear(lin, r=4, gating=False, scale=2.0)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("moka_") for n in trainable)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    torch.testing.assert_close(m.gates(), torch.full((4,), 0.5))


def test_autocast_bfloat16_runs_in_bf16_and_stays_close():
    torch.manual_seed(4)
    m = MoKALinear(torch.nn.Linear(64, 32), r=2, init="random")
    x = torch.randn(4, 64)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
    assert y16.dtype == torch.bfloat16
    assert m.moka_A["default"][0].dtype == torch.float32  # parameters stay float32
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)
    y16.float().sum().backward()
    assert m.moka_A["default"][0].grad.dtype == torch.float32


def test_merge_unmerge_float32_exact_and_disable():
    torch.manual_seed(5)
    lin = torch.nn.Linear(64, 32)
    W0 = lin.weight.detach().clone()
    m = MoKALinear(lin, r=3, init="random")
    x = torch.randn(5, 64)
    y = m(x)
    m.merge()
    torch.testing.assert_close(lin.weight, W0 + m.delta_weight().detach(), rtol=0, atol=0)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert torch.equal(lin.weight, W0)
    m.enable_adapters(False)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    m.enable_adapters(True)
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)


def test_nf4_merge_requantizes_and_warns_and_unmerge_restores():
    torch.manual_seed(6)
    q = _nf4(torch.nn.Linear(64, 32))
    old = q.weight.data.clone()
    m = MoKALinear(q, r=2, init="random")
    with torch.no_grad():
        for p in m.moka_B["default"]:
            p.mul_(0.05)  # an adapter of realistic size next to the base weight
    target = _nf4_dense(q) + m.delta_weight().detach()
    with pytest.warns(UserWarning, match="re-quantizes"):
        m.merge()
    qs = q.weight.quant_state
    packed, qs_ref = bnb.functional.quantize_4bit(target, blocksize=qs.blocksize, compress_statistics=qs.nested,
                                                  quant_type="nf4")
    torch.testing.assert_close(_nf4_dense(q), bnb.functional.dequantize_4bit(packed, qs_ref), rtol=0, atol=0)
    # Within NF4 rounding of the exact merge: at most half the largest code gap times the block absmax.
    assert (_nf4_dense(q) - target).abs().max() <= 0.2 * target.abs().max()
    m.unmerge()
    assert torch.equal(q.weight.data, old)


def test_unsupported_base_is_rejected_by_type():
    with pytest.raises(TypeError, match=r"base_layer must be torch.nn.Linear.*got torch.nn.modules.conv.Conv1d"):
        MoKALinear(torch.nn.Conv1d(4, 4, 1))


@needs_avx512bf16
def test_bnb_repacks_a_4bit_layer_at_an_eval_no_grad_forward_and_computes_in_bf16():
    """The control for the tests below: with the flag on, bitsandbytes' eval no-grad forward
    repacks the layer, and the repacked matmul differs from the trainable path by bf16 rounding."""
    torch.manual_seed(6)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    plain = _nf4(lin)
    with torch.no_grad():
        want = plain.eval()(x)
    packed = _nf4(lin, cpu_repack=True).eval()
    with torch.no_grad():
        got = packed(x)
    assert is_repacked(packed) and not is_repacked(plain)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_eval_no_grad_pass_does_not_break_4bit_gradients():
    """ENV.md pitfall: bnb repacks a Linear4bit for CPU inference in an eval no-grad forward when
    ``support_avx512bf16_for_cpu`` is set (its default on AVX512-BF16 CPUs); forced on here, on any
    CPU. The wrapped layer must never repack and must stay trainable."""
    torch.manual_seed(7)
    q = _nf4(torch.nn.Linear(64, 32), cpu_repack=True)
    m = MoKALinear(q, r=2, init="random")
    assert q.support_avx512bf16_for_cpu is False
    x = torch.randn(3, 64)

    def grads():
        m.train()
        xg = x.clone().requires_grad_()
        m(xg).pow(2).sum().backward()
        out = [xg.grad.clone(), m.moka_A["default"][0].grad.clone(), m.moka_B["default"][1].grad.clone()]
        m.zero_grad()
        return out

    before = grads()
    m.eval()
    with torch.no_grad():
        m(torch.randn(2, 64))
        m(torch.randn(1, 1, 64))
    after = grads()
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    assert not is_repacked(q)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
def test_wrapping_an_already_repacked_4bit_layer_restores_it(nested):
    """Layers wider than one 64-weight block, with and without double quantization of the
    scales (transformers' NF4 default has none): bitsandbytes' own inverse of the repacking
    leaves plain scales in the packed order; the wrapped layer must compute with the right ones."""
    torch.manual_seed(8)
    lin = torch.nn.Linear(192, 32)
    q = _nf4(lin, cpu_repack=True, nested=nested)
    x = torch.randn(2, 192)
    ref = _nf4(lin, nested=nested)(x)
    repack_for_cpu_inference(q)
    assert is_repacked(q)
    m = MoKALinear(q, r=1)
    assert not is_repacked(q) and q.support_avx512bf16_for_cpu is False
    # bitsandbytes' repacking stores the block absmax in bfloat16, so its own inverse is
    # only bf16-exact; after that the layer is an ordinary, differentiable NF4 layer again.
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-2 * ref.abs().max().item())
    xg = x.clone().requires_grad_()
    m.train()
    m(xg).sum().backward()
    torch.testing.assert_close(xg.grad, _nf4_dense(q).sum(0).expand(2, 192), rtol=1e-5, atol=1e-5)


def test_equivalent_to_peft_lokr_with_r1_no_gating_full_factors():
    peft = pytest.importorskip("peft")
    torch.manual_seed(9)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    base_copy = torch.nn.Linear(64, 32)
    base_copy.load_state_dict(net.lin.state_dict())
    # r >= max(factor dims)/2 makes LoKr keep both factors full; alpha = r gives scaling 1.
    lokr = peft.get_peft_model(net, peft.LoKrConfig(r=16, alpha=16, target_modules=["lin"], init_weights=False))
    layer = lokr.base_model.model.lin
    w1, w2 = layer.lokr_w1["default"], layer.lokr_w2["default"]
    assert layer.scaling["default"] == 1.0
    # LoKr: dW = kron(w1, w2), w1: (out_l, in_m), w2: (out_k, in_n).
    shape = (w1.shape[0], w1.shape[1], w2.shape[0], w2.shape[1])
    m = MoKALinear(base_copy, r=1, shapes=[shape], gating=False)
    with torch.no_grad():
        m.moka_A["default"][0][0].copy_(w1)
        m.moka_B["default"][0][0].copy_(w2)
    x = torch.randn(6, 64)
    torch.testing.assert_close(m(x), lokr(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.delta_weight(), layer.get_delta_weight("default"), rtol=0, atol=0)


def test_dropout_applies_to_the_adapter_input_in_training_only():
    torch.manual_seed(10)
    lin = torch.nn.Linear(64, 32)
    m = MoKALinear(lin, r=2, init="random", dropout=0.5)
    x = torch.randn(16, 64)
    m.eval()
    torch.testing.assert_close(m(x), _dense_ref(x, lin.weight, lin.bias, m), rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(11)
    y = m(x)
    torch.manual_seed(11)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    # base sees the full input, the adapter the dropped one
    want = lin(x) + (_dense_ref(xd, torch.zeros_like(lin.weight), None, m))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_int8_merge_requantizes_and_unmerge_restores():
    torch.manual_seed(12)
    q = _int8(torch.nn.Linear(64, 32))
    m = MoKALinear(q, r=2, init="random")
    with torch.no_grad():
        for p in m.moka_B["default"]:
            p.mul_(0.05)
    CB0 = (q.weight.CB if q.weight.CB is not None else q.state.CB).clone()
    SCB0 = (q.weight.SCB if q.weight.SCB is not None else q.state.SCB)
    target = bnb.functional.int8_vectorwise_dequant(CB0, SCB0).float() + m.delta_weight().detach()
    x = torch.randn(4, 64)
    y = m(x)
    with pytest.warns(UserWarning, match="re-quantizes"):
        m.merge()
    CB, SCB = q.weight.CB if q.weight.CB is not None else q.state.CB, q.weight.SCB if q.weight.SCB is not None else q.state.SCB
    merged_W = bnb.functional.int8_vectorwise_dequant(CB, SCB).float()
    # int8 rounding: at most half a step (row absmax / 127) per entry
    step = target.abs().amax(dim=1, keepdim=True) / 127
    assert ((merged_W - target).abs() <= 0.5 * step + 1e-3 * step).all()
    assert (m(x) - y).abs().max() < 0.05 * y.abs().max()
    m.unmerge()
    assert torch.equal(q.weight.CB if q.weight.CB is not None else q.state.CB, CB0)


def test_compiles_without_graph_breaks():
    torch.manual_seed(13)
    m = MoKALinear(torch.nn.Linear(64, 32), r=3, init="random")
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # aot_eager: no C++ build on CPU CI
    y = compiled(x)
    y.pow(2).sum().backward()
    g = m.moka_A["default"][0].grad.clone()
    m.zero_grad()
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    m(x).pow(2).sum().backward()
    torch.testing.assert_close(g, m.moka_A["default"][0].grad, rtol=1e-6, atol=1e-6)
