"""The reshape-matmul path of kron_mix (csrc/kron_mix_matmul.cpp) on CPU tensors.

On a GPU it serves every shape and dtype the fused kernels decline; it is
device-generic ATen, so its internal ops (moka::_kron_mix_matmul and
moka::_kron_mix_matmul_backward) run here, forward and backward, against
moka_ext.reference in float64 from the same rounded inputs.
"""
from __future__ import annotations

import pytest
import torch

import cuda_sim
import moka_ext  # noqa: F401  (registers torch.ops.moka)
from cuda_sim import Case

SHAPES = {
    "single": [(2, 8, 8, 8, 8)],
    "odd_dims": [(3, 5, 7, 3, 9)],
    "hetero": [(2, 3, 4, 4, 6), (1, 12, 2, 1, 12), (3, 2, 6, 6, 4)],
    "b_256": [(2, 16, 16, 256, 256)],  # beyond the fused kernels' 128 limit
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: None, torch.float16: None}


def tol(dtype):
    # Low precision: Z, g*A, P and W are each rounded once, and the output.
    return TOL[dtype] if TOL[dtype] is not None else 8 * torch.finfo(dtype).eps


def within(got, exp, bound, dtype, what):
    err = (got.double() - exp).abs()
    bad = ~(err <= tol(dtype) * bound + torch.finfo(dtype).smallest_normal)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} elements off, max err {err.max():.3g}"


def inputs(case):
    d = cuda_sim.make_inputs(case)
    t = {k: ([v.to(case.dtype) for v in d[k]] if isinstance(d[k], list) else d[k].to(case.dtype)) for k in d}
    return d, t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("base", [False, True])
def test_forward(name, dtype, base):
    case = Case("fwd", dtype, 13, SHAPES[name], base=base, data_seed=7)
    d, t = inputs(case)
    # Strided rows: a column slice of a wider tensor.
    x = torch.cat([t["x"], t["x"][:, :3]], 1)[:, : case.in_features]
    assert not x.is_contiguous()
    y = torch.ops.moka._kron_mix_matmul(x, t["A"], t["B"], t["gates"], t.get("base"))
    exp, bnd = cuda_sim.expected_and_bounds(case, d)
    assert y.dtype == dtype and y.shape == (13, case.out_features)
    within(y, exp["y"], bnd["y"], dtype, "y")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_backward(name, dtype):
    case = Case("grad", dtype, 11, SHAPES[name], data_seed=8)
    d, t = inputs(case)
    gx, gA, gB, gg = torch.ops.moka._kron_mix_matmul_backward(t["gy"], t["x"], t["A"], t["B"], t["gates"])
    exp, bnd = cuda_sim.expected_and_bounds(case, d)
    dx_exp, dx_bnd = cuda_sim.expected_and_bounds(Case("dx", dtype, 11, SHAPES[name], data_seed=8), d)
    within(gx, dx_exp["y"], dx_bnd["y"], dtype, "grad_x")
    for j in range(len(gA)):
        within(gA[j], exp[f"dA{j}"], bnd[f"dA{j}"], dtype, f"grad_A[{j}]")
        within(gB[j], exp[f"dB{j}"], bnd[f"dB{j}"], dtype, f"grad_B[{j}]")
    within(gg, exp["dg"], bnd["dg"], dtype, "grad_gates")
    assert all(g.dtype == dtype for g in [gx, *gA, *gB, gg])


def test_zero_tokens_and_leading_dims():
    case = Case("fwd", torch.float32, 6, SHAPES["hetero"], data_seed=9)
    d, t = inputs(case)
    x = t["x"].view(2, 3, -1)
    y = torch.ops.moka._kron_mix_matmul(x, t["A"], t["B"], t["gates"])
    exp, bnd = cuda_sim.expected_and_bounds(case, d)
    within(y.view(6, -1), exp["y"], bnd["y"], torch.float32, "y")
    empty = torch.ops.moka._kron_mix_matmul(x[:0], t["A"], t["B"], t["gates"])
    assert empty.shape == (0, 3, case.out_features)
    gx, gA, gB, gg = torch.ops.moka._kron_mix_matmul_backward(empty, x[:0], t["A"], t["B"], t["gates"])
    assert gx.shape == x[:0].shape and all((g == 0).all() for g in [*gA, *gB, gg])


def test_bad_input_names_the_argument():
    case = Case("fwd", torch.float32, 4, SHAPES["odd_dims"])  # in = 63, out = 15
    _, t = inputs(case)
    with pytest.raises(RuntimeError, match="base must have shape"):
        torch.ops.moka._kron_mix_matmul(t["x"], t["A"], t["B"], t["gates"], t["x"])
    with pytest.raises(RuntimeError, match="gates must be 1-D"):
        torch.ops.moka._kron_mix_matmul(t["x"], t["A"], t["B"], t["gates"][:1])
