"""Kronecker factor shapes: validation and the ``"auto"`` choice.

Owns: what a component shape ``(ma, na, mb, nb)`` is (A: ma x na, B: mb x nb,
``ma*mb == out``, ``na*nb == in``), its parameter cost, and ``choose_shapes``,
which picks diverse, non-degenerate shapes for a layer under a parameter
budget, falling back to the best valid factorization (with a warning) for
layers that have too few such shapes. Pure arithmetic: no torch, no model.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

__all__ = ["NoShapes", "Shape", "VARIANTS", "choose_shapes", "default_budget", "shape_cost", "validate_shape"]

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


def default_budget(out_features: int, in_features: int, r: int) -> int:
    # Twice the cost of r perfectly balanced components (sqrt(out) x sqrt(in) factors).
    return int(4 * r * math.sqrt(out_features * in_features))


class NoShapes(ValueError):
    """No ``r`` shapes meet the preferred rules (the fallback then relaxes them)."""


def choose_shapes(
    out_features: int, in_features: int, r: int, variant: str = "moka", budget: Optional[int] = None
) -> list[Shape]:
    """Pick r factor shapes for an ``out x in`` layer, diverse and within ``budget`` if possible.

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
        return _preferred_shapes(out_features, in_features, r, variant, budget)
    except NoShapes as e:
        shapes = _fallback_shapes(out_features, in_features, r, variant, budget)
        warnings.warn(f"{e}; using the best valid factorization instead: {shapes}", stacklevel=2)
        return shapes


def _cap(out_features: int, in_features: int, r: int, variant: str, budget: Optional[int]) -> float:
    if budget is None and variant != "mokas":
        budget = default_budget(out_features, in_features, r)
    # MoKAs' block-diagonal update has full rank for every k, so by default only
    # the nearness to a balanced block size decides, with no cap.
    return math.inf if budget is None else budget / r


def _rank(s: Shape) -> int:
    return min(s[0], s[1]) * min(s[2], s[3])


def _preferred_shapes(out_features, in_features, r, variant, budget) -> list[Shape]:
    cap = _cap(out_features, in_features, r, variant, budget)
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
        picked = [s for s in picked if shape_cost(s, variant) <= cap][:r]
        if len(picked) < r:
            raise NoShapes(
                f"{what} has only {len(picked)} MoKAs block sizes k (k >= 2 dividing both dims, blocks >= 2 x 2) "
                f"with at most {cap:.0f} parameters per component (budget={budget}), but r={r}"
            )
        return picked
    cands = [
        (ma, na, out_features // ma, in_features // na)
        for ma in _divisors(out_features)
        for na in _divisors(in_features)
    ]
    cands = [s for s in cands if min(s) >= 2 and shape_cost(s) <= cap]
    cands.sort(key=lambda s: (-_rank(s), shape_cost(s), s))
    picked = _distinct(cands, r)
    if len(picked) < r:
        raise NoShapes(
            f"{what} has only {len(picked)} distinct non-degenerate factor shapes "
            f"(all of ma, na, mb, nb >= 2) within {cap:.0f} parameters per component (budget={budget}), but r={r}"
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


def _fallback_shapes(out_features, in_features, r, variant, budget) -> list[Shape]:
    cap = _cap(out_features, in_features, r, variant, budget)
    if variant == "mokas":
        target = (out_features * in_features) ** 0.25
        cands = [(k, k, out_features // k, in_features // k) for k in _divisors(math.gcd(out_features, in_features))]
        cands.sort(key=lambda s: (shape_cost(s, variant) > cap, abs(math.log(s[0] / target)), -s[0]))
        picked = cands[:r]
    else:
        cands = [
            (ma, na, out_features // ma, in_features // na)
            for ma in _divisors(out_features)
            for na in _divisors(in_features)
        ]
        # Within the budget first, then by rank and cost as in the preferred choice.
        cands.sort(key=lambda s: (shape_cost(s) > cap, -_rank(s), shape_cost(s), s))
        picked = _distinct(cands, r)
    # Fewer valid shapes than components: repeat the best ones (they stack in one group).
    return [picked[i % len(picked)] for i in range(r)]
