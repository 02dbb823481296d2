"""Benchmark mixed-batch inference: torch.ops.moka.kron_mix_indexed against the per-adapter
grouping path in Python (``moka_ext.ops.kron_mix_indexed_generic``: sort the rows by adapter,
then per adapter gather its rows, one kron_mix call, scatter back), the same math.

Every row of the batch gets one of n adapters (uniformly at random, fixed seed), with the
factor shapes ``shapes="auto"`` picks for the layer (r = 4). Cells: median over repeats and
the min-max spread, methods timed interleaved (one call each per repeat) so that the ratio
compares runs made under the same conditions; forward only (inference). Usage:

    python benchmarks/bench_mixed_batch.py                 # 1 thread, the full table (~1 min)
    python benchmarks/bench_mixed_batch.py --threads 2 --quick
    python benchmarks/bench_mixed_batch.py --device cuda    # bfloat16: the one-launch CUDA kernel

On CUDA the timings bracket each call with torch.cuda.synchronize().
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import moka_ext
from moka_ext.ops import kron_mix_indexed_generic
from moka_ext.shapes import choose_shapes

METHODS = {"indexed": moka_ext.kron_mix_indexed, "grouped": kron_mix_indexed_generic}

# (name, out, in, rows, tokens per row, adapters)
CASES = [
    ("SmolLM2 q/o 576x576, decode", 576, 576, 32, 1, 4),
    ("SmolLM2 q/o 576x576, decode", 576, 576, 32, 1, 16),
    ("SmolLM2 q/o 576x576, prefill", 576, 576, 8, 128, 4),
    ("SmolLM2 up 1536x576, decode", 1536, 576, 32, 1, 8),
    ("7B q 4096x4096, decode", 4096, 4096, 16, 1, 8),
    ("7B q 4096x4096, prefill", 4096, 4096, 4, 64, 4),
]


def inputs(out, inp, rows, seq, n, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    groups: dict = {}
    for s in choose_shapes(out, inp, 4):
        groups[s] = groups.get(s, 0) + 1
    A = [torch.randn(n, r, ma, na, generator=g) / na for (ma, na, mb, nb), r in groups.items()]
    B = [torch.randn(n, r, mb, nb, generator=g) / nb for (ma, na, mb, nb), r in groups.items()]
    gates = torch.softmax(torch.randn(n, 4, generator=g), -1)
    x = torch.randn(rows, seq, inp, generator=g)
    row_adapter = torch.randint(0, n, (rows,), generator=g)
    dev = lambda t: t.to(device, dtype)  # noqa: E731
    return dev(x), row_adapter.to(device), [dev(a) for a in A], [dev(b) for b in B], dev(gates)


def measure(args_, reps, budget_s, sync=lambda: None):
    """Per method: list of seconds, interleaved, until reps or the time budget."""
    times = {k: [] for k in METHODS}
    for f in METHODS.values():  # warm-up
        f(*args_)
    start = time.perf_counter()
    for _ in range(reps):
        for k, f in METHODS.items():
            sync()
            t0 = time.perf_counter()
            f(*args_)
            sync()
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times["indexed"]) >= 5:
            break
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--budget", type=float, default=6.0, help="seconds per cell at most (after 5 reps)")
    p.add_argument("--quick", action="store_true", help="the first two cells only")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    machine = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    print(f"# {time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {str(dtype).removeprefix('torch.')}, forward, r=4 auto shapes")
    print("| layer, phase | rows x tokens | adapters | indexed ms (spread) | grouped ms (spread) | grouped / indexed | reps |")
    print("|---|---|---|---|---|---|---|")
    cases = CASES[:2] if args.quick else CASES
    with torch.inference_mode():
        for name, out, inp, rows, seq, n in cases:
            a = inputs(out, inp, rows, seq, n, device=args.device, dtype=dtype)
            tol = dict(rtol=2e-2, atol=2e-2) if cuda else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(METHODS["indexed"](*a), METHODS["grouped"](*a), **tol)
            t = measure(a, args.reps, args.budget, sync)
            med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            cell = {k: f"{med[k]:.3f} ({min(v) * 1e3:.3f}-{max(v) * 1e3:.3f})" for k, v in t.items()}
            print(f"| {name} | {rows} x {seq} | {n} | {cell['indexed']} | {cell['grouped']} | "
                  f"{med['grouped'] / med['indexed']:.2f}x | {len(t['indexed'])} |")


if __name__ == "__main__":
    main()
