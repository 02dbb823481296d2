"""torch.ops.moka.kron_mix / kron_mix_add / gate_softmax against moka_ext.reference."""
from __future__ import annotations

import pytest
import torch
from conftest import divisors, make_mix
from hypothesis import given, settings
from hypothesis import strategies as st

import moka_ext
from moka_ext import reference

# Heterogeneous groups: all factor (in=24, out=12) differently. The CPU kernel computes the
# first and last A-first and the middle one B-first (the cheaper order for each; csrc/cpu).
HETERO = [(2, 3, 4, 4, 6), (1, 12, 2, 1, 12), (3, 2, 6, 6, 4)]
# One group (in=24, out=12) per path of the CPU kernel: the cheaper order, and whether the
# factor dimension a token keeps in the batched products (nb A-first, mb B-first) is at most
# the kernel's expansion limit of 8 (one GEMM on the identity-expanded factor) or above it.
PATHS = [(3, 2, 6, 6, 4),    # A first, nb=4: expanded
         (2, 1, 2, 12, 12),  # A first, nb=12: batched
         (2, 6, 2, 2, 12),   # B first, mb=2: expanded
         (1, 1, 1, 12, 24)]  # B first, mb=12: batched


def grads(fn, *inputs):
    """Output and gradients of sum(fn(...) * w) for a fixed random w."""
    y = fn(*inputs)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    flat = [t for t in _flatten(inputs)]
    g = torch.autograd.grad((y * w.to(y)).sum(), flat, allow_unused=True)
    return y, g


def _flatten(inputs):
    for t in inputs:
        if isinstance(t, (list, tuple)):
            yield from t
        else:
            yield t


@st.composite
def mix_case(draw):
    n_in = draw(st.sampled_from([1, 6, 12, 16, 24, 30]))
    n_out = draw(st.sampled_from([1, 4, 12, 18, 20]))
    n_groups = draw(st.integers(1, 3))
    groups = []
    for _ in range(n_groups):
        ma = draw(st.sampled_from(divisors(n_out)))
        na = draw(st.sampled_from(divisors(n_in)))
        groups.append((draw(st.integers(1, 3)), ma, na, n_out // ma, n_in // na))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    return lead, groups, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(case=mix_case(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_forward_backward_match_reference(case, dtype):
    lead, groups, seed = case
    x, A, B, g = make_mix(lead, groups, dtype, requires_grad=True,
                          generator=torch.Generator().manual_seed(seed))
    y, dk = grads(moka_ext.kron_mix, x, A, B, g)
    y_ref, dr = grads(reference.kron_mix, x, A, B, g)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    assert y.shape == (*lead, A[0].shape[1] * B[0].shape[1])
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **tol)
    for a, b in zip(dk, dr):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("groups", [[(1, 2, 3, 2, 2)], HETERO, PATHS], ids=["one", "hetero", "paths"])
def test_gradcheck_float64(device, groups):
    x, A, B, g = make_mix((2, 3), groups, device=device, requires_grad=True)
    n = len(A)

    def fn(x, g, *f):
        return moka_ext.kron_mix(x, f[:n], f[n:], g)

    assert torch.autograd.gradcheck(fn, (x, g, *A, *B))
    base = torch.randn(2, 3, A[0].shape[1] * B[0].shape[1], dtype=torch.float64,
                       device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda base, x, g, *f: moka_ext.kron_mix_add(base, x, f[:n], f[n:], g),
        (base, x, g, *A, *B),
    )


def test_gradcheck_gate_softmax(device):
    logits = torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: moka_ext.gate_softmax(l, 0.7), (logits,))
    torch.testing.assert_close(moka_ext.gate_softmax(logits, 0.7), reference.gate_softmax(logits, 0.7))


def test_kron_mix_add_is_base_plus_mix(device):
    x, A, B, g = make_mix((4, 5), HETERO, torch.float32, device=device)
    base = torch.randn(4, 5, 12, device=device)
    torch.testing.assert_close(moka_ext.kron_mix_add(base, x, A, B, g),
                               base + reference.kron_mix(x, A, B, g), atol=1e-4, rtol=1e-4)


def test_opcheck(device):
    for lead, groups in [((3,), [(2, 2, 3, 3, 2)]), ((2, 4), HETERO), ((0,), HETERO)]:
        x, A, B, g = make_mix(lead, groups, torch.float32, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.moka.kron_mix.default, (x, A, B, g))
        base = torch.randn(*lead, 12 if groups is HETERO else 6, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.moka.kron_mix_add.default, (base, x, A, B, g))
        gy = torch.randn(*lead, base.shape[-1], device=device)
        torch.library.opcheck(torch.ops.moka.kron_mix_backward.default,
                              (gy, x.detach(), [a.detach() for a in A], [b.detach() for b in B], g.detach()))
    logits = torch.randn(4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moka.gate_softmax.default, (logits, 0.5))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, A, B, g0 = make_mix((3, 4), HETERO, torch.float32, device=device, requires_grad=True)
    logits = torch.randn(6, device=device, requires_grad=True)

    def f(x, logits):
        g = 0.5 * moka_ext.gate_softmax(logits, 2.0)
        return moka_ext.kron_mix(x, A, B, g).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x, logits)
    dx, dl, *dA = torch.autograd.grad(loss, [x, logits, *A])
    loss_ref = (reference.kron_mix(x, A, B, 0.5 * reference.gate_softmax(logits, 2.0))).square().sum()
    dx_r, dl_r, *dA_r = torch.autograd.grad(loss_ref, [x, logits, *A])
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip([dx, dl, *dA], [dx_r, dl_r, *dA_r]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_plain_pytorch(device, dtype):
    # 4096 -> 4096 would be slow on CPU; 576 = 24*24 is SmolLM2's hidden size. On CPU the
    # first three groups run batched (A first, A first, B first), the last two expanded (A
    # first, B first; shapes of the flops cap). 600 tokens make several tiles (and thread
    # chunks), each widened to float32 on its own.
    groups = [(2, 24, 24, 24, 24), (2, 16, 36, 36, 16), (1, 36, 16, 16, 36),
              (1, 4, 144, 144, 4), (1, 144, 4, 4, 144)]
    x64, A64, B64, g64 = make_mix((600,), groups, torch.float64, device=device, requires_grad=True,
                                  generator=torch.Generator().manual_seed(1))
    y64, d64 = grads(reference.kron_mix, x64, A64, B64, g64)

    def low(t):
        return [low(u) for u in t] if isinstance(t, list) else t.detach().to(dtype).requires_grad_()

    inputs = [low(t) for t in (x64, A64, B64, g64)]
    y_k, d_k = grads(moka_ext.kron_mix, *inputs)
    y_p, d_p = grads(reference.kron_mix, *inputs)
    assert y_k.dtype == dtype

    def err(a, ref):
        return (a.double() - ref).abs().max().item()

    assert err(y_k, y64) <= 2 * err(y_p, y64)
    for k, p, r in zip(d_k, d_p, d64):
        assert err(k, r) <= 2 * err(p, r)


def test_zero_tokens_and_1d_input(device):
    x, A, B, g = make_mix((0,), HETERO, device=device, requires_grad=True)
    y = moka_ext.kron_mix(x, A, B, g)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert all(torch.count_nonzero(a.grad) == 0 for a in A) and torch.count_nonzero(g.grad) == 0
    x1, A, B, g = make_mix((), HETERO, device=device)
    assert x1.dim() == 1
    torch.testing.assert_close(moka_ext.kron_mix(x1, A, B, g), reference.kron_mix(x1, A, B, g))


def test_non_contiguous_inputs(device):
    # Every input a strided view, forward and gradients: the kernels read x, the
    # factors and the gates through their strides.
    _, A, B, _ = make_mix((5, 4), HETERO, device=device)
    xt = torch.randn(24, 4, 5, dtype=torch.float64, device=device, requires_grad=True).permute(2, 1, 0)
    At = [a.transpose(1, 2).contiguous().requires_grad_().transpose(1, 2) for a in A]
    Bt = [torch.stack([b, b], -1).requires_grad_()[..., 0] for b in B]
    gt = torch.randn(12, dtype=torch.float64, device=device, requires_grad=True)[::2]
    assert not any(t.is_contiguous() for t in [xt, gt, *At, *Bt])
    y, d = grads(moka_ext.kron_mix, xt, At, Bt, gt)
    y_r, d_r = grads(reference.kron_mix, xt, At, Bt, gt)
    torch.testing.assert_close(y, y_r)
    for a, b in zip(d, d_r):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_tokens_cross_tiles_and_threads(device, threads):
    # More tokens than one tile (256 at most) and an odd count: tiles, one chunk
    # of tiles per thread and the short last tile. Each group order, expanded and batched
    # (as PATHS), with its own reduction of the chunks' factor gradients.
    groups = [(4, 8, 8, 8, 8), (2, 4, 4, 16, 16), (1, 16, 2, 4, 32), (1, 4, 2, 16, 32)]
    x, A, B, g = make_mix((1037,), groups, torch.float64, device=device, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, d = grads(moka_ext.kron_mix, x, A, B, g)
    finally:
        torch.set_num_threads(before)
    y_r, d_r = grads(reference.kron_mix, x, A, B, g)
    torch.testing.assert_close(y, y_r)
    for a, b in zip(d, d_r):
        torch.testing.assert_close(a, b)


def test_backward_is_deterministic(device):
    x, A, B, g = make_mix((300,), HETERO, torch.float32, device=device, requires_grad=True)
    _, d1 = grads(moka_ext.kron_mix, x, A, B, g)
    _, d2 = grads(moka_ext.kron_mix, x, A, B, g)
    for a, b in zip(d1, d2):
        assert torch.equal(a, b)


def test_autocast_runs_in_low_precision_and_trains_fp32_params():
    x, A, B, g = make_mix((8,), HETERO, torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moka_ext.kron_mix(x, A, B, g)
        y2 = moka_ext.kron_mix_add(torch.zeros(8, 12), x, A, B, g)
    assert y.dtype == torch.bfloat16 and y2.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A[0].grad is not None and A[0].grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), reference.kron_mix(x, A, B, g), atol=0.1, rtol=0.05)


def test_nan_and_inf_propagate(device):
    x, A, B, g = make_mix((3,), [(1, 2, 2, 2, 2)], device=device)
    x[0, 0] = float("nan")
    x[1, 0] = float("inf")
    y = moka_ext.kron_mix(x, A, B, g)
    assert torch.isnan(y[0]).any() and not torch.isfinite(y[1]).all() and torch.isfinite(y[2]).all()
    logits = torch.tensor([0.0, float("nan"), 1.0], device=device)
    assert torch.isnan(moka_ext.gate_softmax(logits, 1.0)).all()


# ------------------------------------------------------------------ bad input


def _ok(device="cpu"):
    return make_mix((2,), HETERO, torch.float32, device=device)


def _bad_cases():
    x, A, B, g = _ok()
    return {
        "list lengths": ((x, A, B[:2], g), r"len\(A\)=3 and len\(B\)=2"),
        "empty lists": ((x, [], [], g), r"equal length >= 1"),
        "ndim": ((x, [A[0][0]] + A[1:], B, g), r"A\[0\] must be 3-D .* got shape \[3, 4\]"),
        "r mismatch": ((x, A, [B[0][:1]] + B[1:], g), r"group 0: A\[0\] and B\[0\] must stack the same number"),
        "na*nb": ((x, A, [torch.randn(2, 4, 5)] + B[1:], g), r"na\*nb must equal x.size\(-1\)=24.*na\*nb=20"),
        "ma*mb": ((x, A, B[:1] + [torch.randn(1, 2, 12)] + B[2:], g), r"ma\*mb must be the same output size .*\(12 from group 0\).*ma\*mb=24"),
        "gates ndim": ((x, A, B, g.view(2, 3)), r"gates must be 1-D of length sum\(r\)=6.*got shape \[2, 3\]"),
        "gates length": ((x, A, B, g[:5]), r"gates must be 1-D of length sum\(r\)=6.*got shape \[5\]"),
        "dtype mix": ((x.double(), A, B, g), r"A\[0\] must have the dtype of x \(Double\), got Float"),
        "gates dtype": ((x, A, B, g.double()), r"gates must have the dtype of x \(Float\), got Double"),
        "int dtype": ((x.long(), [a.long() for a in A], [b.long() for b in B], g.long()), r"x must be float32, float64, bfloat16 or float16, got Long"),
        "0-dim x": ((torch.tensor(1.0), A, B, g), r"x must have at least 1 dim"),
        "meta device": ((x, A, B, g.to("meta")), r"gates must be on the device of x"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_input_raises_clear_error(name):
    args, pattern = _bad_cases()[name]
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.moka.kron_mix(*args)


def test_bad_input_backward_and_add():
    x, A, B, g = _ok()
    with pytest.raises(RuntimeError, match=r"kron_mix_add: base must have shape \[2, 12\].*got \[2, 11\]"):
        moka_ext.kron_mix_add(torch.zeros(2, 11), x, A, B, g)
    with pytest.raises(RuntimeError, match=r"kron_mix_backward: grad_y must have the dtype of x"):
        torch.ops.moka.kron_mix_backward(torch.zeros(2, 12, dtype=torch.float64), x, A, B, g)
    with pytest.raises(RuntimeError, match=r"gate_softmax: temperature must be a finite number > 0, got 0"):
        moka_ext.gate_softmax(torch.zeros(3), 0.0)
    with pytest.raises(RuntimeError, match=r"gate_softmax: logits must be float32.*got Int"):
        moka_ext.gate_softmax(torch.zeros(3, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match=r"gate_softmax_backward: grad must match output"):
        torch.ops.moka.gate_softmax_backward(torch.zeros(4), torch.zeros(3), 1.0)


def test_build_info():
    info = moka_ext.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert moka_ext.__version__
