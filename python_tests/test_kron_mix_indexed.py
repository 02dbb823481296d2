"""torch.ops.moka.kron_mix_indexed (one adapter per row) against a per-row loop over
moka_ext.reference.kron_mix."""
from __future__ import annotations

import pytest
import torch
from conftest import make_mix

import moka_ext
from moka_ext import ops, reference

# (r, ma, na, mb, nb): in = 24, out = 12, the first group A-first, the second B-first.
GROUPS = [(2, 3, 4, 4, 6), (3, 2, 6, 6, 4)]


def make_indexed(n_adapters, rows, seq, dtype=torch.float64, seed=0, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    mixes = [make_mix((rows, seq), GROUPS, dtype, device, generator=g) for _ in range(n_adapters)]
    x = mixes[0][0]
    A = [torch.stack([m[1][j] for m in mixes]) for j in range(len(GROUPS))]
    B = [torch.stack([m[2][j] for m in mixes]) for j in range(len(GROUPS))]
    gates = torch.stack([m[3] for m in mixes])
    row_adapter = torch.randint(-1, n_adapters, (rows,), generator=g).to(device)
    leaves = [x, *A, *B, gates]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return x, row_adapter, A, B, gates


def per_row_reference(x, row_adapter, A, B, gates):
    """Each row on its own through the reference, rows without an adapter zero."""
    out = [x.new_zeros(0, *x.shape[1:-1], A[0].shape[2] * B[0].shape[2])]
    for i in range(x.shape[0]):
        a = int(row_adapter[i])
        if a < 0:
            out.append(x.new_zeros(1, *x.shape[1:-1], A[0].shape[2] * B[0].shape[2]))
        else:
            out.append(reference.kron_mix(x[i : i + 1], [t[a] for t in A], [t[a] for t in B], gates[a]))
    return torch.cat(out)


@pytest.mark.parametrize("n_adapters, rows, seq", [(3, 7, 5), (1, 4, 1), (4, 2, 3), (2, 0, 3)])
def test_forward_and_gradients_match_a_per_row_loop(n_adapters, rows, seq):
    x, ra, A, B, g = make_indexed(n_adapters, rows, seq, seed=rows + seq, requires_grad=True)
    y = moka_ext.kron_mix_indexed(x, ra, A, B, g)
    y_ref = per_row_reference(x, ra, A, B, g)
    assert y.shape == (rows, seq, 12) and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    if rows == 0:
        return
    w = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [x, *A, *B, g]
    got = torch.autograd.grad((y * w).sum(), leaves)
    want = torch.autograd.grad((y_ref * w).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_an_adapter_with_no_rows_gets_zero_gradients_and_base_rows_zero_output():
    x, _, A, B, g = make_indexed(3, 5, 2, requires_grad=True)
    ra = torch.tensor([0, -1, 0, 2, -1])
    y = moka_ext.kron_mix_indexed(x, ra, A, B, g)
    assert torch.count_nonzero(y[1]) == 0 and torch.count_nonzero(y[4]) == 0
    y.sum().backward()
    assert all(torch.count_nonzero(t.grad[1]) == 0 for t in A + B) and torch.count_nonzero(g.grad[1]) == 0
    assert torch.count_nonzero(x.grad[1]) == 0 and torch.count_nonzero(x.grad[0]) > 0


def test_gradcheck():
    x, ra, A, B, g = make_indexed(2, 3, 2, requires_grad=True, seed=5)
    assert torch.autograd.gradcheck(lambda x, *rest: moka_ext.kron_mix_indexed(x, ra, rest[:2], rest[2:4], rest[4]),
                                    (x, *A, *B, g))


def test_low_precision_error_is_within_twice_plain_torch():
    # flash-attention's rule: the op's error against float32 at most 2x plain PyTorch's in the same dtype.
    x, ra, A, B, g = make_indexed(3, 16, 8, dtype=torch.float32, seed=3)
    exact = per_row_reference(x.double(), ra, [t.double() for t in A], [t.double() for t in B], g.double())
    for dtype in (torch.bfloat16, torch.float16):
        low = [x.to(dtype), ra, [t.to(dtype) for t in A], [t.to(dtype) for t in B], g.to(dtype)]
        ours = (moka_ext.kron_mix_indexed(*low).double() - exact).abs().max()
        torch_err = (per_row_reference(*low).double() - exact).abs().max()
        assert ours <= 2 * torch_err + 1e-6, (dtype, ours, torch_err)


def test_generic_fallback_computes_what_the_cpu_kernel_computes():
    # The device-generic composition that bench_mixed_batch.py compares against, and the CUDA backward.
    x, ra, A, B, g = make_indexed(3, 6, 4, seed=9)
    torch.testing.assert_close(ops.kron_mix_indexed_generic(x, ra, A, B, g), moka_ext.kron_mix_indexed(x, ra, A, B, g),
                               rtol=1e-12, atol=1e-12)
    gy = torch.randn(6, 4, 12, dtype=torch.float64)
    want = torch.ops.moka.kron_mix_indexed_backward.default(gy, x, ra, A, B, g)
    got = ops.kron_mix_indexed_backward_generic(gy, x, ra, A, B, g)
    for a, b in zip([got[0], *got[1], *got[2], got[3]], [want[0], *want[1], *want[2], want[3]]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_opcheck():
    x, ra, A, B, g = make_indexed(3, 4, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.moka.kron_mix_indexed.default, (x, ra, A, B, g))
    gy = torch.randn(4, 2, 12, dtype=torch.float64)
    torch.library.opcheck(torch.ops.moka.kron_mix_indexed_backward.default,
                          (gy, x.detach(), ra, [t.detach() for t in A], [t.detach() for t in B], g.detach()))


def test_torch_compile_fullgraph():
    x, ra, A, B, g = make_indexed(2, 4, 3, dtype=torch.float32, requires_grad=True)

    def f(x, ra, A, B, g):
        return moka_ext.kron_mix_indexed(x, ra, A, B, g).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True)(x, ra, A, B, g)
    torch.testing.assert_close(loss, f(x, ra, A, B, g))
    loss.backward()
    assert x.grad is not None and g.grad is not None


def test_bad_input_names_the_argument():
    x, ra, A, B, g = make_indexed(2, 3, 2)
    f = moka_ext.kron_mix_indexed
    with pytest.raises(RuntimeError, match=r"row_adapter\[1\] must be in \[-1, 2\).*got 2"):
        f(x, torch.tensor([0, 2, 1]), A, B, g)
    with pytest.raises(RuntimeError, match="row_adapter must be a 1-D int64 tensor with one entry per row of x"):
        f(x, ra.int(), A, B, g)
    with pytest.raises(RuntimeError, match="one entry per row of x \\(3\\)"):
        f(x, ra[:2], A, B, g)
    with pytest.raises(RuntimeError, match=r"A\[0\] must be 4-D \(n_adapters=2"):
        f(x, ra, [A[0][0], A[1]], B, g)
    with pytest.raises(RuntimeError, match=r"gates must be 2-D"):
        f(x, ra, A, B, g[0])
    with pytest.raises(RuntimeError, match=r"B\[1\] must be 4-D \(n_adapters=2"):
        f(x, ra, A, [B[0], B[1][:1]], g)
    with pytest.raises(RuntimeError, match=r"x must have at least 2 dims"):
        f(x[0, 0], ra, A, B, g)


def test_autocast_runs_in_the_autocast_dtype():
    x, ra, A, B, g = make_indexed(3, 4, 2, dtype=torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moka_ext.kron_mix_indexed(x, ra, A, B, g)
    assert y.dtype == torch.bfloat16
    want = moka_ext.kron_mix_indexed(x.bfloat16(), ra, [t.bfloat16() for t in A], [t.bfloat16() for t in B], g.bfloat16())
    torch.testing.assert_close(y, want, rtol=0, atol=0)


# ------------------------------------------------ CUDA (csrc/cuda/kron_mix_indexed.cu)
# The kernel itself runs in every test run under the simulator
# (test_cuda_sim_indexed.py); these check the ATen glue on a GPU.
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,seq,n_adapters", [(1, 1, 1), (37, 1, 5), (6, 33, 3), (64, 3, 16)])
def test_cuda_kernel_within_twice_plain_torch(dtype, rows, seq, n_adapters):
    x, ra, A, B, g = make_indexed(n_adapters, rows, seq, dtype=torch.float32, seed=rows + seq)
    exact = per_row_reference(x.double(), ra, [t.double() for t in A], [t.double() for t in B], g.double())
    low = [x.to(dtype), ra, [t.to(dtype) for t in A], [t.to(dtype) for t in B], g.to(dtype)]
    ours = moka_ext.kron_mix_indexed(*[t.cuda() if torch.is_tensor(t) else [u.cuda() for u in t] for t in low])
    torch_err = (per_row_reference(*low).double() - exact).abs().max()
    assert (ours.cpu().double() - exact).abs().max() <= 2 * torch_err + 1e-6
    assert torch.equal(ours[ra.cuda() < 0], torch.zeros_like(ours[ra.cuda() < 0]))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_declined_dtypes_take_the_per_adapter_path(monkeypatch, dtype):
    x, ra, A, B, g = make_indexed(3, 9, 2, dtype=dtype, seed=4)
    cuda = lambda t: t.cuda() if torch.is_tensor(t) else [u.cuda() for u in t]  # noqa: E731
    got = moka_ext.kron_mix_indexed(*[cuda(t) for t in (x, ra, A, B, g)])
    torch.testing.assert_close(got.cpu(), per_row_reference(x, ra, A, B, g))
    monkeypatch.setenv("MOKA_CUDA_IMPL", "fused")
    with pytest.raises(RuntimeError, match="MOKA_CUDA_IMPL=fused"):
        moka_ext.kron_mix_indexed(*[cuda(t) for t in (x, ra, A, B, g)])


@cuda_only
def test_cuda_rejects_out_of_range_adapters():
    x, ra, A, B, g = make_indexed(3, 4, 2, dtype=torch.float16)
    ra[1] = 3
    with pytest.raises(RuntimeError, match="row_adapter must be in"):
        moka_ext.kron_mix_indexed(x.cuda(), ra.cuda(), [a.cuda() for a in A], [b.cuda() for b in B], g.cuda())
