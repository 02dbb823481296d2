"""The op's time on MoKA's auto shapes with and without the flops cap (CPU).

For each SmolLM2-135M projection shape, ``moka_ext.shapes.choose_shapes`` picks
r=4 components (one per group) without a cap and with ``flops="auto"`` (LoRA
r=16's multiply-adds per token); both adapters are timed on the same random
input, forward alone (no grad) and forward + backward, interleaved one call
each per repeat. Reported: medians with the min-max spread, the multiply-adds
per token of each (``moka_ext.shapes.shape_macs``) and the achieved rate.
It answers whether the cap's cheaper shapes make the op itself faster.

    python benchmarks/bench_flops_cap.py                  # 1 thread, 512 tokens
    python benchmarks/bench_flops_cap.py --threads 2 --tokens 1024
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import moka_ext
from moka_ext.shapes import choose_shapes, shape_macs

LAYERS = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536)}


def adapter(out_f: int, in_f: int, flops, tokens: int):
    shapes = choose_shapes(out_f, in_f, 4, flops=flops)
    A = [torch.randn(1, ma, na, requires_grad=True) for ma, na, mb, nb in shapes]
    B = [torch.randn(1, mb, nb, requires_grad=True) for ma, na, mb, nb in shapes]
    g = torch.full((len(shapes),), 0.25, requires_grad=True)
    x = torch.randn(tokens, in_f, requires_grad=True)
    return shapes, (x, A, B, g)


def forward(args):
    with torch.no_grad():
        moka_ext.kron_mix(*args)


def forward_backward(args):
    moka_ext.kron_mix(*args).sum().backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args(argv)
    if a.threads < 1 or a.tokens < 1 or a.reps < 1:
        ap.error(f"--threads, --tokens and --reps must be >= 1; got {a.threads}, {a.tokens}, {a.reps}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()} tokens={a.tokens} reps={a.reps} torch={torch.__version__}")
    print("| layer | shapes | MACs/token | fwd ms, median [min-max] | fwd GMAC/s | fwd+bwd ms, median [min-max] |")
    print("|---|---|---|---|---|---|")
    for name, (out_f, in_f) in LAYERS.items():
        variants = {label: adapter(out_f, in_f, flops, a.tokens) for label, flops in (("uncapped", None), ("capped", "auto"))}
        times = {(label, kind): [] for label in variants for kind in ("fwd", "fwdbwd")}
        for _ in range(3):  # warm-up
            for _, args in variants.values():
                forward(args)
                forward_backward(args)
        for _ in range(a.reps):
            for label, (_, args) in variants.items():
                for kind, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
                    t0 = time.perf_counter()
                    fn(args)
                    times[(label, kind)].append(time.perf_counter() - t0)
        for label, (shapes, _) in variants.items():
            macs = sum(shape_macs(s) for s in shapes)
            f, fb = times[(label, "fwd")], times[(label, "fwdbwd")]
            rate = macs * a.tokens / statistics.median(f) / 1e9
            print(f"| {name} | {label}: {' '.join('x'.join(map(str, s)) for s in shapes)} | {macs:,} | "
                  f"{statistics.median(f) * 1e3:.3f} [{min(f) * 1e3:.3f}-{max(f) * 1e3:.3f}] | {rate:.1f} | "
                  f"{statistics.median(fb) * 1e3:.3f} [{min(fb) * 1e3:.3f}-{max(fb) * 1e3:.3f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
