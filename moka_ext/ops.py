"""The moka ops from Python: wrappers, fake kernels and autograd.

Every ``torch.library`` registration of the project lives here. The schemas and
the kernels are C++ (``csrc/``); importing ``moka_ext._C`` registers them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.moka.*)

__all__ = ["kron_mix", "kron_mix_add", "gate_softmax"]


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
    "moka::gate_softmax", _gate_softmax_backward, setup_context=_gate_softmax_setup
)
