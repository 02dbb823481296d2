"""benchmarks/kernel_model.py: its counts come from the kernels' planners
(through the simulator harness) and agree with the math they count."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_sim

pytestmark = pytest.mark.cuda_sim

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_model  # noqa: E402


@pytest.fixture(scope="module")
def sim():
    return cuda_sim.build()


def rows_for(sim, tokens, groups):
    ps = kernel_model.plans(sim, tokens, groups)
    return {k: kernel_model.model(k[0], k[1], p, None, tokens, groups, "t") for k, p in ps.items() if "declined" not in p}


def test_mma_count_of_the_planners_is_the_math(sim):
    # 64 x 64 factors need no padding: the MMAs the planners count are exactly
    # T r (2 ma na mb + 2 mb nb na) flops, for both forward kernels and dX.
    T, groups = 1000, [(3, 64, 64, 64, 64)]
    rows = rows_for(sim, T, groups)
    exact = T * 3 * 2 * (2 * 64**3)
    for key in [("fwd", "v1"), ("fwd", "v2"), ("dx", "v1"), ("dx", "v2")]:
        tiles = rows[key]["tiles"]
        per_tile = rows[key]["flops"] // tiles
        # The last tile is partly empty: it computes tt tokens of zeros.
        assert rows[key]["flops"] == exact + (tiles * rows[key]["tile_tokens"] - T) * per_tile // rows[key]["tile_tokens"]
    # Per component, dA (G_A = sum dY B X^T) and dB (G_B^T = sum X^T A^T dY) are
    # two products of a forward stage's size each, over tiles of 8 tokens.
    g = rows[("grad_factors", "v1")]
    assert g["flops"] == g["tiles"] * 8 * 3 * 2 * 2 * (2 * 64**3)
    # v2 computes the same four products per token and component (W_t and
    # G_A, U_t and G_B), each of a forward stage's size.
    g = rows[("grad_factors", "v2")]
    assert g["flops"] == g["tiles"] * g["tile_tokens"] * 3 * 2 * 2 * (2 * 64**3)


def test_v2_gradients_stream_x_and_dy_once_per_group(sim):
    T, groups = 8192, [(4, 64, 64, 64, 64)]
    rows = rows_for(sim, T, groups)
    F = 4 * 2 * 64 * 64 * 2
    v1, v2 = rows[("grad_factors", "v1")], rows[("grad_factors", "v2")]
    ws = v2["bytes_global"] - T * (4096 + 4096) * 2 - F  # the partials written
    assert ws > 0
    # L2: x and dY once (one unit block holds all 8 units), each CTA's factors, the partials.
    assert v2["bytes_l2"] == T * (4096 + 4096) * 2 + v2["ctas"] * F + ws
    # v1 streams them once per (component, kind): 8 times.
    assert v1["bytes_l2"] > 8 * T * (4096 + 4096) * 2
    assert v2["barriers_per_tile"] == 1 and v2["stages"] >= 2 and v2["ctas"] == 132


def test_odd_shapes_count_the_padding(sim):
    T, groups = 37, [(2, 5, 7, 3, 9)]
    rows = rows_for(sim, T, groups)
    useful = kernel_model.useful_flops(T, groups)
    for key in [("fwd", "v1"), ("fwd", "v2")]:
        assert rows[key]["flops"] > useful


def test_factor_traffic_follows_the_plans(sim):
    T, groups = 8192, [(4, 64, 64, 64, 64)]
    rows = rows_for(sim, T, groups)
    F = 4 * 2 * 64 * 64 * 2
    v1, v2 = rows[("fwd", "v1")], rows[("fwd", "v2")]
    assert v1["ctas"] == v1["tiles"] == T // v1["tile_tokens"]
    assert v1["factor_bytes_read"] == v1["tiles"] * F
    assert v2["ctas"] == 132 and v2["stages"] >= 2 and v2["factors_resident"]
    assert v2["factor_bytes_read"] == 132 * F
    # HBM: x read, y written, factors once.
    assert v2["bytes_global"] == T * (4096 + 4096) * 2 + F
    # v1: one barrier per group, three per component, one before the epilogue.
    # v2: one per group, then one per batch of components whose stage 1 runs
    # before it; the output tile is written out after the next group's first.
    # At r = 4 two Zs buffers fit (batches of one component), at r = 2 one
    # buffer per component (one batch).
    assert v1["barriers_per_tile"] == 1 + 1 + 3 * 4
    assert v2["barriers_per_tile"] == 1 + 4
    assert rows_for(sim, T, [(2, 64, 64, 64, 64)])[("fwd", "v2")]["barriers_per_tile"] == 1 + 1


def test_json_has_one_object_per_kernel_version_and_shape():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_model.py"), "--json"],
                          capture_output=True, text=True, check=True)
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    kernels = [o for o in objs if o["kernel"] != "summary"]
    keys = {(o["kernel"], o["version"], o["shape"]) for o in kernels}
    assert len(keys) == len(kernels)
    for o in kernels:
        for field in ("kernel", "version", "shape", "bytes_global", "bytes_l2", "flops", "ctas_per_sm", "est_us"):
            assert field in o, (field, o)
        assert o["est_us"] > 0
    assert {("fwd", "v1"), ("fwd", "v2"), ("dx", "v2"), ("grad_factors", "v1"), ("grad_reduce", "v1"),
            ("grad_factors", "v2"), ("grad_reduce", "v2"), ("grad_gates", "v2")} <= {
        (o["kernel"], o["version"]) for o in kernels}
