"""Benchmark torch.ops.moka.kron_mix against the two ways people compute it today.

- ``einsum``: the naive per-component reshape-matmul in plain PyTorch
  (``moka_ext.reference.kron_mix_factored``): never builds dW, but writes every
  component's intermediate out and saves it for backward.
- ``dense``: materialize ``dW = sum g_i kron(A_i, B_i)`` and multiply (what
  PEFT's LoKr does every step; ``moka_ext.reference.kron_mix``).

Each cell is the median of repeated runs with the min-max spread. The methods
are timed interleaved, one call each per repeat, so that ratios compare runs
made under the same conditions. Usage:

    python benchmarks/bench_ops.py             # full CPU table (~30 min on 2 cores)
    python benchmarks/bench_ops.py --quick     # < 60 s: the target shape and one SmolLM2 shape
    python benchmarks/bench_ops.py --device cuda --quick
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

import moka_ext
from moka_ext import reference

METHODS = {
    "moka": moka_ext.kron_mix,
    "einsum": reference.kron_mix_factored,
    "dense": reference.kron_mix,
}


@dataclass(frozen=True)
class Shape:
    name: str
    out: int
    inp: int
    ma: int
    na: int

    @property
    def mb(self) -> int:
        return self.out // self.ma

    @property
    def nb(self) -> int:
        return self.inp // self.na


# (out, in) of LLaMA-7B and SmolLM2-135M projections, with one factorization each.
SHAPES = [
    Shape("7B q/k/v/o 4096x4096, 64x64", 4096, 4096, 64, 64),
    Shape("7B gate/up 11008x4096", 11008, 4096, 172, 64),
    Shape("7B down 4096x11008", 4096, 11008, 64, 172),
    Shape("SmolLM2 q/o 576x576", 576, 576, 24, 24),
    Shape("SmolLM2 gate/up 1536x576", 1536, 576, 48, 24),
    Shape("SmolLM2 down 576x1536", 576, 1536, 24, 48),
    Shape("SmolLM2 k/v 192x576", 192, 576, 12, 24),
]


def make_inputs(shape: Shape, r: int, tokens: int, dtype, device):
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()

    x = rnd(tokens, shape.inp)
    A = [rnd(r, shape.ma, shape.na)]
    B = [rnd(r, shape.mb, shape.nb)]
    gates = rnd(r)
    grad_y = torch.randn(tokens, shape.out, generator=g).to(device=device, dtype=dtype)
    return x, A, B, gates, grad_y


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn, inputs, which: str, device: str) -> float:
    """Seconds of one `which` in {fwd, bwd, fwd+bwd}: bwd times only the backward
    of a fresh forward."""
    x, A, B, gates, grad_y = inputs
    sync(device)
    t0 = time.perf_counter()
    if which == "fwd":
        with torch.no_grad():
            fn(x, A, B, gates)
        sync(device)
        return time.perf_counter() - t0
    y = fn(x, A, B, gates)
    sync(device)
    t1 = time.perf_counter()
    torch.autograd.grad(y, [x, *A, *B, gates], grad_y)
    sync(device)
    return time.perf_counter() - (t1 if which == "bwd" else t0)


def time_cell(inputs, which: str, device: str, min_reps: int, max_reps: int,
              budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of every method, interleaved: each repeat times each method
    once, the order rotating, so that a slow spell of the machine falls on all of
    them alike. After one untimed warm-up call each, repeats run until `max_reps`,
    or until `budget_s` is spent once `min_reps` are done."""
    names = list(METHODS)
    for name in names:  # warms caches and allocators
        time_once(METHODS[name], inputs, which, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for rep in range(max_reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(time_once(METHODS[name], inputs, which, device))
        if rep + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    return times


def fmt(ts: list[float]) -> str:
    return f"{1e3 * statistics.median(ts):.2f} [{1e3 * min(ts):.2f}-{1e3 * max(ts):.2f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the target cell and one SmolLM2 shape (< 60 s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", default=None, help="comma list, default '1,<all cores>' on CPU")
    p.add_argument("--shapes", default=None, help="only the shapes whose name contains this text (e.g. 'k/v')")
    p.add_argument("--reps", type=int, default=7, help="repeats per cell at least")
    p.add_argument("--max-reps", type=int, default=60, help="repeats per cell at most")
    p.add_argument("--budget", type=float, default=4.0,
                   help="seconds per cell (all methods) after which no repeat past --reps starts")
    p.add_argument("--output", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))

    if args.quick:
        grid = [(SHAPES[0], 512, 4), (SHAPES[3], 512, 4)]
        passes = ["fwd", "bwd", "fwd+bwd"]
    else:
        grid = [(s, t, r) for s in SHAPES for t in (512, 2048) for r in (1, 4, 8)]
        passes = ["fwd", "bwd", "fwd+bwd"]
    if args.shapes:
        grid = [cell for cell in grid if args.shapes in cell[0].name]
        if not grid:
            raise SystemExit(f"--shapes {args.shapes!r} matches none of: {', '.join(s.name for s in SHAPES)}")
    all_threads = os.cpu_count() or 1
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    elif args.device == "cpu":
        thread_counts = sorted({1, all_threads})
    else:
        thread_counts = [torch.get_num_threads()]
    if args.quick and args.device == "cpu" and not args.threads:
        thread_counts = [1]

    header = (
        f"kron_mix benchmark: device={args.device} dtype={str(dtype).split('.')[-1]} "
        f"torch={torch.__version__} moka_ext={moka_ext.__version__} "
        f"cpu={platform.processor() or platform.machine()} cores={all_threads}\n"
        "times in ms: median [min-max]; speedup = baseline median / moka median\n"
    )
    rows = [
        "| shape | T | r | threads | pass | reps | moka | einsum | dense | vs einsum | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print(header)
    print("\n".join(rows), flush=True)
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for shape, tokens, r in grid:
            inputs = make_inputs(shape, r, tokens, dtype, args.device)
            for which in passes:
                res = time_cell(inputs, which, args.device, args.reps,
                                max(args.reps, args.max_reps), args.budget)
                med = {m: statistics.median(ts) for m, ts in res.items()}
                row = (
                    f"| {shape.name} (A {shape.ma}x{shape.na}, B {shape.mb}x{shape.nb}) | {tokens} | {r} "
                    f"| {threads} | {which} | {len(res['moka'])} | {fmt(res['moka'])} | {fmt(res['einsum'])} | {fmt(res['dense'])} "
                    f"| {med['einsum'] / med['moka']:.2f}x | {med['dense'] / med['moka']:.2f}x |"
                )
                rows.append(row)
                print(row, flush=True)
    if args.output:
        with open(args.output, "w") as f:
            f.write(header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
