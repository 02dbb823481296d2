"""The pure-PyTorch MoKA math: the oracle every kernel and layer is tested against.

Two forms of the same contract (DESIGN.md section 1):
- ``delta_weight`` / ``kron_mix``: the materialized update
  ``dW = sum_i g_i * kron(A_i, B_i)`` and ``y = x @ dW.T`` (what PEFT's LoKr
  computes every step); exact and simple, used as the oracle.
- ``kron_mix_factored``: the reshape-matmul form, ``Y_t = A X_t B^T`` per
  component with autograd through plain einsums; it never builds ``dW`` but
  writes each component's intermediate out. The benchmarks' naive baseline.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def delta_weight(A: Sequence[Tensor], B: Sequence[Tensor], gates: Tensor) -> Tensor:
    """``sum_j sum_k gates[off_j + k] * kron(A[j][k], B[j][k])``, shape ``(out, in)``."""
    dW = None
    i = 0
    for Aj, Bj in zip(A, B):
        for k in range(Aj.shape[0]):
            # torch.kron raises on some non-contiguous inputs (torch 2.14).
            term = gates[i] * torch.kron(Aj[k].contiguous(), Bj[k].contiguous())
            dW = term if dW is None else dW + term
            i += 1
    return dW


def kron_mix(x: Tensor, A: Sequence[Tensor], B: Sequence[Tensor], gates: Tensor) -> Tensor:
    """``x @ delta_weight(A, B, gates).T`` over the last dim of ``x``."""
    return x @ delta_weight(A, B, gates).T


def kron_mix_factored(
    x: Tensor, A: Sequence[Tensor], B: Sequence[Tensor], gates: Tensor
) -> Tensor:
    """The same map without ``dW``: ``y_t = vec(A X_t B^T)``, one component at a time."""
    lead = x.shape[:-1]
    y = None
    i = 0
    for Aj, Bj in zip(A, B):
        _, ma, na = Aj.shape
        _, mb, nb = Bj.shape
        X = x.reshape(-1, na, nb)
        for k in range(Aj.shape[0]):
            Z = torch.einsum("tab,cb->tac", X, Bj[k])
            Y = torch.einsum("da,tac->tdc", Aj[k], Z).reshape(*lead, ma * mb)
            y = gates[i] * Y if y is None else y + gates[i] * Y
            i += 1
    return y


def gate_softmax(logits: Tensor, temperature: float) -> Tensor:
    """``softmax(logits / temperature)`` over the last dim."""
    return torch.softmax(logits / temperature, dim=-1)
