"""The ``moka`` command: ``moka finetune``, ``moka eval``, ``moka merge``, ``moka info``.

Owns argument parsing, the defaults of a run, and how errors reach the user: a bad request
(unknown task, model or method, malformed data line, unwritable output directory, mismatched
checkpoint...) is one ``moka: error: ...`` line on stderr and exit status 2, never a traceback;
Ctrl-C exits with 130 after saving a checkpoint.

The defaults of ``moka finetune`` are a useful run of about ten minutes on a 2-core CPU:
SmolLM2-135M-Instruct in NF4 with a MoKA adapter, trained on ARC-Easy and evaluated on the
ARC-Easy validation questions before and after.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

# Sized for about ten minutes on an idle 2-core CPU with SmolLM2-135M in NF4 + MoKA: a few
# seconds per step at batch 8, and two evaluations of 100 ARC-Easy questions (400 choices each).
# The adapter's CPU kernel dominates both; see docs_main_job.md for measured times.
DEFAULT_MAX_STEPS = 100
DEFAULT_EVAL_LIMIT = 100


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .baselines import METHODS
    from .data import task_names
    from .models import MODEL_NAMES, QUANT_MODES

    tasks = "|".join(task_names())
    p = argparse.ArgumentParser(prog="moka", description="Fine-tune and evaluate LLaMA-family models with MoKA adapters.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{finetune,eval,merge,info}")

    f = sub.add_parser("finetune", help="train an adapter, evaluate before and after",
                       description="Train an adapter and report zero-shot accuracy before and after. "
                                   "Under torchrun, runs data-parallel (DDP).")
    f.add_argument("--model", default="smollm2-135m", help=f"{'|'.join(MODEL_NAMES)}|HF_DIR (default: smollm2-135m)")
    f.add_argument("--quant", default="nf4", choices=QUANT_MODES, help="base weights: bitsandbytes NF4, int8, or unquantized")
    f.add_argument("--method", default="moka", help=f"{'|'.join(METHODS)} (default: moka)")
    f.add_argument("--r", type=_positive_int, default=4, help="MoKA components / LoRA, DoRA, LoKr rank (default: 4)")
    f.add_argument("--no-gating", dest="gating", action="store_false",
                   help="MoKA with fixed, equal mixture weights (the paper's gating-off ablation)")
    f.add_argument("--flops-cap", action="store_true",
                   help="MoKA auto shapes within LoRA r=16's multiply-adds per token at each layer")
    f.add_argument("--task", default="arc_easy", help=f"training data: {tasks}|FILE.jsonl (default: arc_easy)")
    f.add_argument("--hold-out-dev", action="store_true",
                   help="leave each task's dev questions (100 held out of its train split) out of training")
    f.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default: {DEFAULT_MAX_STEPS}, or from --epochs)")
    f.add_argument("--epochs", type=float, default=None, help="passes over the training data (used when --max-steps is not given)")
    f.add_argument("--batch-size", type=_positive_int, default=8, help="examples per micro-batch per process (default: 8)")
    f.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step (default: 1)")
    f.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    f.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps spent warming up (default: 0.1)")
    f.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per example, prompt cut from the left (default: 256)")
    f.add_argument("--eval-task", default=None, help="multiple-choice task scored before and after, or 'none' (default: the training task)")
    f.add_argument("--eval-limit", type=int, default=DEFAULT_EVAL_LIMIT, help=f"first N validation questions, 0 = all (default: {DEFAULT_EVAL_LIMIT})")
    f.add_argument("--output-dir", default=None, help="where metrics.json, loss_curve.png, adapter/ and checkpoint/ go (default: runs/<model>-<method>-<task>-<time>)")
    f.add_argument("--save-steps", type=_positive_int, default=50, help="checkpoint every N steps (default: 50)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    f.add_argument("--bf16", action="store_true", help="bf16 autocast (and bf16 4-bit compute)")

    e = sub.add_parser("eval", help="zero-shot multiple-choice accuracy (acc, acc_norm)",
                       description="Zero-shot log-likelihood multiple-choice accuracy, acc and acc_norm as lm-evaluation-harness computes them.")
    e.add_argument("--model", default="smollm2-135m", help=f"{'|'.join(MODEL_NAMES)}|HF_DIR")
    e.add_argument("--quant", default="nf4", choices=QUANT_MODES)
    e.add_argument("--adapter", default=None, help="an adapter directory (e.g. OUTPUT_DIR/adapter)")
    e.add_argument("--task", default="arc_easy", help="a built-in task's validation split or a multiple-choice FILE.jsonl")
    e.add_argument("--limit", type=int, default=None, help="first N questions (default: all)")
    e.add_argument("--batch-size", type=_positive_int, default=32, help="choices scored per forward pass (default: 32)")
    e.add_argument("--bf16", action="store_true")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    m = sub.add_parser("merge", help="merge a MoKA adapter into its base, write a plain Hugging Face model",
                       description="Load the base model (as it was trained: --quant), add the adapter, and write "
                                   "base + adapter as a plain Hugging Face model directory that transformers loads "
                                   "without moka_ext. The merge is exact in full precision; --requantize writes the "
                                   "merged weights re-quantized like the base instead (smaller, but off by the "
                                   "quantization rounding).")
    m.add_argument("--model", default="smollm2-135m", help=f"{'|'.join(MODEL_NAMES)}|HF_DIR (the adapter's base)")
    m.add_argument("--quant", default="nf4", choices=QUANT_MODES,
                   help="how the base is loaded, as when the adapter was trained (default: nf4)")
    m.add_argument("--adapter", required=True, help="a MoKA adapter directory")
    m.add_argument("--adapter-name", default="default", help="the name of the adapter in the directory (default: default)")
    m.add_argument("--out", required=True, help="the output model directory (must not exist or be empty)")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weight dtype of the full-precision output (default: float32)")
    m.add_argument("--requantize", action="store_true",
                   help="re-quantize the merged weights like the base (--quant nf4/int8; warns)")

    sub.add_parser("info", help="versions, compiled kernels, device")
    return p


# bitsandbytes logs this warning when it is imported on a CPU with AVX512-BF16: it suggests
# the optional package `kernels`, which downloads code from a model hub at run time and which
# moka does not use. Only this one message is dropped; bitsandbytes' other warnings still show.
OPTIONAL_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropOptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(OPTIONAL_KERNEL_NOTICE)


def _drop_optional_kernel_notice() -> None:
    """Install the filter on bitsandbytes' CPU-backend logger (before bitsandbytes is imported)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropOptionalKernelNotice) for f in logger.filters):
        logger.addFilter(_DropOptionalKernelNotice())


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_finetune(args) -> int:
    from .train import FinetuneConfig, finetune

    output_dir = args.output_dir or os.path.join(
        "runs", f"{os.path.basename(os.path.normpath(args.model))}-{args.method}-"
                f"{os.path.splitext(os.path.basename(args.task))[0]}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and args.output_dir is None:
        raise ValueError("--resume needs the --output-dir of the run to continue")
    cfg = FinetuneConfig(
        model=args.model, quant=args.quant, method=args.method, r=args.r, gating=args.gating, flops_cap=args.flops_cap,
        task=args.task, hold_out_dev=args.hold_out_dev,
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup_ratio=args.warmup_ratio, seq_len=args.seq_len,
        eval_task=args.eval_task, eval_limit=args.eval_limit or None, output_dir=output_dir,
        save_steps=args.save_steps, seed=args.seed, resume=args.resume, bf16=args.bf16,
    )
    finetune(cfg, default_steps=DEFAULT_MAX_STEPS)
    return 0


def cmd_eval(args) -> int:
    import torch

    from . import baselines, data, evaluate, models

    data.check_task(args.task, eval_only=True)
    models.check_model_name(args.model)
    questions = data.load_eval_task(args.task, args.limit)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = models.load_model(args.model, args.quant, device, bf16=args.bf16)
    if args.adapter:
        model = baselines.load_method_adapter(model, args.adapter)
        if args.quant == "none":  # bitsandbytes models are placed by device_map and refuse .to()
            model.to(device)
    t0 = time.perf_counter()
    res = evaluate.evaluate(model, tokenizer, questions, batch_size=args.batch_size, bf16=args.bf16, progress=True)
    res.update(task=args.task, model=args.model, quant=args.quant, adapter=args.adapter,
               seconds=round(time.perf_counter() - t0, 1))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.task}: acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}  "
              f"({res['n']} questions, {res['seconds']} s)")
    return 0


def cmd_merge(args) -> int:
    import warnings

    import torch

    import moka_ext
    from moka_ext.layers import base_kind, dense_weight, disable_cpu_inference_repack, plain_linear
    from transformers import AutoModelForCausalLM

    from . import models

    models.check_model_name(args.model)
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise ValueError(f"--out {args.out!r} exists and is not an empty directory")
    if args.requantize and args.quant == "none":
        raise ValueError("--requantize needs a quantized base (--quant nf4 or int8)")
    dtype = getattr(torch, args.dtype)
    path = models.model_dir(args.model)
    qconfig = models.quantization_config(args.quant, torch.float32)
    kwargs = {"dtype": torch.float32}
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map={"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    disable_cpu_inference_repack(model)
    moka_ext.load_adapter(model, args.adapter, adapter_name=args.adapter_name)
    moka_ext.set_adapter(model, args.adapter_name)
    if args.requantize:
        warnings.warn("moka merge --requantize: the merged weights are re-quantized, so the output differs from "
                      "base + adapter by the quantization rounding; leave it out for an exact merge")
        model = moka_ext.merge_and_unload(model)
        model.save_pretrained(args.out)
    else:
        model = moka_ext.merge_and_unload(model, full_precision=True, dtype=dtype)
        # Quantized layers the adapter did not touch become dense too: the output is a plain model.
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and base_kind(child) != "linear":
                    setattr(parent, name, plain_linear(dense_weight(child), child.bias, dtype))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = plain.load_state_dict(
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}, strict=False
        )
        if unexpected or [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {})]:
            raise RuntimeError(f"moka merge: the merged weights do not fit {type(plain).__name__}: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
        if missing:
            plain.tie_weights()
        plain.save_pretrained(args.out)
    try:
        models.load_tokenizer(args.model).save_pretrained(args.out)
    except (OSError, ValueError) as e:  # a base directory without a tokenizer: the model alone
        print(f"moka merge: no tokenizer copied ({e})", file=sys.stderr)
    print(f"moka merge: wrote {args.out} ({'re-quantized ' + args.quant if args.requantize else args.dtype})")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    import moka_ext

    lines = [f"moka_ext {moka_ext.__version__} ({os.path.dirname(moka_ext.__file__)})",
             f"python {platform.python_version()}, torch {torch.__version__}"]
    for mod in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            lines.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # an optional dependency may be missing or broken
            lines.append(f"{mod}: not available ({type(e).__name__})")
    try:
        info = moka_ext.build_info()
        archs = info.get("cuda_archs") or ""
        lines.append("kernels: CPU compiled; CUDA " + (f"compiled for {archs}" if info.get("cuda") else "not compiled (CPU-only build)"))
        lines.append("build: " + ", ".join(f"{k}={v}" for k, v in sorted(info.items())))
    except Exception as e:
        lines.append(f"build: extension not loadable ({e})")
    if torch.cuda.is_available():
        lines.append(f"device: cuda ({torch.cuda.get_device_name()}, {torch.cuda.device_count()} visible)")
    else:
        lines.append(f"device: cpu ({torch.get_num_threads()} threads)")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    _drop_optional_kernel_notice()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "info":
        _quiet_libraries()
    from .baselines import MethodError
    from .data import DataError
    from .models import ModelError
    from .train import RunError

    try:
        return {"finetune": cmd_finetune, "eval": cmd_eval, "merge": cmd_merge, "info": cmd_info}[args.command](args)
    except (DataError, ModelError, MethodError, RunError, ValueError) as e:
        # ValueError also covers the adapter layer's own checks (e.g. shapes that do not factor).
        print(f"moka: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moka: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
