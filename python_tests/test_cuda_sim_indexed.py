"""The kron_mix_indexed CUDA kernel (csrc/cuda/kron_mix_indexed.cu), executed
on the CPU under the SIMT simulator: one launch over a batch whose rows each
use their own adapter, in float16 and bfloat16, against a per-row loop of
moka_ext.reference.kron_mix in float64 from the same rounded inputs.

The harness fills y with NaN bit patterns before the launch, so a row the
kernel leaves unwritten (a missing zero-fill of adapter -1, a token lost at a
segment's tail) fails the comparison like a wrong value does.
"""
from __future__ import annotations

import random
import re

import pytest
import torch

import cuda_sim
from cuda_sim import Case

pytestmark = pytest.mark.cuda_sim

LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def sim():
    return cuda_sim.build()


def _shuffled(counts: dict, seed: int) -> list:
    """Rows with `counts[a]` rows of adapter a, in a shuffled order."""
    rows = [a for a, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(rows)
    return rows


# Tile tokens are 512 // mb for ma <= 32: mb = 32 gives 16-token tiles.
_TILE16 = [(2, 8, 12, 32, 5)]
_G24 = [(1, 2, 3, 12, 8), (2, 3, 2, 8, 12), (1, 4, 6, 6, 4), (3, 6, 4, 4, 6), (1, 8, 12, 3, 2)]

# name -> (row_adapter, n_adapters, row_tokens, groups, extra Case fields)
CASES = {
    "one_row": ([0], 1, 1, [(1, 8, 8, 8, 8)], {}),
    "one_row_of_many_tokens": ([1], 2, 37, _TILE16, {}),
    "rows_without_adapter": ([-1, 0, -1, 1, -1, 0], 2, 3, [(2, 16, 16, 16, 16)], {}),
    "all_rows_without_adapter": ([-1, -1, -1], 2, 4, [(1, 8, 8, 8, 8)], {}),
    "all_rows_one_adapter": ([2] * 7, 3, 5, _TILE16, {}),
    # Segments of 21, 3, 33, 15 and 18 tokens (and 6 of -1) in 16-token
    # tiles: every segment ends in a partial tile.
    "ragged_segments": (_shuffled({-1: 2, 0: 7, 1: 1, 3: 11, 4: 5, 5: 6}, 0), 6, 3, _TILE16, {}),
    "odd_dims": (_shuffled({0: 4, 1: 3, 2: 5, -1: 1}, 1), 3, 3, [(3, 5, 7, 3, 9)], {}),
    "groups_5": (_shuffled({0: 2, 1: 3, 2: 1, -1: 1}, 2), 3, 2, _G24, {}),
    "hetero_groups": (_shuffled({0: 3, 1: 2}, 3), 2, 2, [(1, 32, 64, 4, 2), (2, 16, 16, 8, 8), (1, 4, 4, 32, 32)], {}),
    "strided_rows": (_shuffled({0: 3, 1: 2, -1: 1}, 4), 2, 2, [(2, 16, 16, 16, 16)], {"x_stride": 256 + 5, "y_stride": 256 + 3}),
    "misaligned": (_shuffled({0: 3, 1: 2, -1: 1}, 5), 2, 2, [(2, 16, 16, 16, 16)], {"offset": 1}),
}


def make_case(name: str, dtype, **kw) -> Case:
    ra, n_adapters, row_tokens, groups, extra = CASES[name]
    return Case("indexed", dtype, len(ra) * row_tokens, groups, row_adapter=ra, n_adapters=n_adapters,
                row_tokens=row_tokens, **{**extra, **kw})


def check(case: Case, binary) -> cuda_sim.Result:
    res = cuda_sim.run(case, binary=binary)
    assert res.verdict == "ok", f"the planner declines {case}: {res.verdict}"
    assert res.result == "cudaSuccess", res.stdout
    diff = cuda_sim.first_difference(case, res)
    assert diff is None, f"{case}\n{diff}\n{res.schedule}\n" + "\n".join(res.launches)
    return res


def expected_tiles(case: Case, tile_tokens: int) -> int:
    """Tiles of the schedule: each adapter's tokens (and those of -1) cut into tile_tokens."""
    counts = {}
    for a in case.row_adapter:
        counts[a] = counts.get(a, 0) + case.row_tokens
    return sum(-(-n // tile_tokens) for n in counts.values())


@pytest.mark.parametrize("dtype", LOW, ids=["f16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_indexed_forward(sim, name, dtype):
    case = make_case(name, dtype)
    res = check(case, sim)
    # One launch of one CTA per tile, tiles never spanning two adapters.
    m = re.match(r"schedule: tile_tokens=(\d+) tiles=(\d+)", res.schedule)
    assert m, res.stdout
    tile_tokens, tiles = int(m[1]), int(m[2])
    assert tiles == expected_tiles(case, tile_tokens)
    assert len(res.launches) == (1 if tiles else 0), res.stdout
    if tiles:
        assert f"grid=({tiles},1,1)" in res.launches[0]


def test_ragged_segments_leave_a_tail_in_every_segment(sim):
    """The case the tail tests rely on: 16-token tiles, no segment a multiple of 16."""
    case = make_case("ragged_segments", torch.bfloat16)
    res = check(case, sim)
    assert "tile_tokens=16 " in res.schedule
    per_adapter = {a: case.row_adapter.count(a) * case.row_tokens for a in set(case.row_adapter)}
    assert all(n % 16 for n in per_adapter.values()), per_adapter


def test_rows_of_one_adapter_do_not_depend_on_the_others(sim):
    """Adapter 0's rows of a mixed batch equal the same rows run alone: the
    factors and gates of the other adapters never reach them."""
    mixed = make_case("ragged_segments", torch.float16)
    alone = Case("indexed", torch.float16, mixed.tokens, mixed.groups,
                 row_adapter=[a if a == 0 else -1 for a in mixed.row_adapter],
                 n_adapters=mixed.n_adapters, row_tokens=mixed.row_tokens)
    r1, r2 = check(mixed, sim), check(alone, sim)
    S = mixed.row_tokens
    for i, a in enumerate(mixed.row_adapter):
        rows = slice(i * S, (i + 1) * S)
        if a == 0:
            assert torch.equal(r1.outputs["y"][rows], r2.outputs["y"][rows])
        else:
            assert torch.equal(r2.outputs["y"][rows], torch.zeros_like(r2.outputs["y"][rows]))


@pytest.mark.parametrize("name", ["ragged_segments", "groups_5", "misaligned"])
def test_schedule_seeds_give_bitwise_equal_outputs(sim, name):
    raws = [check(make_case(name, torch.bfloat16, seed=s), sim).raw["y"] for s in (0, 1, 2)]
    assert raws[0] == raws[1] == raws[2]


@pytest.mark.parametrize("dtype,groups,why", [
    (torch.float32, [(1, 8, 8, 8, 8)], "float16/bfloat16 only"),
    (torch.float64, [(1, 8, 8, 8, 8)], "float16/bfloat16 only"),
    (torch.float16, [(1, 129, 2, 2, 2)], "limit (128)"),
    (torch.float16, [(1, 2, 2, 2, 129)], "limit (128)"),
])
def test_verdicts_at_limits(sim, dtype, groups, why):
    case = Case("indexed", dtype, 3, groups, row_adapter=[0, 1, -1], n_adapters=2)
    res = cuda_sim.run(case, verdict_only=True, binary=sim)
    assert why in res.verdict, res.stdout


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("groups", [_G24, [(1, 128, 128, 128, 128)], [(4, 64, 64, 64, 64)]], ids=["g5", "max128", "64x64r4"])
@pytest.mark.parametrize("rows", [1, 100_000])
def test_accepted_shapes_launch(sim, arch, groups, rows):
    """What the planner accepts launches within the device limits (a dry run:
    the harness puts every row on adapter 0)."""
    case = Case("indexed", torch.bfloat16, rows * 3, groups, row_adapter=[0] * rows, n_adapters=4,
                row_tokens=3, arch=arch)
    res = cuda_sim.run(case, dry_run=True, binary=sim)
    if res.verdict != "ok":
        # Only 128 x 128 factors outgrow sm_80's 163 KB of shared memory (as in v1).
        assert (arch, groups) == ("sm_80", [(1, 128, 128, 128, 128)]), res.stdout
        assert res.result == "cudaErrorNotSupported" and not res.launches, res.stdout
        return
    assert res.result == "cudaSuccess", res.stdout
    assert len(res.launches) == 1 and "result=cudaSuccess" in res.launches[0], res.stdout
