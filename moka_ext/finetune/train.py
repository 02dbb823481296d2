"""The fine-tuning loop behind ``moka finetune``.

Owns one run, start to finish, in phases that ``finetune`` composes: ``prepare`` (check the
request before anything is written, fill the caches, load model, data, adapter and optimizer),
``start`` (the accuracy before training, or the checkpoint of a resumed run), ``train_loop``
(AdamW, cosine schedule with warmup, gradient accumulation and clipping, optional bf16 autocast,
the progress bar, checkpoints, Ctrl-C) and ``finish`` (the accuracy after and the outputs).
Multi-process data parallelism is DDP under torchrun (gloo on CPU, nccl on GPU). The outputs of
``--output-dir``:

    metrics.json      trainable_params, loss, accuracy (before/after), throughput,
                      peak_memory, config, ...
    loss_curve.png    training loss per optimizer step
    adapter/          the trained adapter (moka_ext.save_adapter; PEFT format for baselines)
    checkpoint/       the latest checkpoint, what --resume continues from

Exact resume: a checkpoint holds the trainable weights, the optimizer and scheduler states, the
RNG states and the step; the data order is a pure function of (seed, epoch, rank), so the step
alone says where the data stream stands. On CPU a resumed run's losses equal an uninterrupted
run's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from . import baselines, data, evaluate, models

CHECKPOINT = "checkpoint"
# The settings that shape the optimization trajectory: a checkpoint only resumes a run whose
# values are all equal (evaluation settings may change between the two halves).
TRAJECTORY_KEYS = ("model", "quant", "method", "r", "gating", "flops_cap", "dropout", "task", "hold_out_dev",
                   "max_steps", "epochs", "batch_size", "grad_accum", "lr", "warmup_ratio", "weight_decay",
                   "max_grad_norm", "seq_len", "seed", "bf16", "world_size")
# A checkpoint without one of these keys ran with the value given here.
_KEY_DEFAULTS = {"flops_cap": False, "hold_out_dev": False}


class RunError(ValueError):
    """A run that cannot start as asked (bad output directory, mismatched checkpoint...)."""


@dataclasses.dataclass
class FinetuneConfig:
    """Everything one run depends on; metrics.json records it in full."""

    model: str = "smollm2-135m"
    quant: str = "nf4"
    method: str = "moka"
    r: int = 4
    gating: bool = True  # MoKA's softmax gate; False is the paper's gating-off ablation
    # MoKA "auto" shapes under LoRA r=16's multiply-adds per token and layer (MoKAConfig.flops)
    flops_cap: bool = False
    dropout: float = 0.0
    task: str = "arc_easy"
    hold_out_dev: bool = False  # leave the dev split (data.DEV_SIZE questions per task) out of training
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seq_len: int = 256
    eval_task: str | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 32
    output_dir: str = "runs/finetune"
    save_steps: int = 50
    seed: int = 0
    resume: bool = False
    bf16: bool = False
    world_size: int = 1

    def resolved_eval_task(self) -> str | None:
        """Unless told, evaluate on the training task's validation split (ARC-Easy for the mix)."""
        if self.eval_task is not None:
            return None if self.eval_task == "none" else self.eval_task
        if self.task in data.TASKS:
            return self.task
        return "arc_easy" if self.task == data.MIX_TASK else None


# ------------------------------------------------------------- distributed


class Dist:
    """Rank, world size and device of this process; one process when not under torchrun."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world_size > 1
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------ checks


def _probe_writable(path: Path) -> None:
    """Raise RunError unless a file can be created at ``path`` (or in its nearest existing
    ancestor, where the run would create it). Probing beats os.access: root passes access()
    on read-only mounts."""
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise RunError(f"output directory {path}: {probe_dir} exists and is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".moka-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise RunError(f"output directory {path} is not writable: {e.strerror} ({probe_dir})") from None


def _read_checkpoint_state(out: Path) -> dict | None:
    path = out / CHECKPOINT / "trainer_state.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read checkpoint {path}: {e}") from None


def validate(cfg: FinetuneConfig) -> dict | None:
    """Every check that needs no model, before any output exists. Returns the checkpoint state
    to resume from (or None)."""
    if cfg.quant not in models.QUANT_MODES:
        raise models.ModelError(f"unknown quantization {cfg.quant!r}: use one of {', '.join(models.QUANT_MODES)}")
    baselines.check_method(cfg.method, cfg.quant, cfg.gating, cfg.flops_cap)
    models.check_model_name(cfg.model)
    data.check_task(cfg.task)
    if cfg.resolved_eval_task() is not None:
        data.check_task(cfg.resolved_eval_task(), eval_only=True)
    for name in ("r", "batch_size", "grad_accum", "seq_len", "save_steps", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        raise RunError(f"--max-steps must be >= 0, got {cfg.max_steps}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise RunError(f"--epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0:
        raise RunError(f"--lr must be > 0, got {cfg.lr}")
    out = Path(cfg.output_dir)
    _probe_writable(out)
    state = _read_checkpoint_state(out) if out.is_dir() else None
    if cfg.resume:
        if state is None:
            raise RunError(f"--resume: no checkpoint in {out} (expected {out / CHECKPOINT})")
        want = {k: getattr(cfg, k) for k in TRAJECTORY_KEYS}
        have = state.get("config", {})
        have = {**_KEY_DEFAULTS, **have}
        diff = [f"{k}: checkpoint {have.get(k)!r}, now {want[k]!r}" for k in TRAJECTORY_KEYS if have.get(k) != want[k]]
        if diff:
            raise RunError(f"--resume: the checkpoint in {out} is from another configuration ({'; '.join(diff)})")
        return state
    if out.is_dir() and (state is not None or (out / "metrics.json").exists()):
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or choose another --output-dir")
    return None


# ------------------------------------------------------------- data stream


class MicroBatches:
    """The micro-batches of this rank, in an order fixed by (seed, epoch, rank).

    DistributedSampler shards and shuffles each epoch; micro-batch ``m`` of this rank is batch
    ``m % per_epoch`` of epoch ``m // per_epoch``, so resuming at optimizer step ``s`` starts at
    micro-batch ``s * grad_accum`` with nothing else to restore."""

    def __init__(self, dataset, batch_size: int, dist: Dist, seed: int, collator):
        self.dataset, self.batch_size, self.collator = dataset, batch_size, collator
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise RunError(
                f"{len(dataset)} training examples are fewer than one batch "
                f"({batch_size} x {dist.world_size} processes)"
            )
        self._epoch, self._order = None, None

    def __getitem__(self, m: int) -> dict:
        epoch, j = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        idx = self._order[j * self.batch_size : (j + 1) * self.batch_size]
        return self.collator([self.dataset[i] for i in idx])


def total_steps(cfg: FinetuneConfig, n_examples: int, default_steps: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is not None:
        per_step = cfg.batch_size * cfg.grad_accum * cfg.world_size
        return max(1, math.ceil(cfg.epochs * n_examples / per_step))
    return default_steps


# ------------------------------------------------------------ checkpoints


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(tmp: str | Path, is_dir: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions."""
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _publishable(tmp)
    os.replace(tmp, path)


def _replace_dir(staged: Path, target: Path) -> None:
    """Swap a fully written directory into place; the old one is removed only afterwards, so a
    crash leaves either the old or the new checkpoint, never half of one."""
    _publishable(staged, is_dir=True)
    for child in staged.iterdir():
        _publishable(child, is_dir=child.is_dir())
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model) -> dict:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C or SIGTERM arriving inside the block is raised once the block is complete. Around
    a checkpoint write, an interrupt never leaves a half-written or missing checkpoint (or a
    stray staging directory) behind; around a step's update, never weights that are ahead of
    the step count."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            raise KeyboardInterrupt


def save_checkpoint(out: Path, model, optimizer, scheduler, rng_states: list, state: dict) -> None:
    from safetensors.torch import save_file

    with _interrupts_deferred():
        staged = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT}.", dir=out))
        save_file(trainable_state(model), staged / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_states}, staged / "training_state.pt")
        (staged / "trainer_state.json").write_text(json.dumps(state, indent=2))
        _replace_dir(staged, out / CHECKPOINT)


# MoKA parameter names of checkpoints written when a layer held one unnamed adapter
# (``...q_proj.moka_A.0``); a model holds named adapters (``...q_proj.moka_A.default.0``).
_UNNAMED_MOKA_KEY = re.compile(r"\.moka_(A|B)\.(\d+)$|\.moka_gate_logits$")


def _named_adapter_key(key: str) -> str:
    def rename(m):
        return f".moka_{m.group(1)}.default.{m.group(2)}" if m.group(1) else ".moka_gate_logits.default"

    return _UNNAMED_MOKA_KEY.sub(rename, key)


def load_checkpoint(out: Path, model, optimizer, scheduler, rank: int) -> None:
    from safetensors.torch import load_file

    ckpt = out / CHECKPOINT
    weights = load_file(ckpt / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        weights = {_named_adapter_key(k): v for k, v in weights.items()}
    if set(weights) != expected:
        raise RunError(f"--resume: checkpoint {ckpt} holds other trainable tensors than this model "
                       f"({len(set(weights) ^ expected)} differ)")
    with torch.no_grad():
        for n, w in weights.items():
            if params[n].shape != w.shape:
                raise RunError(f"--resume: {n} has shape {tuple(w.shape)} in the checkpoint, {tuple(params[n].shape)} here")
            params[n].copy_(w)
    blob = torch.load(ckpt / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"][rank] if rank < len(blob["rng"]) else blob["rng"][0])


def get_rng_state() -> dict:
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ----------------------------------------------------------------- outputs


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    # ru_maxrss is in KiB on Linux.
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "cpu_max_rss"}


def plot_loss(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    k = max(1, len(losses) // 20)
    if k > 1:
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.8, label=f"mean of last {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    _publishable(tmp)
    os.replace(tmp, path)


def save_final_adapter(model, method: str, out: Path) -> Path:
    target = out / "adapter"
    staged = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    baselines.save_method_adapter(model, method, staged)
    _replace_dir(staged, target)
    return target


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import moka_ext

    out = {"moka_ext": moka_ext.__version__, "torch": torch.__version__}
    for dist_name in ("transformers", "peft", "bitsandbytes"):
        try:
            out[dist_name] = version(dist_name)
        except PackageNotFoundError:  # e.g. a GPU box without bitsandbytes
            out[dist_name] = None
    return out


# --------------------------------------------------------------- the run


def distributed_accuracy(model, tokenizer, questions, dist: Dist, cfg: FinetuneConfig, desc: str) -> dict:
    """acc/acc_norm over all questions, each rank scoring its share."""
    mine = questions[dist.rank :: dist.world_size]
    res = evaluate.evaluate(model, tokenizer, mine, batch_size=cfg.eval_batch_size, bf16=cfg.bf16,
                            progress=dist.main, desc=desc)
    correct, correct_norm, n = dist.sum([res["acc"] * res["n"], res["acc_norm"] * res["n"], res["n"]])
    n = int(round(n))
    return {"acc": round(correct) / n if n else 0.0, "acc_norm": round(correct_norm) / n if n else 0.0, "n": n}


def _say(dist: Dist, msg: str) -> None:
    if dist.main:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _fmt_acc(res: dict) -> str:
    return f"acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}  ({res['n']} questions)"


@dataclasses.dataclass
class Progress:
    """Where training stands: what a checkpoint's trainer_state.json holds and a resume restores."""

    step: int = 0
    losses: list = dataclasses.field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    accuracy_before: dict | None = None

    def state(self, cfg: FinetuneConfig) -> dict:
        return {"step": self.step, "losses": self.losses, "tokens": self.tokens,
                "train_seconds": self.train_seconds, "accuracy_before": self.accuracy_before,
                "config": {k: getattr(cfg, k) for k in TRAJECTORY_KEYS}}

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(step=state["step"], losses=state["losses"], tokens=state["tokens"],
                   train_seconds=state["train_seconds"], accuracy_before=state.get("accuracy_before"))


@dataclasses.dataclass
class Run:
    """One prepared run: the request, the process group and everything training needs."""

    cfg: FinetuneConfig
    dist: Dist
    out: Path
    model: torch.nn.Module
    tokenizer: object
    params: dict  # trainable-parameter counts
    dataset: object
    stream: MicroBatches
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    eval_task: str | None
    questions: list
    wall_start: float

    @property
    def trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def say(self, msg: str) -> None:
        _say(self.dist, msg)


def prepare(cfg: FinetuneConfig, dist: Dist, default_steps: int) -> tuple[Run, dict | None]:
    """Phase 1: check the request, fill the caches, load data, model, adapter and optimizer.
    Returns the run and the checkpoint state to resume from (or None). Writes no output."""
    from transformers import get_cosine_schedule_with_warmup

    resume_state = validate(cfg)
    wall_start = time.perf_counter()
    torch.manual_seed(cfg.seed)

    # Rank 0 fills the caches (model conversion, data extraction) while the others wait:
    # under torch.distributed, transformers' save_pretrained writes only on rank 0.
    # Bad data fails here, before the (slower) model load and before any output.
    eval_task = cfg.resolved_eval_task()

    def load_data():
        records = data.load_task(cfg.task, "train", seed=cfg.seed, hold_out_dev=cfg.hold_out_dev)
        return records, (data.load_eval_task(eval_task, cfg.eval_limit) if eval_task else [])

    if dist.main:
        models.model_dir(cfg.model)
        records, questions = load_data()
    dist.barrier()
    if not dist.main:
        records, questions = load_data()

    model, tokenizer = models.load_model(cfg.model, cfg.quant, dist.device, bf16=cfg.bf16)
    model = baselines.apply_method(model, cfg.method, cfg.r, cfg.quant, cfg.dropout, gating=cfg.gating,
                                   flops_cap=cfg.flops_cap)
    if cfg.quant == "none":  # bitsandbytes models are placed by device_map and refuse .to()
        model.to(dist.device)
    dataset = data.TrainingSet(records, tokenizer, cfg.seq_len)
    stream = MicroBatches(dataset, cfg.batch_size, dist, cfg.seed, data.make_collator(tokenizer))
    steps = total_steps(cfg, len(dataset), default_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * steps), steps)
    run = Run(cfg, dist, Path(cfg.output_dir), model, tokenizer, baselines.trainable_parameters(model), dataset,
              stream, steps, optimizer, scheduler, eval_task, questions, wall_start)
    run.say(f"moka finetune: {cfg.model} ({cfg.quant}) + {cfg.method} r={cfg.r} on {cfg.task} "
            f"({len(dataset)} examples), {steps} steps of {cfg.batch_size} x {cfg.grad_accum} accum"
            f" x {dist.world_size} process(es) on {dist.device}")
    p = run.params
    run.say(f"trainable parameters: {p['trainable']:,} of {p['total']:,} ({100 * p['share']:.3f}%)")
    return run, resume_state


def evaluate_accuracy(run: Run, when: str) -> dict | None:
    """Phases 2 and 4: zero-shot accuracy on the evaluation questions ("before"/"after" training)."""
    if not run.questions:
        return None
    return distributed_accuracy(run.model, run.tokenizer, run.questions, run.dist, run.cfg, f"eval {when}")


def start(run: Run, resume_state: dict | None) -> Progress:
    """Where training begins: the checkpoint's progress on a resume, else step 0 after scoring the
    untrained model."""
    if resume_state is not None:
        load_checkpoint(run.out, run.model, run.optimizer, run.scheduler, run.dist.rank)
        run.say(f"resumed from {run.out / CHECKPOINT} at step {resume_state['step']}")
        return Progress.from_state(resume_state)
    before = evaluate_accuracy(run, "before")
    if before is not None:
        run.say(f"accuracy before ({run.eval_task} validation): {_fmt_acc(before)}")
    return Progress(accuracy_before=before)


def train_loop(run: Run, progress: Progress) -> None:
    """Phase 3: optimizer steps until ``run.steps``, updating ``progress`` in place; checkpoints every
    ``save_steps`` and at the end; Ctrl-C or SIGTERM saves a checkpoint of the last complete step
    and re-raises KeyboardInterrupt."""
    from tqdm.auto import tqdm

    cfg, dist, out = run.cfg, run.dist, run.out
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    trainable = run.trainable
    ddp = model
    if dist.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    def checkpoint(rng_states):
        if dist.main:
            save_checkpoint(out, model, optimizer, scheduler, rng_states, progress.state(cfg))

    # SIGTERM (torchrun stopping its workers, a batch scheduler) is handled like Ctrl-C.
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    model.train()
    # miniters=1: tqdm otherwise learns to skip redraws after a few fast steps, and a slow
    # stretch then looks like a hang.
    start_step = progress.step
    bar = tqdm(total=run.steps, initial=start_step, desc="train", unit="step", disable=not dist.main,
               dynamic_ncols=True, miniters=1)
    rng_at_step = get_rng_state()
    try:
        t_window, tok_window = time.perf_counter(), 0
        while progress.step < run.steps:
            rng_at_step = get_rng_state()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(dist.device) for k, v in run.stream[progress.step * cfg.grad_accum + micro].items()}
                last = micro == cfg.grad_accum - 1
                # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                sync = ddp.no_sync() if dist.enabled and not last else contextlib.nullcontext()
                with sync:
                    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        loss = ddp(**batch).loss / cfg.grad_accum
                    loss.backward()
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            # From the update to the step count an interrupt waits: landing in between, it
            # would leave weights updated by a step that the checkpoint does not count.
            with _interrupts_deferred():
                optimizer.step()
                scheduler.step()
                step_loss, step_tokens = dist.sum([step_loss, float(step_tokens)])
                step_loss /= dist.world_size
                progress.losses.append(step_loss)
                progress.tokens += int(step_tokens)
                progress.train_seconds += time.perf_counter() - t0
                tok_window += step_tokens
                progress.step += 1
                rng_at_step = None  # step complete: the next one begins from the current RNG
            now = time.perf_counter()
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{tok_window / max(now - t_window, 1e-9):.0f}", refresh=False)
            bar.update(1)
            if now - t_window > 30:
                t_window, tok_window = now, 0
            if progress.step % cfg.save_steps == 0 or progress.step == run.steps:
                checkpoint(dist.gather(get_rng_state()))
    except KeyboardInterrupt:
        bar.close()
        # The interrupted step's partial gradients are dropped; the RNG goes back to where
        # that step began, so the resumed run redoes it exactly. (An interrupt between steps,
        # e.g. deferred until a checkpoint was written, keeps the current RNG.)
        if progress.step > start_step:
            rng = rng_at_step if rng_at_step is not None else get_rng_state()
            checkpoint([rng] * dist.world_size)
            run.say(f"interrupted at step {progress.step}/{run.steps}: checkpoint saved in {out / CHECKPOINT}; "
                    f"continue with the same command plus --resume")
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    bar.close()


def finish(run: Run, progress: Progress) -> dict:
    """Phase 4: the accuracy after training, the metrics, and (rank 0) the outputs of --output-dir."""
    cfg, dist, out = run.cfg, run.dist, run.out
    before = progress.accuracy_before
    after = evaluate_accuracy(run, "after")
    if after is not None:
        change = (f"; change acc {after['acc'] - before['acc']:+.4f}, acc_norm {after['acc_norm'] - before['acc_norm']:+.4f}"
                  if before else "")
        run.say(f"accuracy after  ({run.eval_task} validation): {_fmt_acc(after)}{change}")
    losses, train_seconds = progress.losses, progress.train_seconds
    metrics = {
        "trainable_params": run.params["trainable"],
        "total_params": run.params["total"],
        "trainable_share": run.params["share"],
        "steps": run.steps,
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "per_step": losses},
        "accuracy": {"task": run.eval_task, "before": before, "after": after},
        "throughput": {"tokens": progress.tokens, "train_seconds": train_seconds,
                       "tokens_per_s": progress.tokens / train_seconds if train_seconds else None,
                       "steps_per_s": len(losses) / train_seconds if train_seconds else None},
        "peak_memory": peak_memory(dist.device),
        "wall_seconds": time.perf_counter() - run.wall_start,  # of this invocation (a resume counts anew)
        "world_size": dist.world_size,
        "device": str(dist.device),
        "versions": _versions(),
        "config": dataclasses.asdict(cfg),
    }
    if dist.main:
        adapter_dir = save_final_adapter(run.model, cfg.method, out)
        if losses:
            plot_loss(losses, out / "loss_curve.png", f"{cfg.method} r={cfg.r} on {cfg.task} ({cfg.model}, {cfg.quant})")
        _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        run.say(f"wrote {out / 'metrics.json'}, {out / 'loss_curve.png'}, {adapter_dir}/ "
                f"in {metrics['wall_seconds']:.0f} s")
    return metrics


def finetune(cfg: FinetuneConfig, default_steps: int = 100) -> dict:
    """Run one fine-tuning job: prepare, score before, train, score after and write the outputs.
    Returns the metrics (also written to metrics.json by rank 0). A run that fails before its
    first checkpoint leaves no output directory behind."""
    dist = Dist()
    cfg.world_size = dist.world_size
    out = Path(cfg.output_dir)
    created_out = False
    try:
        run, resume_state = prepare(cfg, dist, default_steps)
        progress = start(run, resume_state)
        if dist.main and not out.exists():
            out.mkdir(parents=True)
            created_out = True
        dist.barrier()
        train_loop(run, progress)
        metrics = finish(run, progress)
        dist.barrier()
        return metrics
    except BaseException:
        if created_out and dist.main and not (out / CHECKPOINT).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        dist.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
