"""Kronecker factor shapes: validation and the ``"auto"`` choice.

Owns: what a component shape ``(ma, na, mb, nb)`` is (A: ma x na, B: mb x nb,
``ma*mb == out``, ``na*nb == in``), its parameter cost, its compute cost
(multiply-adds per token), and ``choose_shapes``, which picks diverse,
non-degenerate shapes for a layer under a parameter budget and, optionally, a
multiply-add cap, falling back to the best valid factorization (with a
warning) for layers that have too few such shapes. Pure arithmetic: no torch,
no model.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

__all__ = ["NoShapes", "Shape", "VARIANTS", "choose_shapes", "default_budget", "default_flops", "lora_macs",
           "shape_cost", "shape_macs", "validate_shape"]

Shape = tuple[int, int, int, int]  # (ma, na, mb, nb)
VARIANTS = ("moka", "mokas")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def validate_shape(shape, out_features: int, in_features: int, variant: str, where: str = "shape") -> Shape:
    """Check that ``shape`` factors an ``out x in`` layer; return it as a tuple."""
    ma, na, mb, nb = shape
    if ma * mb != out_features or na * nb != in_features:
        raise ValueError(
            f"{where}: (ma, na, mb, nb)={tuple(shape)} does not factor a {out_features} x {in_features} layer "
            f"(needs ma*mb == {out_features} and na*nb == {in_features}, got {ma * mb} and {na * nb})"
        )
    if variant == "mokas" and ma != na:
        raise ValueError(f"{where}: variant='mokas' needs (k, k, out/k, in/k), got {tuple(shape)}")
    return (ma, na, mb, nb)


def shape_cost(shape: Shape, variant: str = "moka") -> int:
    """Trainable parameters of one component (MoKAs trains only B)."""
    ma, na, mb, nb = shape
    return mb * nb if variant == "mokas" else ma * na + mb * nb


def shape_macs(shape: Shape, variant: str = "moka") -> int:
    """Multiply-adds per token of one component's forward ``Y = A X B^T``.

    MoKA: whichever order is cheaper, as the CPU kernel picks it: A first costs
    ``ma*nb*(na + mb)``, B first ``na*mb*(nb + ma)``. MoKAs (A the identity):
    only ``X B^T``, ``ma * mb * nb``."""
    ma, na, mb, nb = shape
    if variant == "mokas":
        return ma * mb * nb
    return min(ma * nb * (na + mb), na * mb * (nb + ma))


def lora_macs(out_features: int, in_features: int, r: int) -> int:
    """Multiply-adds per token of a rank-r LoRA update ``B (A x)``."""
    return r * (out_features + in_features)


# The multiply-add cap "auto" stands for: LoRA at this rank on the same layer.
FLOPS_LORA_RANK = 16


def default_flops(out_features: int, in_features: int) -> int:
    return lora_macs(out_features, in_features, FLOPS_LORA_RANK)


def default_budget(out_features: int, in_features: int, r: int) -> int:
    # Twice the cost of r perfectly balanced components (sqrt(out) x sqrt(in) factors).
    return int(4 * r * math.sqrt(out_features * in_features))


class NoShapes(ValueError):
    """No ``r`` shapes meet the preferred rules (the fallback then relaxes them)."""


def choose_shapes(
    out_features: int,
    in_features: int,
    r: int,
    variant: str = "moka",
    budget: Optional[int] = None,
    flops: Union[int, str, None] = None,
) -> list[Shape]:
    """Pick r factor shapes for an ``out x in`` layer, diverse and within ``budget`` parameters
    and, when ``flops`` is given, within ``flops`` multiply-adds per token for the whole adapter
    (``"auto"``: LoRA r=16's at this layer, :func:`default_flops`), if possible. Both limits
    are split evenly over the r components.

    MoKA: a component's rank is ``min(ma, na) * min(mb, nb)`` and its cost
    ``ma*na + mb*nb``; candidates (all four dims >= 2, so no 1 x n factor)
    within ``budget / r`` are taken by highest rank, then lowest cost, keeping
    every A shape and every B shape distinct across components so that the
    components see the weight at different granularities. MoKAs: the block
    count k (a common divisor, k >= 2, blocks at least 2 x 2) closest to
    ``(out*in) ** 0.25`` first, all k distinct. Deterministic.

    A layer with too few such shapes (a 20 -> 2 head, prime sizes) gets the best
    valid factorization instead, with a warning: 1 x n factors allowed, then shapes
    over the budget, then repeated shapes. Every layer gets r shapes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    try:
        return _preferred_shapes(out_features, in_features, r, variant, budget, flops)
    except NoShapes as e:
        shapes = _fallback_shapes(out_features, in_features, r, variant, budget, flops)
        warnings.warn(f"{e}; using the best valid factorization instead: {shapes}", stacklevel=2)
        return shapes


class _Limits:
    """Per-component limits: parameters (``cap``) and multiply-adds per token (``mac_cap``)."""

    def __init__(self, out_features, in_features, r, variant, budget, flops):
        if budget is None and variant != "mokas":
            budget = default_budget(out_features, in_features, r)
        # MoKAs' block-diagonal update has full rank for every k, so by default only
        # the nearness to a balanced block size decides, with no cap.
        self.cap = math.inf if budget is None else budget / r
        if flops == "auto":
            flops = default_flops(out_features, in_features)
        self.mac_cap = math.inf if flops is None else flops / r
        self.variant = variant
        self.text = f"at most {self.cap:.0f} parameters per component (budget={budget})"
        if flops is not None:
            self.text += f" and {self.mac_cap:.0f} multiply-adds per token per component (flops={flops})"

    def within(self, s: Shape) -> bool:
        return shape_cost(s, self.variant) <= self.cap and shape_macs(s, self.variant) <= self.mac_cap


def _rank(s: Shape) -> int:
    return min(s[0], s[1]) * min(s[2], s[3])


def _preferred_shapes(out_features, in_features, r, variant, budget, flops) -> list[Shape]:
    limits = _Limits(out_features, in_features, r, variant, budget, flops)
    what = f"shapes='auto': a {out_features} x {in_features} layer"
    if variant == "mokas":
        ks = [
            k
            for k in _divisors(math.gcd(out_features, in_features))
            if k >= 2 and out_features // k >= 2 and in_features // k >= 2
        ]
        target = (out_features * in_features) ** 0.25
        ks.sort(key=lambda k: (abs(math.log(k / target)), -k))
        picked = [(k, k, out_features // k, in_features // k) for k in ks]
        picked = [s for s in picked if limits.within(s)][:r]
        if len(picked) < r:
            raise NoShapes(
                f"{what} has only {len(picked)} MoKAs block sizes k (k >= 2 dividing both dims, blocks >= 2 x 2) "
                f"with {limits.text}, but r={r}"
            )
        return picked
    cands = [
        (ma, na, out_features // ma, in_features // na)
        for ma in _divisors(out_features)
        for na in _divisors(in_features)
    ]
    cands = [s for s in cands if min(s) >= 2 and limits.within(s)]
    cands.sort(key=lambda s: (-_rank(s), shape_cost(s), s))
    picked = _distinct(cands, r)
    if len(picked) < r:
        raise NoShapes(
            f"{what} has only {len(picked)} distinct non-degenerate factor shapes "
            f"(all of ma, na, mb, nb >= 2) with {limits.text}, but r={r}"
        )
    return picked


def _distinct(cands: list[Shape], r: int) -> list[Shape]:
    """Up to r candidates in order, distinct A and B shapes first, then any distinct shape."""
    picked: list[Shape] = []
    for strict in (True, False):
        for s in cands:
            if len(picked) == r:
                break
            if s in picked:
                continue
            if strict and any(s[:2] == p[:2] or s[2:] == p[2:] for p in picked):
                continue
            picked.append(s)
    return picked


def _fallback_shapes(out_features, in_features, r, variant, budget, flops) -> list[Shape]:
    limits = _Limits(out_features, in_features, r, variant, budget, flops)
    if variant == "mokas":
        target = (out_features * in_features) ** 0.25
        cands = [(k, k, out_features // k, in_features // k) for k in _divisors(math.gcd(out_features, in_features))]
        cands.sort(key=lambda s: (not limits.within(s), abs(math.log(s[0] / target)), -s[0]))
        picked = cands[:r]
    else:
        cands = [
            (ma, na, out_features // ma, in_features // na)
            for ma in _divisors(out_features)
            for na in _divisors(in_features)
        ]
        # Within the limits first, then by rank and cost as in the preferred choice.
        cands.sort(key=lambda s: (not limits.within(s), -_rank(s), shape_cost(s), s))
        picked = _distinct(cands, r)
    # Fewer valid shapes than components: repeat the best ones (they stack in one group).
    return [picked[i % len(picked)] for i in range(r)]
