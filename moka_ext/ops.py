"""The moka ops from Python: wrappers, fake kernels and autograd.

Every ``torch.library`` registration of the project lives here. The schemas and
the kernels are C++ (``csrc/``); importing ``moka_ext._C`` registers them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.moka.*)

__all__ = ["kron_mix", "kron_mix_add", "kron_mix_indexed", "gate_softmax"]


def kron_mix(x: Tensor, A: Sequence[Tensor], B: Sequence[Tensor], gates: Tensor) -> Tensor:
    """``x @ (sum_i gates[i] * kron(A_i, B_i)).T`` without building the dense update.

    ``A[j]: (r_j, ma_j, na_j)`` and ``B[j]: (r_j, mb_j, nb_j)`` stack the
    components of factor-shape group ``j``; ``gates`` holds ``sum_j r_j``
    mixture weights in group order; ``x: (..., in)`` gives ``(..., out)``.
    """
    return torch.ops.moka.kron_mix.default(x, list(A), list(B), gates)


def kron_mix_add(
    base: Tensor, x: Tensor, A: Sequence[Tensor], B: Sequence[Tensor], gates: Tensor
) -> Tensor:
    """``base + kron_mix(x, A, B, gates)``, the addition fused into the kernel."""
    return torch.ops.moka.kron_mix_add.default(base, x, list(A), list(B), gates)


def kron_mix_indexed(
    x: Tensor, row_adapter: Tensor, A: Sequence[Tensor], B: Sequence[Tensor], gates: Tensor
) -> Tensor:
    """Every row of ``x`` through its own adapter: ``y[i] = kron_mix(x[i], A_a, B_a, gates[a])``
    with ``a = row_adapter[i]`` (``-1``: a zero row).

    ``x: (rows, ..., in)``; ``row_adapter``: int64 ``(rows,)`` in ``[-1, n_adapters)``; the
    adapters are stacked along a new first dim, ``A[j]: (n_adapters, r_j, ma_j, na_j)``,
    ``B[j]: (n_adapters, r_j, mb_j, nb_j)``, ``gates: (n_adapters, sum_j r_j)``.
    """
    return torch.ops.moka.kron_mix_indexed.default(x, row_adapter, list(A), list(B), gates)


def gate_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(logits / temperature)`` over the last dim."""
    return torch.ops.moka.gate_softmax.default(logits, float(temperature))


# ---------------------------------------------------------------- fake kernels


def _out_shape(op: str, x: Tensor, A: Sequence[Tensor], B: Sequence[Tensor], gates: Tensor) -> tuple:
    # The C++ kernels validate everything; a fake only needs what it reads, plus
    # the device check, since mixed devices would dispatch here (Meta) instead.
    torch._check(
        len(A) == len(B) and len(A) > 0,
        lambda: f"{op}: A and B must be lists of equal length >= 1, got len(A)={len(A)} and len(B)={len(B)}",
    )
    named = [(f"A[{j}]", a) for j, a in enumerate(A)] + [(f"B[{j}]", b) for j, b in enumerate(B)]
    for name, t in named + [("gates", gates)]:
        torch._check(
            t.device == x.device,
            lambda: f"{op}: {name} must be on the device of x ({x.device}), got {t.device}",
        )
    return (*x.shape[:-1], A[0].shape[1] * B[0].shape[1])


@torch.library.register_fake("moka::kron_mix")
def _kron_mix_fake(x, A, B, gates):
    return x.new_empty(_out_shape("kron_mix", x, A, B, gates))


@torch.library.register_fake("moka::kron_mix_add")
def _kron_mix_add_fake(base, x, A, B, gates):
    return x.new_empty(_out_shape("kron_mix_add", x, A, B, gates))


@torch.library.register_fake("moka::kron_mix_backward")
def _kron_mix_backward_fake(grad_y, x, A, B, gates):
    _out_shape("kron_mix_backward", x, A, B, gates)
    return (
        x.new_empty(x.shape),
        [a.new_empty(a.shape) for a in A],
        [b.new_empty(b.shape) for b in B],
        gates.new_empty(gates.shape),
    )


def _indexed_out_shape(op, x, row_adapter, A, B, gates) -> tuple:
    torch._check(
        x.dim() >= 2 and row_adapter.dim() == 1 and row_adapter.shape[0] == x.shape[0],
        lambda: f"{op}: x must be (rows, ..., in) and row_adapter (rows,), got {tuple(x.shape)} and "
        f"{tuple(row_adapter.shape)}",
    )
    torch._check(
        row_adapter.device == x.device,
        lambda: f"{op}: row_adapter must be on the device of x ({x.device}), got {row_adapter.device}",
    )
    torch._check(
        gates.dim() == 2 and all(t.dim() == 4 for t in list(A) + list(B)),
        lambda: f"{op}: gates must be 2-D and every A[j], B[j] 4-D (n_adapters, r, rows, cols)",
    )
    return _out_shape(op, x, [a[0] for a in A], [b[0] for b in B], gates[0])


@torch.library.register_fake("moka::kron_mix_indexed")
def _kron_mix_indexed_fake(x, row_adapter, A, B, gates):
    return x.new_empty(_indexed_out_shape("kron_mix_indexed", x, row_adapter, A, B, gates))


@torch.library.register_fake("moka::kron_mix_indexed_backward")
def _kron_mix_indexed_backward_fake(grad_y, x, row_adapter, A, B, gates):
    _indexed_out_shape("kron_mix_indexed_backward", x, row_adapter, A, B, gates)
    return (
        x.new_empty(x.shape),
        [a.new_empty(a.shape) for a in A],
        [b.new_empty(b.shape) for b in B],
        gates.new_empty(gates.shape),
    )


@torch.library.register_fake("moka::gate_softmax")
def _gate_softmax_fake(logits, temperature):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("moka::gate_softmax_backward")
def _gate_softmax_backward_fake(grad, output, temperature):
    return output.new_empty(output.shape)


# -------------------------------------------------------------------- autograd


def _save_factors(ctx, x, A, B, gates):
    # Only x and the (small) factors are saved: the backward recomputes the
    # intermediate X B^T instead of keeping it.
    ctx.n_groups = len(A)
    ctx.save_for_backward(x, gates, *A, *B)


def _mix_grads(ctx, grad_y):
    x, gates, *factors = ctx.saved_tensors
    n = ctx.n_groups
    gx, gA, gB, gg = torch.ops.moka.kron_mix_backward.default(
        grad_y, x, factors[:n], factors[n:], gates
    )
    return gx, list(gA), list(gB), gg


def _kron_mix_setup(ctx, inputs, output):
    _save_factors(ctx, *inputs)


def _kron_mix_backward(ctx, grad_y):
    return _mix_grads(ctx, grad_y)


def _kron_mix_add_setup(ctx, inputs, output):
    _save_factors(ctx, *inputs[1:])


def _kron_mix_add_backward(ctx, grad_y):
    return (grad_y, *_mix_grads(ctx, grad_y))


def _kron_mix_indexed_setup(ctx, inputs, output):
    x, row_adapter, A, B, gates = inputs
    ctx.n_groups = len(A)
    ctx.save_for_backward(x, row_adapter, gates, *A, *B)


def _kron_mix_indexed_backward(ctx, grad_y):
    x, row_adapter, gates, *factors = ctx.saved_tensors
    n = ctx.n_groups
    gx, gA, gB, gg = torch.ops.moka.kron_mix_indexed_backward.default(
        grad_y, x, row_adapter, factors[:n], factors[n:], gates
    )
    return gx, None, list(gA), list(gB), gg


def _gate_softmax_setup(ctx, inputs, output):
    ctx.temperature = inputs[1]
    ctx.save_for_backward(output)


def _gate_softmax_backward(ctx, grad):
    (output,) = ctx.saved_tensors
    return torch.ops.moka.gate_softmax_backward.default(grad, output, ctx.temperature), None


torch.library.register_autograd("moka::kron_mix", _kron_mix_backward, setup_context=_kron_mix_setup)
torch.library.register_autograd(
    "moka::kron_mix_add", _kron_mix_add_backward, setup_context=_kron_mix_add_setup
)
torch.library.register_autograd(
    "moka::kron_mix_indexed", _kron_mix_indexed_backward, setup_context=_kron_mix_indexed_setup
)
torch.library.register_autograd(
    "moka::gate_softmax", _gate_softmax_backward, setup_context=_gate_softmax_setup
)


# ------------------------------------------- device-generic kron_mix_indexed


def _rows_by_adapter(row_adapter: Tensor, n_adapters: int):
    """(adapter, its rows) for every adapter with rows, from one sort of row_adapter."""
    torch._check(
        bool(((row_adapter >= -1) & (row_adapter < n_adapters)).all()),
        lambda: f"kron_mix_indexed: row_adapter must be in [-1, {n_adapters}) (n_adapters from gates)",
    )
    order = torch.argsort(row_adapter, stable=True)
    counts = torch.bincount(row_adapter + 1, minlength=n_adapters + 1).tolist()
    out, start = [], counts[0]  # rows of -1 sort first and are skipped
    for a in range(n_adapters):
        if counts[a + 1]:
            out.append((a, order[start : start + counts[a + 1]]))
        start += counts[a + 1]
    return out


def kron_mix_indexed_generic(x, row_adapter, A, B, gates):
    """kron_mix_indexed from kron_mix calls on each adapter's rows, for any device with a
    kron_mix kernel (CUDA has its own one-launch kernel, csrc/cuda/kron_mix_indexed.cu)."""
    y = x.new_zeros((*x.shape[:-1], A[0].shape[2] * B[0].shape[2]))
    for a, rows in _rows_by_adapter(row_adapter, gates.shape[0]):
        ya = torch.ops.moka.kron_mix.default(x.index_select(0, rows), [t[a] for t in A], [t[a] for t in B], gates[a])
        y.index_copy_(0, rows, ya)
    return y


def kron_mix_indexed_backward_generic(grad_y, x, row_adapter, A, B, gates):
    gx = torch.zeros_like(x)
    gA = [torch.zeros_like(t) for t in A]
    gB = [torch.zeros_like(t) for t in B]
    gg = torch.zeros_like(gates)
    for a, rows in _rows_by_adapter(row_adapter, gates.shape[0]):
        gxa, gAa, gBa, gga = torch.ops.moka.kron_mix_backward.default(
            grad_y.index_select(0, rows), x.index_select(0, rows), [t[a] for t in A], [t[a] for t in B], gates[a]
        )
        gx.index_copy_(0, rows, gxa)
        for j in range(len(A)):
            gA[j][a] = gAa[j]
            gB[j][a] = gBa[j]
        gg[a] = gga
    return gx, gA, gB, gg


# The backward on CUDA: the per-adapter composition of kron_mix_backward.
torch.library.register_kernel("moka::kron_mix_indexed_backward", "cuda", kron_mix_indexed_backward_generic)
