"""The CUDA kernels against moka_ext.reference (skipped without a GPU).

Covers what is specific to the CUDA backend: the fused kernel and the
reshape-matmul path (MOKA_CUDA_IMPL) on shapes each takes, the low-precision
error rule at realistic layer sizes, strided inputs, tiles with ragged ends,
many tokens, kron_mix_add's fused epilogue, CUDA-graph capture, opcheck and
torch.compile. The device-generic tests in test_ops.py run on CUDA as well.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_mix

import moka_ext
from moka_ext import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# (r, ma, na, mb, nb) per group; ids say what each exercises.
SHAPES = {
    "tiny": [(1, 8, 8, 8, 8)],
    "odd_dims": [(3, 5, 7, 3, 9)],  # in=63, out=15: scalar load paths, k padding
    "hetero_small": [(2, 3, 4, 4, 6), (1, 12, 2, 1, 12), (3, 2, 6, 6, 4)],
    "4096_64x64_r4": [(4, 64, 64, 64, 64)],
    "4096_hetero": [(2, 64, 64, 64, 64), (1, 32, 128, 128, 32), (1, 16, 256, 256, 16)],
    "4096_to_14336": [(2, 112, 64, 128, 64)],
    "b_256_fallback": [(2, 16, 16, 256, 256)],  # mb = nb = 256: reshape-matmul path
    "max_128": [(1, 128, 128, 128, 128)],
}
FUSED_OK = {"tiny", "odd_dims", "hetero_small", "4096_64x64_r4", "4096_to_14336", "max_128"}
LOW = [torch.bfloat16, torch.float16]


def cuda_mix(lead, groups, dtype, requires_grad=False, seed=0):
    x, A, B, g = make_mix(lead, groups, torch.float64, generator=torch.Generator().manual_seed(seed))
    # Keep y = O(1) whatever the layer size, so float16 cannot overflow.
    A = [a / a.shape[2] ** 0.5 for a in A]
    B = [b / b.shape[2] ** 0.5 for b in B]
    g = g / g.numel() ** 0.5

    def dev(t):
        return t.to("cuda", dtype).requires_grad_(requires_grad)

    return dev(x), [dev(a) for a in A], [dev(b) for b in B], dev(g)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def out_and_grads(fn, x, A, B, g, seed=1):
    y = fn(x, A, B, g)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((y * w.to(y)).sum(), [x, *A, *B, g])
    return [y, *grads]


def detach64(ts):
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.fixture
def impl(monkeypatch, request):
    monkeypatch.setenv("MOKA_CUDA_IMPL", request.param)
    return request.param


@pytest.mark.parametrize("impl", ["auto", "fused_v1", "cublas"], indirect=True)
@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_error_at_most_twice_plain_pytorch(impl, name, dtype):
    groups = SHAPES[name]
    x, A, B, g = cuda_mix((37,), groups, dtype, requires_grad=True)
    x64, g64 = detach64([x, g])
    A64, B64 = detach64(A), detach64(B)
    ref = out_and_grads(reference.kron_mix, x64, A64, B64, g64)
    kern = out_and_grads(moka_ext.kron_mix, x, A, B, g)
    plain = out_and_grads(reference.kron_mix, x, A, B, g)
    labels = ["y", "dx", *[f"dA{j}" for j in range(len(A))], *[f"dB{j}" for j in range(len(B))], "dg"]
    for label, k, p, r in zip(labels, kern, plain, ref):
        assert k.dtype == dtype
        ek, ep = rel_err(k, r), rel_err(p, r)
        # A handful of elements (dg has r) can all round the plain way by luck;
        # allow them half an ulp more, which the final rounding alone can cost.
        slack = torch.finfo(dtype).eps / 2 if k.numel() < 64 else 1e-6
        assert ek <= 2 * ep + slack, f"{name} {dtype} {label}: kernel error {ek:.3g} > 2x plain {ep:.3g}"


@pytest.mark.parametrize("impl", ["auto", "fused_v1", "cublas"], indirect=True)
@pytest.mark.parametrize("name", ["tiny", "odd_dims", "hetero_small", "b_256_fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_matches_reference(impl, name, dtype):
    x, A, B, g = cuda_mix((5, 3), SHAPES[name], dtype, requires_grad=True)
    kern = out_and_grads(moka_ext.kron_mix, x, A, B, g)
    ref = out_and_grads(reference.kron_mix, x, A, B, g)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    for k, r in zip(kern, ref):
        torch.testing.assert_close(k, r, **tol)


@pytest.mark.parametrize("groups", [SHAPES["tiny"], SHAPES["hetero_small"], SHAPES["odd_dims"]],
                         ids=["tiny", "hetero", "odd"])
def test_gradcheck_float64_cuda(groups):
    x, A, B, g = cuda_mix((2, 3), groups, torch.float64, requires_grad=True)
    n = len(A)
    assert torch.autograd.gradcheck(lambda x, g, *f: moka_ext.kron_mix(x, f[:n], f[n:], g), (x, g, *A, *B))
    base = torch.randn(2, 3, A[0].shape[1] * B[0].shape[1], dtype=torch.float64, device="cuda",
                       requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda base, x, g, *f: moka_ext.kron_mix_add(base, x, f[:n], f[n:], g), (base, x, g, *A, *B))


@pytest.mark.parametrize("name", sorted(FUSED_OK))
@pytest.mark.parametrize("dtype", LOW)
def test_fused_and_cublas_paths_agree(monkeypatch, name, dtype):
    x, A, B, g = cuda_mix((129,), SHAPES[name], dtype)
    monkeypatch.setenv("MOKA_CUDA_IMPL", "fused")  # raises if the fused kernel declines
    y_fused = moka_ext.kron_mix(x, A, B, g)
    monkeypatch.setenv("MOKA_CUDA_IMPL", "cublas")
    y_cublas = moka_ext.kron_mix(x, A, B, g)
    y64 = reference.kron_mix(x.double(), [a.double() for a in A], [b.double() for b in B], g.double())
    assert rel_err(y_fused, y64) <= 2 * rel_err(y_cublas, y64) + 1e-6


def test_fused_impl_refuses_what_it_cannot_take(monkeypatch):
    monkeypatch.setenv("MOKA_CUDA_IMPL", "fused")
    x, A, B, g = cuda_mix((4,), SHAPES["b_256_fallback"], torch.bfloat16)
    with pytest.raises(RuntimeError, match="fused"):
        moka_ext.kron_mix(x, A, B, g)
    x, A, B, g = cuda_mix((4,), SHAPES["tiny"], torch.float32)
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        moka_ext.kron_mix(x, A, B, g)
    monkeypatch.setenv("MOKA_CUDA_IMPL", "bogus")
    with pytest.raises(RuntimeError, match="MOKA_CUDA_IMPL"):
        moka_ext.kron_mix(x, A, B, g)


@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 7, 8191, 8193])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ragged_token_tiles(tokens, dtype):
    x, A, B, g = cuda_mix((tokens,), SHAPES["4096_hetero"][:2], dtype)
    y = moka_ext.kron_mix(x, A, B, g)
    y64 = reference.kron_mix(x.double(), [a.double() for a in A], [b.double() for b in B], g.double())
    y_plain = reference.kron_mix(x, A, B, g)
    assert rel_err(y, y64) <= 2 * rel_err(y_plain, y64) + 1e-6
    # Each token depends on its own row only: the last token equals a 1-token
    # call (bit for bit in the fused kernel; cuBLAS may pick another algorithm).
    exact = dtype != torch.float32
    torch.testing.assert_close(y[-1:], moka_ext.kron_mix(x[-1:], A, B, g),
                               atol=0 if exact else 1e-6, rtol=0 if exact else 1e-5)


def test_many_tokens():
    x, A, B, g = cuda_mix((4, 70001), [(2, 4, 8, 8, 4)], torch.bfloat16)
    y = moka_ext.kron_mix(x, A, B, g)
    y64 = reference.kron_mix(x.double(), [a.double() for a in A], [b.double() for b in B], g.double())
    assert rel_err(y, y64) <= 2 * rel_err(reference.kron_mix(x, A, B, g), y64) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_strided_inputs(dtype):
    groups = SHAPES["4096_hetero"][:2]
    x, A, B, g = cuda_mix((6, 5), groups, dtype)
    y_ref = moka_ext.kron_mix(x.contiguous(), A, B, g)
    wide = torch.zeros(6, 5, x.shape[-1] + 8, dtype=dtype, device="cuda")
    wide[..., 8:] = x
    cases = {
        "row_strided": wide[..., 8:],          # last dim contiguous, rows strided
        "transposed": x.transpose(0, 1).contiguous().transpose(0, 1),
        "last_dim_strided": torch.stack([x, x], -1)[..., 0],
    }
    A_nc = [a.transpose(1, 2).contiguous().transpose(1, 2) for a in A]
    B_nc = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in B]
    g_nc = torch.stack([g, g], -1)[:, 0]
    # The fused kernel (16-bit) must be bit-exact; cuBLAS may choose another algorithm.
    tol = dict(atol=0, rtol=0) if dtype in LOW else dict(atol=1e-6, rtol=1e-5)
    for label, xs in cases.items():
        assert not xs.is_contiguous(), label
        torch.testing.assert_close(moka_ext.kron_mix(xs, A, B, g), y_ref, **tol, msg=label)
    torch.testing.assert_close(moka_ext.kron_mix(x, A_nc, B_nc, g_nc), y_ref, **tol)
    base = torch.randn(5, 6, y_ref.shape[-1], dtype=dtype, device="cuda").transpose(0, 1)
    torch.testing.assert_close(
        moka_ext.kron_mix_add(base, cases["row_strided"], A, B, g),
        moka_ext.kron_mix_add(base.contiguous(), x, A, B, g), **tol)


@pytest.mark.parametrize("name", ["tiny", "odd_dims", "4096_64x64_r4", "4096_hetero"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kron_mix_add_fuses_base(name, dtype):
    x, A, B, g = cuda_mix((33,), SHAPES[name], dtype)
    base = torch.randn(33, A[0].shape[1] * B[0].shape[1], dtype=dtype, device="cuda")
    y = moka_ext.kron_mix_add(base, x, A, B, g)
    exact = base.double() + reference.kron_mix(
        x.double(), [a.double() for a in A], [b.double() for b in B], g.double())
    plain = base + reference.kron_mix(x, A, B, g)
    assert y.dtype == dtype and y.shape == base.shape
    assert rel_err(y, exact) <= 2 * rel_err(plain, exact) + 1e-6


def test_zero_tokens_cuda():
    for dtype in (torch.bfloat16, torch.float64):
        x, A, B, g = cuda_mix((0, 3), SHAPES["tiny"], dtype, requires_grad=True)
        y = moka_ext.kron_mix(x, A, B, g)
        assert y.shape == (0, 3, 64)
        gx, *rest = torch.autograd.grad(y.sum(), [x, *A, *B, g])
        assert gx.shape == x.shape and all((t == 0).all() for t in rest)


@pytest.mark.parametrize("groups", [SHAPES["4096_hetero"][:2], SHAPES["4096_hetero"]],
                         ids=["fused", "reshape_matmul"])
def test_backward_is_deterministic_cuda(groups):
    x, A, B, g = cuda_mix((1000,), groups, torch.bfloat16, requires_grad=True)
    first = out_and_grads(moka_ext.kron_mix, x, A, B, g)
    second = out_and_grads(moka_ext.kron_mix, x, A, B, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cuda_graph_capture():
    x, A, B, g = cuda_mix((64,), SHAPES["4096_64x64_r4"], torch.bfloat16)
    base = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
    gy = torch.randn_like(base)
    logits = torch.randn(4, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernel attributes, cuBLAS handles) off the graph
        for _ in range(2):
            torch.ops.moka.kron_mix_add(base, x, A, B, g)
            torch.ops.moka.kron_mix_backward(gy, x, A, B, g)
            moka_ext.gate_softmax(logits, 0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.moka.kron_mix_add(base, x, A, B, g)
        grads = torch.ops.moka.kron_mix_backward(gy, x, A, B, g)
        s = moka_ext.gate_softmax(logits, 0.5)
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, torch.ops.moka.kron_mix_add(base, x, A, B, g), atol=0, rtol=0)
    eager = torch.ops.moka.kron_mix_backward(gy, x, A, B, g)
    torch.testing.assert_close(grads[0], eager[0], atol=0, rtol=0)
    torch.testing.assert_close(s, torch.softmax(logits / 0.5, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gate_softmax_cuda(dtype):
    logits = torch.randn(7, 37, dtype=dtype, device="cuda") * 3
    for t in (0.3, 1.0, 4.0):
        out = moka_ext.gate_softmax(logits, t)
        exact = torch.softmax(logits.double() / t, -1)
        plain = torch.softmax(logits / t, -1)
        assert out.dtype == dtype
        assert rel_err(out, exact) <= 2 * rel_err(plain, exact) + 1e-7
    logits[2, 5] = float("nan")
    assert torch.isnan(moka_ext.gate_softmax(logits, 1.0)[2]).all()
    assert not torch.isnan(moka_ext.gate_softmax(logits, 1.0)[[0, 1, 3]]).any()
    l64 = torch.randn(3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: moka_ext.gate_softmax(l, 0.7), (l64,))


def test_opcheck_cuda():
    for dtype, groups in [(torch.bfloat16, SHAPES["hetero_small"]), (torch.float32, SHAPES["tiny"]),
                          (torch.float16, SHAPES["4096_64x64_r4"])]:
        x, A, B, g = cuda_mix((3, 2), groups, dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.moka.kron_mix.default, (x, A, B, g))
        base = torch.randn(3, 2, A[0].shape[1] * B[0].shape[1], dtype=dtype, device="cuda",
                           requires_grad=True)
        torch.library.opcheck(torch.ops.moka.kron_mix_add.default, (base, x, A, B, g))
    logits = torch.randn(2, 6, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.moka.gate_softmax.default, (logits, 0.5))


def test_torch_compile_fullgraph_cuda():
    x, A, B, g = cuda_mix((4, 9), SHAPES["4096_hetero"][:2], torch.bfloat16, requires_grad=True)
    logits = torch.randn(g.numel(), device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x, logits):
        gates = moka_ext.gate_softmax(logits, 0.5)
        return moka_ext.kron_mix(x, A, B, gates).float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(x, logits)
    grads_c = torch.autograd.grad(loss_c, [x, logits, *A, *B])
    loss_e = f(x, logits)
    grads_e = torch.autograd.grad(loss_e, [x, logits, *A, *B])
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_autocast_cuda():
    x, A, B, g = cuda_mix((8,), SHAPES["4096_64x64_r4"], torch.float32, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = moka_ext.kron_mix(x, A, B, g)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in [x, *A, *B, g])
