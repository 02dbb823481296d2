"""Roofline model of the fused Kronecker-mixture CUDA kernels on an H200, for
v1 (csrc/cuda/kron_mix_fused.cu) and v2 (the forward csrc/cuda/kron_mix_fused_v2.cu,
the factor gradients csrc/cuda/kron_mix_grad_v2.cu), which stands in for
measurements until a GPU run (benchmarks/gpu_check.sh) replaces it.

What comes from where, so that the model cannot flatter itself:
- The launch plans (tokens per tile, tiles, CTAs, ring stages, whether factors
  stay resident, barriers per tile, dynamic shared memory, and the MMAs and
  shared-memory bytes per tile counted by walking the kernels' warp tiling) are
  the kernels' own planners, run on the simulated H200 (132 SMs, 227 KB opt-in)
  through `moka_sim plan` (csrc/cuda/sim/harness.cpp); nothing of the tiling is
  recomputed here.
- CTAs per SM come from the registers and static shared memory that
  `cuobjdump --dump-resource-usage` reports for the built extension's sm_90
  kernels (moka_ext/_C*.so), with the plan's dynamic shared memory. Without a
  built extension the register limit is unknown and is reported as such
  (ctas_per_sm then counts shared memory and threads only).
- The ceilings are stated once, in CEILINGS.

The estimate per kernel launch is
    body = max(HBM, L2, shared memory, tensor core)      if loads overlap compute
         = max(HBM, L2) + max(shared memory, tensor core) otherwise
(loads overlap when the kernel has a ring of >= 2 stages or >= 2 CTAs per SM),
times the load imbalance of the last wave or of the persistent tile split,
plus a barrier drain of BARRIER_CLK per barrier on each SM's sequence of tiles
(divided by the CTAs per SM that hide each other's drains) and LAUNCH_US.
Traffic: HBM counts each tensor once (x, y, base, dY, factors, outputs, the
workspace); L2 counts what the SMs move to and from it (x once per group; for
the factor gradients x and dY as often as the planner's CTAs load each tile;
factors once per CTA that loads them; the workspace).

    python benchmarks/kernel_model.py            # table
    python benchmarks/kernel_model.py --json     # one object per (kernel, version, shape)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python_tests"))
sys.path.insert(0, str(ROOT))

CEILINGS = {
    "hbm_bytes_per_s": 4.3e12,  # H200 device-to-device copy, measured class (4.8 TB/s peak)
    "l2_bytes_per_s": 10e12,  # SM <-> L2, about
    "smem_bytes_per_clk_per_sm": 128,
    "sms": 132,
    "clock_hz": 1.98e9,  # boost clock
    "dense_tc_flops": 790e12,  # bf16 dense tensor peak as the target defines it
    "mma_sync_fraction": 0.6,  # mma.sync reaches 60% of it
    "cublas_gemm_fraction": 0.8,  # large cuBLAS GEMMs (dense dW)
    "regs_per_sm": 65536,
    "smem_per_sm": 233472,  # 228 KB, of which 1 KB is reserved per CTA
    "threads_per_sm": 2048,
    "ctas_per_sm": 32,
}
BARRIER_CLK = 150  # a CTA barrier drains the MMA and shared-memory pipes
LAUNCH_US = 2.0  # launch and ramp of one kernel in a timed loop
ATEN_OP_US = 2.0  # per ATen op of the reshape-matmul path


def _smollm2(out_f: int, in_f: int) -> list:
    from moka_ext.shapes import choose_shapes

    return [(1, *s) for s in choose_shapes(out_f, in_f, 4)]


def shapes() -> dict:
    """name -> (tokens, groups (r, ma, na, mb, nb)); bfloat16 throughout."""
    t = 8192
    return {
        "4096x4096_64x64_r4": (t, [(4, 64, 64, 64, 64)]),
        "4096x4096_64x64_r2": (t, [(2, 64, 64, 64, 64)]),
        "4096x4096_64x64_r1": (t, [(1, 64, 64, 64, 64)]),
        "smollm2_576x576": (t, _smollm2(576, 576)),
        "smollm2_192x576": (t, _smollm2(192, 576)),
        "smollm2_1536x576": (t, _smollm2(1536, 576)),
        "smollm2_576x1536": (t, _smollm2(576, 1536)),
    }


# ------------------------------------------------------------------ inputs


def plans(binary: Path, tokens: int, groups: list) -> dict:
    """{(kernel, version): plan} from the kernels' planners (moka_sim plan);
    "dx" is the forward's plan for the transposed factors, as the op runs it."""
    def run(gs):
        arg = ",".join(":".join(str(v) for v in g) for g in gs)
        proc = subprocess.run([str(binary), "plan", "--dtype", "bf16", "--arch", "sm_90", "--tokens", str(tokens),
                               "--groups", arg], capture_output=True, text=True, check=True)
        return [json.loads(line) for line in proc.stdout.splitlines()]

    out = {(d["kernel"], d["version"]): d for d in run(groups)}
    for d in run([(r, na, ma, nb, mb) for r, ma, na, mb, nb in groups]):
        if d["kernel"] == "fwd":
            out[("dx", d["version"])] = d
    return out


KERNEL_SYMBOL = {
    ("fwd", "v1"): "kron_mix_fused_fwd_kernel",
    ("fwd", "v2"): "kron_mix_fused_fwd_v2_kernel",
    ("grad_factors", "v1"): "kron_mix_grad_factors_kernel",
    ("grad_reduce", "v1"): "kron_mix_grad_reduce_kernel",
    ("grad_factors", "v2"): "kron_mix_grad_factors_v2_kernel",
    ("grad_reduce", "v2"): "kron_mix_grad_reduce_v2_kernel",
    ("grad_gates", "v2"): "kron_mix_grad_gates_v2_kernel",
}
# The backward after dX, per version: the factor-gradient kernels in launch order.
GRAD_KERNELS = {"v1": ("grad_factors", "grad_reduce"), "v2": ("grad_factors", "grad_reduce", "grad_gates")}


def built_extension() -> Path | None:
    hits = sorted((ROOT / "moka_ext").glob("_C*.so"))
    return hits[0] if hits else None


def cuobjdump() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        c = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if c.is_file():
            return str(c)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "cuobjdump").is_file():
            return str(Path(os.environ[var]) / "bin" / "cuobjdump")
    return None


def resource_usage(so: Path | None, arch: str = "sm_90") -> dict:
    """{kernel symbol: {reg, shared, local}} of the bfloat16 instantiations for `arch`."""
    tool = cuobjdump()
    if so is None or tool is None:
        return {}
    text = subprocess.run([tool, "--dump-resource-usage", str(so)], capture_output=True, text=True).stdout
    usage, cur_arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            cur_arch = m.group(1).rstrip("a")
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn and cur_arch == arch and "nv_bfloat16" in fn:
            for sym in KERNEL_SYMBOL.values():
                if re.search(rf"\d{sym}I", fn):
                    usage[sym] = {"reg": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3)),
                                  "local": int(m.group(4))}
    return usage


def ctas_per_sm(plan: dict, usage: dict | None) -> tuple[int, str]:
    c = CEILINGS
    threads = plan["threads"]
    warps = threads // 32
    # The runtime reserves 1 KB of shared memory per CTA; cuobjdump's sm_90
    # static figure already includes it (1024 for a kernel without __shared__).
    reserved = max(usage["shared"] if usage else 0, 1024)
    by_smem = c["smem_per_sm"] // (plan["smem_bytes"] + reserved)
    by_threads = c["threads_per_sm"] // threads
    limits = [by_smem, by_threads, c["ctas_per_sm"]]
    source = "registers and shared memory of the built kernel (cuobjdump)"
    if usage:
        per_warp = math.ceil(usage["reg"] * 32 / 256) * 256
        limits.append((c["regs_per_sm"] // per_warp) // warps)
    else:
        source = "shared memory and threads only: no built kernel to read registers from"
    return max(0, min(limits)), source


# -------------------------------------------------------------------- model


def factor_bytes(groups) -> int:
    return sum(r * (ma * na + mb * nb) * 2 for r, ma, na, mb, nb in groups)


def useful_flops(tokens, groups) -> int:
    return sum(tokens * r * 2 * (mb * nb * na + ma * na * mb) for r, ma, na, mb, nb in groups)


def factor_reads(kernel: str, plan: dict) -> int:
    """How many times a launch reads all the factors: the forward once per CTA
    (resident) or per tile; the factor gradients once per chunk of tiles (its
    CTAs split the factors among them)."""
    if kernel == "grad_factors":
        return plan["chunks"]
    return plan["ctas"] if plan["factor_loads"] == 1 else plan["tiles"]


def traffic(kernel: str, version: str, plan: dict, tokens: int, groups: list) -> tuple[int, int]:
    """(HBM bytes, L2 bytes) of one launch."""
    r_total = sum(g[0] for g in groups)
    n_in = groups[0][2] * groups[0][4]
    n_out = groups[0][1] * groups[0][3]
    G = len(groups)
    F = factor_bytes(groups)
    if kernel == "dx":
        n_in, n_out = n_out, n_in
    if kernel in ("fwd", "dx"):
        hbm = tokens * (n_in + n_out) * 2 + F
        l2 = G * tokens * n_in * 2 + tokens * n_out * 2 + factor_reads(kernel, plan) * F
        return hbm, l2
    ws = plan["workspace_bytes"]
    if kernel == "grad_factors":
        # x and dY from HBM once; through L2 as often as the plan's CTAs load
        # each tile (v1: once per (component, kind); v2: once per unit block
        # and group); each chunk's CTAs load their factors once.
        hbm = tokens * (n_in + n_out) * 2 + F + ws
        l2 = plan["tile_load_bytes"] * plan["tiles"] + factor_reads(kernel, plan) * F + ws
        return hbm, l2
    if kernel == "grad_reduce":  # the partials in; dA, dB out (v1 also reads A for dg)
        return ws + 2 * F, ws + 2 * F
    # grad_gates: the G_A totals and A in.
    return ws + F, ws + F


def model(kernel, version, plan, usage, tokens, groups, shape_name) -> dict:
    c = CEILINGS
    cps, cps_source = ctas_per_sm(plan, usage)
    hbm, l2 = traffic(kernel, version, plan, tokens, groups)
    flops = plan["mma_per_tile"] * plan["tiles"] * 16 * 8 * 16 * 2
    smem = plan["smem_bytes_per_tile"] * plan["tiles"]
    if plan["factor_loads"] == 1 and kernel in ("fwd", "dx"):
        smem += plan["ctas"] * factor_bytes(groups)
    t_hbm = hbm / c["hbm_bytes_per_s"]
    t_l2 = l2 / c["l2_bytes_per_s"]
    t_smem = smem / (c["smem_bytes_per_clk_per_sm"] * c["sms"] * c["clock_hz"])
    t_tc = flops / (c["dense_tc_flops"] * c["mma_sync_fraction"])
    floors = {"hbm": t_hbm, "l2": t_l2, "smem": t_smem, "tensor": t_tc}
    overlapped = plan["stages"] >= 2 or cps >= 2
    body = max(floors.values()) if overlapped else max(t_hbm, t_l2) + max(t_smem, t_tc)
    resident = max(1, min(plan["ctas"], max(cps, 1) * c["sms"]))
    if kernel in ("grad_reduce", "grad_gates"):
        imbalance, tiles_per_sm = 1.0, 0
    elif kernel == "grad_factors" and version == "v2":
        # Chunks of contiguous tiles, all CTAs resident: the longest chunk sets the time.
        per_cta = math.ceil(plan["tiles"] / plan["chunks"]) if plan["chunks"] else 0
        waves = math.ceil(plan["ctas"] / resident)
        imbalance = waves * per_cta * plan["chunks"] / plan["tiles"] if plan["tiles"] else 1.0
        tiles_per_sm = waves * per_cta
    elif plan["factor_loads"] == 1 and kernel in ("fwd", "dx"):
        # Persistent: every CTA walks ceil or floor of tiles / ctas tiles.
        per_cta = math.ceil(plan["tiles"] / plan["ctas"]) if plan["ctas"] else 0
        imbalance = per_cta * plan["ctas"] / plan["tiles"] if plan["tiles"] else 1.0
        tiles_per_sm = per_cta * max(cps, 1)
    else:
        waves = math.ceil(plan["ctas"] / resident)
        imbalance = waves * resident / plan["ctas"] if plan["ctas"] else 1.0
        tiles_per_sm = math.ceil(plan["tiles"] * (plan["ctas"] / max(plan["tiles"], 1)) / c["sms"])
        if kernel == "grad_factors":  # each CTA walks its chunk of tiles
            tiles_per_sm = math.ceil(plan["ctas"] / c["sms"]) * math.ceil(plan["tiles"] / plan["chunks"])
    t_bar = tiles_per_sm * plan["barriers_per_tile"] * BARRIER_CLK / c["clock_hz"] / max(cps, 1)
    est = body * imbalance + t_bar + LAUNCH_US * 1e-6
    bind = max(floors, key=floors.get)
    n_in = groups[0][2] * groups[0][4]
    n_out = groups[0][1] * groups[0][3]
    return {
        "kernel": kernel, "version": version, "shape": shape_name, "tokens": tokens,
        "groups": [list(g) for g in groups],
        "tile_tokens": plan["tile_tokens"], "tiles": plan["tiles"], "ctas": plan["ctas"],
        "stages": plan["stages"], "factors_resident": plan["factor_loads"] == 1,
        "barriers_per_tile": plan["barriers_per_tile"], "smem_bytes": plan["smem_bytes"],
        "regs": usage["reg"] if usage else None, "local_bytes": usage["local"] if usage else None,
        "ctas_per_sm": cps, "ctas_per_sm_source": cps_source,
        "bytes_global": hbm, "bytes_global_per_token": hbm / tokens,
        "bytes_l2": l2, "factor_bytes_read": factor_reads(kernel, plan) * factor_bytes(groups)
        if kernel in ("fwd", "dx", "grad_factors") else None,
        "flops": flops, "useful_flops": useful_flops(tokens, groups) if kernel in ("fwd", "dx") else None,
        "smem_bytes_moved": smem,
        "smem_bytes_per_mma": smem / (plan["mma_per_tile"] * plan["tiles"]) if plan["mma_per_tile"] else None,
        "floors_us": {k: v * 1e6 for k, v in floors.items()}, "binding_floor": bind, "overlapped": overlapped,
        "imbalance": imbalance, "barrier_us": t_bar * 1e6, "est_us": est * 1e6,
        "copy_us": tokens * (n_in + n_out) * 2 / c["hbm_bytes_per_s"] * 1e6,
    }


def cublas_path(tokens, groups, backward: bool) -> float:
    """Seconds of the reshape-matmul path (csrc/kron_mix_matmul.cpp): its ATen
    ops' bytes at copy bandwidth (each einsum materializing one permuted copy
    of its large operand), or its GEMM flops at the cuBLAS fraction, plus a
    fixed cost per op."""
    c = CEILINGS
    n_in = groups[0][2] * groups[0][4]
    n_out = groups[0][1] * groups[0][3]
    T = tokens
    byts, flops, ops = 0, 0, 0
    if not backward:
        byts += T * n_out * 4 * 2 + T * n_out * 6  # zeros(f32), final .to(dtype)
        ops += 2
        for r, ma, na, mb, nb in groups:
            z = T * na * r * mb * 2
            byts += T * n_in * 2 + z  # Z = X B^T
            byts += 2 * z  # permute + reshape copy
            byts += z + T * n_out * 2  # Y = A Z
            byts += T * n_out * (4 + 2 + 4)  # y.add_(Y^T)
            flops += 2 * T * na * nb * r * mb + 2 * ma * r * na * T * mb
            ops += 5
    else:
        byts += T * n_in * 4 * 2 + T * n_in * 6  # gx zeros, final .to
        ops += 2
        for r, ma, na, mb, nb in groups:
            p = T * ma * r * nb * 2
            w = T * r * ma * nb * 2
            byts += T * n_out * 2 + p  # P = dY B
            byts += 3 * p + T * n_in * 2  # G_A einsum (copy of P)
            byts += T * n_in * 2 + w  # W = A X
            byts += 3 * w + T * n_out * 2  # G_B einsum
            byts += 3 * p + T * n_in * (4 + 4 + 4)  # gx einsum + add_
            flops += 5 * 2 * T * ma * nb * r * (mb + na) // 2
            ops += 10
    return max(byts / c["hbm_bytes_per_s"], flops / (c["dense_tc_flops"] * c["cublas_gemm_fraction"])) + ops * ATEN_OP_US * 1e-6


def dense_dw(tokens, groups) -> float:
    c = CEILINGS
    n_in = groups[0][2] * groups[0][4]
    n_out = groups[0][1] * groups[0][3]
    return 2 * tokens * n_in * n_out / (c["dense_tc_flops"] * c["cublas_gemm_fraction"])


def run_all() -> tuple[list, list]:
    import cuda_sim

    binary = cuda_sim.build()
    so = built_extension()
    usage = resource_usage(so)
    rows, summary = [], []
    for name, (tokens, groups) in shapes().items():
        ps = plans(binary, tokens, groups)
        per = {}
        for (kernel, version), plan in sorted(ps.items()):
            if "declined" in plan:
                continue
            sym = KERNEL_SYMBOL[("fwd" if kernel == "dx" else kernel, version)]
            row = model(kernel, version, plan, usage.get(sym), tokens, groups, name)
            rows.append(row)
            per[(kernel, version)] = row
        r_max = max(g[0] for g in groups)
        cub_f, cub_b, dw = cublas_path(tokens, groups, False), cublas_path(tokens, groups, True), dense_dw(tokens, groups)
        for version in ("v1", "v2"):
            if ("fwd", version) not in per:
                continue
            fwd = per[("fwd", version)]["est_us"] * 1e-6
            # The backward: dX by the forward kernel, then the same version's gradient kernels.
            bwd = (per[("dx", version)]["est_us"]
                   + sum(per[(k, version)]["est_us"] for k in GRAD_KERNELS[version])) * 1e-6
            copy = per[("fwd", version)]["copy_us"] * 1e-6
            summary.append({
                "shape": name, "version": version, "fwd_us": fwd * 1e6, "bwd_us": bwd * 1e6,
                "fwd_copy_fraction": copy / fwd, "fwd_vs_cublas": cub_f / fwd, "bwd_vs_cublas": cub_b / bwd,
                "fwd_vs_dense_dw": dw / fwd, "bwd_vs_dense_dw": dw / bwd,
                "cublas_fwd_us": cub_f * 1e6, "cublas_bwd_us": cub_b * 1e6, "dense_dw_us": dw * 1e6,
                "copy_target": 0.8 if r_max <= 2 else 0.7,
                "fwd_binding_floor": per[("fwd", version)]["binding_floor"],
            })
    return rows, summary


# bench_kron's layer name -> this model's shape name prefix (r appended).
BENCH_SHAPES = {"4096x4096 A64x64 B64x64": "4096x4096_64x64_r"}


def compare(log: Path, rows: list, summary: list) -> None:
    """Measured (bench_kron's output, T = 8192) against the model, side by side."""
    est = {(r["shape"], r["kernel"], r["version"]): r["est_us"] for r in rows}
    est.update({(s["shape"], "bwd", s["version"]): s["bwd_us"] for s in summary})
    est.update({(s["shape"], "cublas_fwd", "-"): s["cublas_fwd_us"] for s in summary})
    est.update({(s["shape"], "dense_dw", "-"): s["dense_dw_us"] for s in summary})
    print(f"{'shape':22} {'kernel':10} {'impl':6} {'measured us':>11} {'model us':>9} {'model/meas':>10}")
    for line in log.read_text().splitlines():
        if not line.startswith(("fwd ", "bwd_dx ", "bwd ")):
            continue
        pass_, name, rest = line[:6].strip(), line[7:39].strip(), line[39:].split()
        if name not in BENCH_SHAPES or len(rest) < 4 or rest[1] != "8192":
            continue
        r, impl = int(rest[0]), rest[2]
        shape = BENCH_SHAPES[name] + str(r)
        try:
            ms = float(rest[3])
        except ValueError:
            continue
        kernel = {"fwd": "fwd", "bwd_dx": "dx", "bwd": "bwd"}[pass_]
        key = (shape, "cublas_fwd", "-") if (impl == "cublas" and kernel == "fwd") else (shape, kernel, impl)
        model_us = est.get(key)
        if model_us is None and pass_ == "bwd":
            model_us = est.get((shape, "bwd", "v2"))
        if model_us is None:
            continue
        print(f"{shape:22} {kernel:10} {impl:6} {ms * 1e3:>11.1f} {model_us:>9.1f} {model_us / (ms * 1e3):>10.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per (kernel, version, shape)")
    ap.add_argument("--compare", type=Path, help="bench_kron output: print measured against model")
    a = ap.parse_args(argv)
    rows, summary = run_all()
    if a.compare:
        compare(a.compare, rows, summary)
        return 0
    if a.json:
        for r in rows:
            print(json.dumps(r))
        for s in summary:
            print(json.dumps({"kernel": "summary", **s}))
        return 0
    c = CEILINGS
    print(f"H200 model (model estimate, not a measurement): HBM {c['hbm_bytes_per_s']/1e12} TB/s, "
          f"L2 {c['l2_bytes_per_s']/1e12} TB/s, shared {c['smem_bytes_per_clk_per_sm']} B/clk/SM x {c['sms']} SMs "
          f"at {c['clock_hz']/1e9} GHz, mma.sync {c['mma_sync_fraction']:.0%} of {c['dense_tc_flops']/1e12:.0f} TFLOP/s; "
          f"barrier {BARRIER_CLK} clk, launch {LAUNCH_US} us")
    print(f"{'shape':22} {'kernel':13} {'ver':3} {'tt':>3} {'ctas':>6} {'st':>2} {'res':>3} {'bar':>3} "
          f"{'smemKB':>7} {'reg':>4} {'cta/SM':>6} {'B/tok':>7} {'factMB':>7} {'smB/mma':>7} "
          f"{'hbm':>6} {'l2':>6} {'smem':>6} {'tc':>6} {'est us':>7} bind")
    for r in rows:
        f = r["floors_us"]
        fb = r["factor_bytes_read"]
        print(f"{r['shape']:22} {r['kernel']:13} {r['version']:3} {r['tile_tokens']:>3} {r['ctas']:>6} "
              f"{r['stages']:>2} {'y' if r['factors_resident'] else 'n':>3} {r['barriers_per_tile']:>3} "
              f"{r['smem_bytes']/1024:>7.1f} {str(r['regs']):>4} {r['ctas_per_sm']:>6} "
              f"{r['bytes_global_per_token']:>7.0f} {(fb or 0)/1e6:>7.1f} "
              f"{(r['smem_bytes_per_mma'] or 0):>7.0f} {f['hbm']:>6.1f} {f['l2']:>6.1f} {f['smem']:>6.1f} "
              f"{f['tensor']:>6.1f} {r['est_us']:>7.1f} {r['binding_floor']}")
    print()
    print(f"{'shape':22} {'ver':3} {'fwd us':>7} {'%copy':>6} {'x cuBLAS':>8} {'x dW':>5} "
          f"{'bwd us':>7} {'x cuBLAS':>8} {'x dW':>5}")
    for s in summary:
        print(f"{s['shape']:22} {s['version']:3} {s['fwd_us']:>7.1f} {s['fwd_copy_fraction']:>6.0%} "
              f"{s['fwd_vs_cublas']:>8.1f} {s['fwd_vs_dense_dw']:>5.1f} {s['bwd_us']:>7.1f} "
              f"{s['bwd_vs_cublas']:>8.1f} {s['bwd_vs_dense_dw']:>5.1f}")
    if rows and rows[0]["regs"] is None:
        print("\nno built extension (or no cuobjdump): CTAs per SM count shared memory and threads only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
