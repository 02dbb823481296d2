"""Shared test helpers: the devices to test on and random Kronecker-mixture inputs."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mix(
    lead: tuple,
    group_shapes: list[tuple[int, int, int, int, int]],
    dtype=torch.float64,
    device="cpu",
    requires_grad=False,
    generator: torch.Generator | None = None,
):
    """Random (x, A, B, gates) for groups given as (r, ma, na, mb, nb)."""
    _, ma, na, mb, nb = group_shapes[0]

    def rnd(*shape):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    x = rnd(*lead, na * nb)
    A = [rnd(r, a, b) for r, a, b, _, _ in group_shapes]
    B = [rnd(r, c, d) for r, _, _, c, d in group_shapes]
    gates = rnd(sum(g[0] for g in group_shapes))
    return x, A, B, gates


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
