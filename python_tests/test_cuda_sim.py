"""The CUDA kernels of csrc/cuda, executed on the CPU under the SIMT simulator.

Every kernel (fused forward v2 and v1 with and without base, dX through the
transposed factors, the factor-gradient kernels v2 and v1, gate_softmax
forward and backward) runs in float16 and bfloat16 against moka_ext.reference computed in
float64 from the same rounded inputs, under AddressSanitizer and UBSan, with
shuffled schedules and NaN-poisoned shared memory (cuda_sim.py, csrc/cuda/sim/).
Also: the simulator's tensor-core fragment tables against CuTe, its
defect detection and launch limits, and the planners' verdicts at every limit,
each accepted shape launching. `pytest -m cuda_sim` runs exactly these.
"""
from __future__ import annotations

import os
import random
import subprocess

import pytest
import torch

import cuda_sim
from cuda_sim import Case
from moka_ext.shapes import choose_shapes

pytestmark = pytest.mark.cuda_sim

LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def sim():
    return cuda_sim.build()


def check(case: Case, binary) -> cuda_sim.Result:
    res = cuda_sim.run(case, binary=binary)
    assert res.verdict == "ok", f"the planner declines {case}: {res.verdict}"
    assert res.result == "cudaSuccess", res.stdout
    diff = cuda_sim.first_difference(case, res)
    assert diff is None, f"{case}\n{diff}\n" + "\n".join(res.launches)
    return res


def _smollm2(out_f: int, in_f: int) -> list:
    return [(1, *s) for s in choose_shapes(out_f, in_f, 4)]


# Eight different factorizations of a 24 x 24 layer (the two outer products,
# with 1 x 24 and 24 x 1 factors, among them) as eight groups, r from 1 to 3.
_G24 = [(1, 2, 3, 12, 8), (2, 3, 2, 8, 12), (1, 4, 6, 6, 4), (3, 6, 4, 4, 6),
        (1, 8, 12, 3, 2), (2, 12, 8, 2, 3), (1, 1, 24, 24, 1), (1, 24, 1, 1, 24)]

# name -> (tokens, groups, extra Case fields). The fused forward's token tile
# is 512 // mb (at most 8 warps x 64 columns per ma <= 32): tiny (mb = 8) runs
# 64 tokens per CTA, so 67 tokens leave a 3-token tail; the gradient tile is 8.
CASES = {
    "one_token": (1, [(1, 8, 8, 8, 8)], {}),
    "tail_fwd_tile": (67, [(2, 4, 8, 8, 4)], {}),
    "tail_grad_tile": (13, [(2, 16, 16, 16, 16)], {}),
    # 80 gradient jobs: ceil(2 x 132 SMs / 80) = 4 chunks over 5 tiles, so
    # some CTAs sum two tiles in registers.
    "many_components": (40, [(40, 2, 4, 4, 2)], {}),
    "odd_dims": (37, [(3, 5, 7, 3, 9)], {}),
    # 11 tokens x mb = 20: four stage-2 warps, the last with 28 of 64 columns,
    # so warps drift apart by several warp instructions (the simulator keeps
    # warps with equal work in step): a shared buffer reused before every warp
    # is done with it shows here.
    "dims_not_16": (11, [(2, 24, 18, 20, 32)], {}),
    "groups_1": (5, _G24[:1], {}),
    "groups_3_desc": (5, _G24[:3][::-1], {}),
    "groups_5": (5, _G24[:5], {}),
    "groups_8": (5, _G24, {}),
    "groups_8_desc": (5, _G24[::-1], {}),
    "hetero_sizes_asc": (6, [(1, 4, 4, 32, 32), (2, 16, 16, 8, 8), (1, 32, 64, 4, 2)], {}),
    "hetero_sizes_desc": (6, [(1, 32, 64, 4, 2), (2, 16, 16, 8, 8), (1, 4, 4, 32, 32)], {}),
    "strided_rows": (9, [(2, 16, 16, 16, 16)], {"x_stride": 256 + 5, "y_stride": 256 + 3, "base": True}),
    "stride_not_8": (9, [(2, 16, 16, 16, 16)], {"x_stride": 256 + 4, "y_stride": 256 + 4}),
    "misaligned": (9, [(2, 16, 16, 16, 16)], {"offset": 1, "base": True}),
    "aligned_vector": (9, [(2, 16, 16, 16, 16)], {"base": True}),
    "4096_64x64_r4": (3, [(4, 64, 64, 64, 64)], {}),
    # v2 on sm_90: four Zs buffers for five components, so stage 1 runs in
    # batches of 2, 2 and 1 components that alternate between buffer halves.
    "z_batches_2_2_1": (3, [(5, 64, 96, 64, 96)], {}),
    "max_128": (2, [(1, 128, 128, 128, 128)], {}),
    "smollm2_576x576": (5, _smollm2(576, 576), {}),
    "smollm2_192x576": (5, _smollm2(192, 576), {}),
    "smollm2_1536x576": (3, _smollm2(1536, 576), {}),
    "smollm2_576x1536": (3, _smollm2(576, 1536), {}),
}
# The tokens x features of the widest cases make the float64 reference and
# the simulation slow; they run in one dtype each.
ONE_DTYPE = {"4096_64x64_r4": torch.bfloat16, "z_batches_2_2_1": torch.float16, "max_128": torch.float16,
             "smollm2_1536x576": torch.bfloat16, "smollm2_576x1536": torch.float16}


def cases():
    for name in CASES:
        for dtype in LOW:
            if name in ONE_DTYPE and ONE_DTYPE[name] != dtype:
                continue
            yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


def make(op, name, dtype, **kw) -> Case:
    tokens, groups, extra = CASES[name]
    extra = dict(extra)
    if op != "fwd":
        extra.pop("base", None)  # only the forward has an epilogue base
    if op == "grad":
        extra.pop("y_stride", None)  # the gradients are contiguous factors
    return Case(op, dtype, tokens, groups, **{**extra, **kw})


FWD_KERNEL = {"v2": "kron_mix_fused_fwd_v2_kernel", "v1": "kron_mix_fused_fwd_kernel"}


def check_forward(case: Case, binary) -> cuda_sim.Result:
    res = check(case, binary)
    assert [ln.split()[1] for ln in res.launches] == [FWD_KERNEL[case.impl]]
    return res


@pytest.mark.parametrize("impl", ["v2", "v1"])
@pytest.mark.parametrize("name,dtype", list(cases()))
def test_fused_forward(sim, name, dtype, impl):
    check_forward(make("fwd", name, dtype, data_seed=1, impl=impl), sim)


@pytest.mark.parametrize("impl", ["v2", "v1"])
@pytest.mark.parametrize("name,dtype", list(cases()))
def test_dx_through_transposed_factors(sim, name, dtype, impl):
    check_forward(make("dx", name, dtype, data_seed=2, impl=impl), sim)


# The v2 forward is persistent: grid = min(tiles, SMs), each CTA walks tiles
# blockIdx.x + n * gridDim.x through a 3-stage ring. 128 x 128 outputs give
# one token per tile, so 269 tokens are 2 or 3 tiles per CTA on 132 SMs (the
# ring wraps), and 113 tokens on sm_80's 108 SMs give five CTAs two tiles of
# two groups each (four ring items). One group's output tile is written into
# the ring stage of its x and out of it after the next item's first barrier,
# before that stage is refilled: 344 tokens on 108 SMs give 20 CTAs a fourth
# tile, whose x goes into the stage of the first tile's output; x rows with a
# stride not a multiple of 8 are staged by plain stores, which land at once
# (cp.async copies land at the wait that retires them).
PERSISTENT = {
    "one_group_base": (269, [(1, 128, 8, 128, 8)], {"base": True}),
    "ring_refill_sm80": (344, [(1, 128, 8, 128, 8)], {"x_stride": 64 + 3, "arch": "sm_80"}),
    "two_groups_sm80": (113, [(1, 128, 8, 128, 8), (1, 128, 16, 128, 4)], {"base": True, "arch": "sm_80"}),
    "unaligned_sm80": (111, [(1, 128, 3, 128, 5)], {"offset": 1, "arch": "sm_80"}),
}


@pytest.mark.parametrize("name", list(PERSISTENT))
def test_fused_forward_v2_walks_several_tiles_per_cta(sim, name):
    tokens, groups, extra = PERSISTENT[name]
    case = Case("fwd", torch.bfloat16, tokens, groups, data_seed=6, impl="v2", **extra)
    res = check_forward(case, sim)
    grid = int(res.launches[0].split("grid=(")[1].split(",")[0])
    assert grid < tokens, res.launches


GRAD_KERNELS = {
    "v2": ["kron_mix_grad_factors_v2_kernel", "kron_mix_grad_reduce_v2_kernel", "kron_mix_grad_gates_v2_kernel"],
    "v1": ["kron_mix_grad_factors_kernel", "kron_mix_grad_reduce_kernel"],
}


def check_gradients(case: Case, binary) -> cuda_sim.Result:
    res = check(case, binary)
    assert [ln.split()[1] for ln in res.launches] == GRAD_KERNELS[case.impl]
    return res


@pytest.mark.parametrize("impl", ["v2", "v1"])
@pytest.mark.parametrize("name,dtype", list(cases()))
def test_factor_gradients_and_reduce(sim, name, dtype, impl):
    check_gradients(make("grad", name, dtype, data_seed=3, impl=impl), sim)


# The v2 factor gradients: grid (chunks, unit blocks), chunk c walks a
# contiguous range of token tiles through the ring. 128 x 8 factors give
# four units (two replicas each) and a 2-token tile on sm_80 (163 KB), so 400
# tokens are 200 tiles on 108 SMs: chunks of one and two tiles; the scalar
# path (offset 1) stages the same. Five 128 x 16 / 16 x 128 components are
# 20 units: three unit blocks, each streaming the tile for its components.
GRAD_PERSISTENT = {
    "replicas_sm80": (400, [(1, 128, 8, 128, 8)], {"arch": "sm_80"}),
    "unaligned_sm80": (400, [(1, 128, 8, 128, 8)], {"arch": "sm_80", "offset": 1}),
    "unit_blocks": (33, [(5, 128, 16, 16, 128)], {}),
    "two_groups_blocks": (29, [(3, 64, 64, 64, 64), (2, 32, 128, 128, 32)], {}),
}


@pytest.mark.parametrize("name", list(GRAD_PERSISTENT))
def test_factor_gradients_v2_walk_tiles_and_unit_blocks(sim, name):
    tokens, groups, extra = GRAD_PERSISTENT[name]
    case = Case("grad", torch.float16, tokens, groups, data_seed=7, impl="v2", **extra)
    res = check_gradients(case, sim)
    grid = res.launches[0].split("grid=(")[1].split(")")[0].split(",")
    assert int(grid[0]) * int(grid[1]) <= {"sm_80": 108, "sm_90": 132}[case.arch], res.launches
    if name.endswith("sm80"):
        assert int(grid[0]) < tokens // 2, res.launches  # chunks of several tiles
    else:
        assert int(grid[1]) > 1, res.launches  # several unit blocks


def random_case(op: str, seed: int) -> Case:
    """A random problem within the fused kernels' limits: 1 to 4 groups that
    factor the same layer differently, any dims, any token count."""
    rng = random.Random(seed)
    ma, mb, na, nb = (rng.randint(1, 24) for _ in range(4))
    out_f, in_f = ma * mb, na * nb

    def divisors(n):
        return [d for d in range(1, n + 1) if n % d == 0 and d <= 128 and n // d <= 128]

    groups = [(rng.randint(1, 3), ma, na, mb, nb)]
    for _ in range(rng.randint(0, 3)):
        a, b = rng.choice(divisors(out_f)), rng.choice(divisors(in_f))
        groups.append((rng.randint(1, 3), a, b, out_f // a, in_f // b))
    dtype = rng.choice(LOW)
    return Case(op, dtype, rng.randint(1, 70), groups, offset=rng.choice([0, 0, 1]), seed=seed, data_seed=seed)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("op", ["fwd", "dx", "grad"])
def test_random_shapes(sim, op, seed):
    check(random_case(op, 1000 + seed), sim)


def test_forward_without_and_with_base_differ_by_base(sim):
    # The base epilogue adds base exactly once (the reference check above
    # bounds it; this pins that a dropped base cannot hide in the tolerance).
    c0 = make("fwd", "aligned_vector", torch.float16, data_seed=4, base=False)
    c1 = make("fwd", "aligned_vector", torch.float16, data_seed=4, base=True)
    r0, r1 = check(c0, sim), check(c1, sim)
    base = cuda_sim.make_inputs(c1)["base"]
    diff = (r1.outputs["y"] - r0.outputs["y"] - base).abs()
    assert diff.max() <= 2 * torch.finfo(torch.float16).eps * (r1.bounds["y"]).max()


@pytest.mark.parametrize("op,impl", [("fwd", "v2"), ("fwd", "v1"), ("grad", "v2"), ("grad", "v1")])
@pytest.mark.parametrize("name", ["tail_fwd_tile", "many_components", "groups_5", "misaligned"])
def test_schedule_seeds_give_bitwise_equal_outputs(sim, op, impl, name):
    raws = []
    for seed in (0, 1, 2):
        res = check(make(op, name, torch.bfloat16, seed=seed, data_seed=5, impl=impl), sim)
        raws.append(res.raw)
    assert raws[0] == raws[1] == raws[2]


# ------------------------------------------------------------ gate softmax


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rows,n", [(1, 1), (1, 4), (9, 5), (17, 33), (8, 70)])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_gate_softmax(sim, dtype, rows, n, backward):
    got, expected, bound, out = cuda_sim.run_softmax(
        dtype, rows, n, 0.7, backward, data_seed=rows * 100 + n, binary=sim)
    # The 16-bit types accumulate in float32 and round the output once; float32
    # and float64 accumulate in their own type over <= 70 terms.
    eps = torch.finfo(dtype).eps
    tol = 2 * eps if dtype.itemsize == 2 else 8 * eps
    # Below the normal range the spacing of representable values is fixed.
    floor = torch.finfo(dtype).smallest_normal * eps
    bad = ~((got - expected).abs() <= tol * bound + floor)
    assert not bad.any(), f"{out}\nexpected {expected[bad][:4].tolist()}, got {got[bad][:4].tolist()}"
    assert "gate_softmax" in out


def test_gate_softmax_nan_row_is_nan(sim, tmp_path):
    logits = torch.zeros(3, 5, dtype=torch.float32)
    logits[1, 3] = float("nan")
    (tmp_path / "logits.bin").write_bytes(logits.numpy().tobytes())
    subprocess.run([str(sim), "softmax_fwd", "--dir", str(tmp_path), "--dtype", "f32", "--rows", "3",
                    "--n", "5"], check=True, capture_output=True, env={**os.environ, **cuda_sim.RUN_ENV})
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32).view(3, 5)
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()
    torch.testing.assert_close(out[0], torch.full((5,), 0.2))


# ------------------------------------------------------------ the simulator


def test_fragment_tables_match_cute():
    if cuda_sim.cutlass_include() is None:
        pytest.skip("nvidia-cutlass (requirements.txt) is not installed")
    proc = subprocess.run([str(cuda_sim.build_cute_check())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("fragments match") == 2
    assert proc.stdout.count("ldmatrix sources match") == 6


def _asm_blocks(text: str) -> list[tuple[str, str, str]]:
    """(C++ function head, PTX text, operand constraints) of each asm statement."""
    import re

    out = []
    for m in re.finditer(r"asm volatile\(((?:\s*\"[^\"]*\")+)\s*((?::[^;]*)?)\);", text):
        head = text[: m.start()].rsplit("__device__ inline", 1)[-1].split("{")[0]
        ptx = "".join(re.findall(r"\"([^\"]*)\"", m.group(1)))
        out.append((head, ptx, m.group(2)))
    return out


def test_ptx_text_agrees_with_its_simulated_model():
    """The PTX of csrc/cuda/ptx.cuh names the types and operands its simulated
    branch models: mma's operand types follow the C++ element type, D and C are
    the same four float registers, and each operand list has the PTX's count."""
    import re

    text = (cuda_sim.CUDA_DIR / "ptx.cuh").read_text()
    blocks = _asm_blocks(text)
    mma = [(h, p, c) for h, p, c in blocks if p.startswith("mma.sync")]
    assert len(mma) == 2
    for head, ptx, cons in mma:
        elem = "bf16" if "__nv_bfloat16" in head else "f16"
        assert f"m16n8k16.row.col.f32.{elem}.{elem}.f32 " in ptx, (head, ptx)
        groups = re.findall(r"\{([^}]*)\}", ptx)
        assert [len(g.split(",")) for g in groups] == [4, 4, 2, 4], ptx
        assert groups[0] == groups[3], "C must be the D registers (accumulate in place)"
        assert cons.count('"+f"') == 4 and cons.count('"r"') == 6, cons
    ld = [(h, p, c) for h, p, c in blocks if p.startswith("ldmatrix")]
    assert len(ld) == 3
    for head, ptx, cons in ld:
        n = int(re.search(r"\.x(\d)", ptx).group(1))
        assert ("trans" in head) == (".trans" in ptx), (head, ptx)
        assert f"(&r)[{n}]" in head and cons.count('"=r"') == n, (head, ptx, cons)
        assert len(re.search(r"\{([^}]*)\}", ptx).group(1).split(",")) == n


def _selftest(sim, name, seed=0):
    return subprocess.run([str(sim), "selftest", "--name", name, "--seed", str(seed)], capture_output=True,
                          text=True, env={**os.environ, **cuda_sim.RUN_ENV})


@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", "different __syncthreads"),
    ("exit_before_barrier", "exited threads never reach"),
    ("partial_warp_shuffle", "warp collective is missing lanes"),
    ("divergent_mma", "while other lanes are at mma.sync"),
    ("smem_overrun", "heap-buffer-overflow"),
    ("global_overrun", "heap-buffer-overflow"),
    ("misaligned_vector_load", "misaligned address"),
])
def test_simulator_reports_defects(sim, name, message):
    proc = _selftest(sim, name)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]


def _out(stdout: str) -> list[str]:
    return stdout.split("out:")[1].split("\n")[0].split()


def test_ldmatrix_model_gives_the_mma_fragments(sim):
    # One warp loads A, B and transposed-A fragments with ldmatrix and with
    # plain loads in the fragments.h layout: no lane sees a difference.
    vals = _out(_selftest(sim, "ldmatrix_fragment").stdout)
    assert vals[:32] == ["0"] * 32


def test_cp_async_lands_at_its_wait(sim):
    vals = _out(_selftest(sim, "cp_async").stdout)
    # Read before the wait: the poison; after it: the source (1, 2, 3, 4).
    assert all(v == "-nan" for v in vals[0:128:2])
    assert vals[1:128:2] == ["1", "2", "3", "4"] * 16
    proc = _selftest(sim, "cp_async_never_waited")
    assert proc.returncode != 0 and "never waited for" in proc.stderr


def test_simulator_poisons_shared_memory_and_shuffles_schedules(sim):
    out = _selftest(sim, "uninitialized_smem").stdout
    assert "out:" in out and set(out.split("out:")[1].split("\n")[0].split()) == {"-nan"}
    # A missing barrier: some reads see the poison, and which ones depends on the seed.
    runs = [_selftest(sim, "missing_barrier", seed).stdout.split("out:")[1].split("\n")[0] for seed in (0, 1, 2)]
    assert all("nan" in r for r in runs) and len(set(runs)) == 3


def _limits(sim, arch, grid="1", block="32", smem=0, opt_in=None):
    args = [str(sim), "limits", "--arch", arch, "--grid", grid, "--block", block, "--smem", str(smem)]
    if opt_in is not None:
        args += ["--opt-in", str(opt_in)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **cuda_sim.RUN_ENV})
    lines = dict(ln.split(": ", 1) for ln in proc.stdout.splitlines() if ": " in ln and not ln.startswith("launch"))
    return lines.get("opt-in"), lines["result"]


OPT_IN = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_simulator_launch_limits(sim, arch):
    ok, bad_cfg, bad_val = "cudaSuccess", "cudaErrorInvalidConfiguration", "cudaErrorInvalidValue"
    assert _limits(sim, arch, block="1024")[1] == ok
    assert _limits(sim, arch, block="1025")[1] == bad_cfg
    assert _limits(sim, arch, block="32,32")[1] == ok
    assert _limits(sim, arch, block="1,1,65")[1] == bad_cfg
    assert _limits(sim, arch, grid="1,65535")[1] == ok
    assert _limits(sim, arch, grid="1,65536")[1] == bad_cfg
    assert _limits(sim, arch, grid="1,1,65536")[1] == bad_cfg
    assert _limits(sim, arch, smem=48 * 1024)[1] == ok
    assert _limits(sim, arch, smem=48 * 1024 + 1)[1] == bad_val
    limit = OPT_IN[arch]
    assert _limits(sim, arch, smem=limit, opt_in=limit) == (ok, ok)
    assert _limits(sim, arch, smem=limit, opt_in=limit - 16) == (ok, bad_val)
    assert _limits(sim, arch, smem=limit + 1, opt_in=limit + 1) == (bad_val, bad_val)


# ------------------------------------------------------------ planner verdicts


def verdict(sim, op, groups, dtype=torch.bfloat16, tokens=5, arch="sm_90", dry_run=False, impl="auto"):
    case = Case(op, dtype, tokens, groups, arch=arch, impl=impl)
    res = cuda_sim.run(case, binary=sim, dry_run=dry_run, verdict_only=not dry_run)
    return res


@pytest.mark.parametrize("op", ["fwd", "grad"])
def test_verdicts_at_factor_limits(sim, op):
    for dim in range(4):
        for size, ok in ((128, True), (129, False)):
            shape = [2, 2, 2, 2]
            shape[dim] = size
            res = verdict(sim, op, [(1, *shape)])
            if ok:
                assert res.verdict == "ok", (shape, res.verdict)
            else:
                assert "limit (128)" in res.verdict, (shape, res.verdict)
    for dtype in (torch.float32, torch.float64):
        assert "float16/bfloat16" in verdict(sim, op, [(1, 4, 4, 4, 4)], dtype=dtype).verdict
    assert verdict(sim, op, _G24).verdict == "ok"  # 8 groups


def test_verdict_shared_memory_per_arch(sim):
    # One 128 x 128 x 128 x 128 component needs about 203 KB at one token.
    res90 = verdict(sim, "fwd", [(1, 128, 128, 128, 128)], tokens=1, arch="sm_90", dry_run=True)
    assert res90.verdict == "ok" and res90.result == "cudaSuccess"
    smem = int(res90.launches[0].split("smem=")[1].split()[0])
    assert OPT_IN["sm_80"] < smem <= OPT_IN["sm_90"]
    res80 = verdict(sim, "fwd", [(1, 128, 128, 128, 128)], tokens=1, arch="sm_80")
    assert "shared memory" in res80.verdict


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("op,impl", [("fwd", "v2"), ("fwd", "v1"), ("fwd", "auto"), ("grad", "v2"), ("grad", "v1"),
                                     ("grad", "auto")])
@pytest.mark.parametrize("name", ["groups_8", "4096_64x64_r4", "max_128", "smollm2_576x1536", "hetero_sizes_asc"])
@pytest.mark.parametrize("tokens", [1, 7, 100_000])
def test_accepted_shapes_launch(sim, arch, op, impl, name, tokens):
    """Verdict/launch consistency: a shape the planner accepts must launch."""
    groups = CASES[name][1]
    res = verdict(sim, op, groups, tokens=tokens, arch=arch, dry_run=True, impl=impl)
    if res.verdict == "ok":
        assert res.result == "cudaSuccess", res.stdout
    else:
        assert res.result == "cudaErrorNotSupported", res.stdout


def test_gradient_grid_rows_limit(sim):
    # v1: one grid row per (component, kind): 2 x 32767 = 65534 rows fit
    # grid.y, 2 x 32768 do not, and the planner must decline (so that the op
    # falls back to the reshape-matmul path) instead of accepting a failing launch.
    res = verdict(sim, "grad", [(32767, 1, 2, 1, 2)], tokens=3, dry_run=True, impl="v1")
    assert res.verdict == "ok" and res.result == "cudaSuccess", res.stdout
    res = verdict(sim, "grad", [(32768, 1, 2, 1, 2)], tokens=3, dry_run=True, impl="v1")
    assert "32767" in res.verdict and res.result == "cudaErrorNotSupported", res.stdout
    res = verdict(sim, "grad", [(16384, 1, 2, 1, 2), (16384, 2, 1, 1, 2)], tokens=3, dry_run=True, impl="v1")
    assert "32767" in res.verdict, res.stdout
    # v2: grid.y = blocks of 8 units (two per small component): 65535 x 8
    # units fit, one more does not; auto then takes v1, which declines too.
    most = 65535 * 8 // 2
    res = verdict(sim, "grad", [(most, 1, 2, 1, 2)], tokens=3, dry_run=True, impl="v2")
    assert res.verdict == "ok" and res.result == "cudaSuccess" and ",65535,1)" in res.launches[0], res.stdout
    res = verdict(sim, "grad", [(most + 1, 1, 2, 1, 2)], tokens=3, dry_run=True, impl="v2")
    assert "grid" in res.verdict and res.result == "cudaErrorNotSupported", res.stdout
    res = verdict(sim, "grad", [(32768, 1, 2, 1, 2)], tokens=3, dry_run=True)
    assert res.verdict == "ok" and res.launches[0].split()[1] == GRAD_KERNELS["v2"][0], res.stdout


def test_forward_grid_token_limit(sim):
    # v1, 4 x 8 factors: 512 // 8 = 64 tokens per CTA, grid.x <= 2**31 - 1.
    most = (2**31 - 1) * 64
    res = verdict(sim, "fwd", [(1, 4, 8, 8, 4)], tokens=most, dry_run=True, impl="v1")
    assert res.verdict == "ok" and res.result == "cudaSuccess", res.stdout
    res = verdict(sim, "fwd", [(1, 4, 8, 8, 4)], tokens=most + 1, dry_run=True, impl="v1")
    assert "too many tokens" in res.verdict and res.result == "cudaErrorNotSupported", res.stdout
    # v2 is persistent: one CTA per SM whatever the token count.
    for arch, sms in (("sm_90", 132), ("sm_80", 108)):
        res = verdict(sim, "fwd", [(1, 4, 8, 8, 4)], tokens=4 * most, dry_run=True, impl="v2", arch=arch)
        assert res.verdict == "ok" and f"grid=({sms},1,1)" in res.launches[0], res.stdout


def test_v2_declines_what_does_not_stay_resident_and_auto_takes_v1(sim):
    # 16 components of 64 x 64 (each 2 x 64 x 72 x 2 B = 18 KB) are 295 KB of
    # factors: v2 declines, the default forward runs v1.
    groups = [(16, 64, 64, 64, 64)]
    assert "do not fit" in verdict(sim, "fwd", groups, impl="v2").verdict
    res = verdict(sim, "fwd", groups, dry_run=True)
    assert res.verdict == "ok" and res.launches[0].split()[1] == FWD_KERNEL["v1"], res.stdout
    res = verdict(sim, "fwd", CASES["4096_64x64_r4"][1], dry_run=True)
    assert res.launches[0].split()[1] == FWD_KERNEL["v2"], res.stdout
