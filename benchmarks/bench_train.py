"""Training-step speed and peak memory: MoKA against QLoRA, QDoRA, PEFT LoKr and LyCORIS LoKr.

Every method trains the same model on the same fixed batch (random token ids; speed does
not depend on the data) with AdamW; each runs in its own process so that peak memory is
its own. Reported: median step time with min-max spread, tokens/s, and peak memory
(CPU: the process's peak RSS above the RSS right after loading the model; CUDA: peak
allocated bytes). Ratios against QLoRA are taken within one run.

    python benchmarks/bench_train.py                          # CPU: SmolLM2-135M in NF4
    python benchmarks/bench_train.py --device cuda --model llama7b-stack --layers 8 --seq-len 1024

``llama7b-stack`` is a LLaMA-7B-shaped decoder (hidden 4096, intermediate 11008, 32 heads)
with random weights, quantized to NF4, ``--layers`` deep: what fine-tuning a 7B model costs
per layer, without needing its weights.

PEFT's LoKr has no bitsandbytes layer, so it runs on the unquantized model (its row says
so); LyCORIS LoKr runs on the NF4 model in its bypass (reshape) mode.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import torch

class Method(NamedTuple):
    quant: str  # quantization of the base
    label: str
    baseline: str | None  # moka_ext.finetune.baselines method; None: LyCORIS, set up in put_adapter
    r: int | None
    flops_cap: bool = False  # MoKA's auto shapes under LoRA r=16's multiply-adds per token


METHODS = {
    "qlora": Method("nf4", "QLoRA r=16 (PEFT)", "lora", 16),
    "qlora_r4": Method("nf4", "QLoRA r=4 (PEFT)", "lora", 4),
    "moka": Method("nf4", "MoKA r=4, auto shapes", "moka", 4),
    "moka_flops": Method("nf4", "MoKA r=4, LoRA r=16 flops cap", "moka", 4, flops_cap=True),
    "moka_r1": Method("nf4", "MoKA r=1, auto shapes", "moka", 1),
    "mokas": Method("nf4", "MoKAs r=4", "mokas", 4),
    "qdora": Method("nf4", "QDoRA r=16 (PEFT)", "dora", 16),
    "lokr": Method("none", "LoKr r=16 (PEFT, unquantized base: no bnb support)", "lokr", 16),
    "lycoris_lokr": Method("nf4", "LyCORIS LoKr, bypass mode", None, None),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_llama_stack(layers: int, device: str, compute_dtype: torch.dtype):
    """A LLaMA-7B-shaped model with random weights, its linear layers in bitsandbytes NF4."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, use_cache=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(compute_dtype)
    for name, module in list(model.model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(module, child_name, q)
    return model.to(device)


def put_adapter(model, method: str, quant: str):
    if method == "lycoris_lokr":
        from lycoris import LycorisNetwork, create_lycoris

        LycorisNetwork.apply_preset({"target_name": [r".*\.(q|k|v|o|gate|up|down)_proj$"]})
        for p in model.parameters():
            p.requires_grad_(False)
        net = create_lycoris(model, 1.0, linear_dim=10000, linear_alpha=1.0, algo="lokr",
                             factor=8, bypass_mode=True)
        net.apply_to()
        net.to(next(p for p in model.parameters()).device)
        return model, list(net.parameters())
    from moka_ext.finetune.baselines import apply_method

    m = METHODS[method]
    model = apply_method(model, m.baseline, m.r, quant, flops_cap=m.flops_cap)
    return model, [p for p in model.parameters() if p.requires_grad]


def worker(args) -> dict:
    method = args.worker
    quant, label = METHODS[method].quant, METHODS[method].label
    torch.manual_seed(0)
    device = args.device
    compute = torch.bfloat16 if (args.bf16 or device == "cuda") else torch.float32
    if args.model == "llama7b-stack":
        if quant == "none":
            raise SystemExit("the llama7b-stack model is NF4 only")
        model = build_llama_stack(args.layers, device, compute)
        vocab = model.config.vocab_size
    else:
        from moka_ext.finetune.models import load_model

        model, tok = load_model(args.model, quant=quant, device=device, bf16=args.bf16)
        vocab = len(tok)
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_bytes()
    model, params = put_adapter(model, method, quant)
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for step in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16 or device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes() - rss0
    return {
        "method": method, "label": label, "quant": quant, "trainable_params": n_trainable,
        "step_s": times, "tokens_per_step": args.batch_size * args.seq_len, "peak_bytes": peak,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, an HF dir, or llama7b-stack")
    p.add_argument("--layers", type=int, default=8, help="depth of llama7b-stack")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (always on for CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--output", default=None, help="also write the markdown table here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    results = []
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}: use some of {', '.join(METHODS)}")
        cmd = [sys.executable, __file__, "--worker", method] + [a for a in (argv or sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{method}: failed: {err}", flush=True)
            results.append({"method": method, "label": METHODS[method].label, "error": err})
            continue
        results.append(json.loads(line[len("RESULT "):]))
        print(f"{method}: done", flush=True)

    ref = next((r for r in results if r["method"] == "qlora" and "error" not in r), None)
    header = (
        f"training step: device={args.device} model={args.model} batch={args.batch_size}x{args.seq_len} "
        f"steps={args.steps} (after {args.warmup} warm-up) bf16={args.bf16 or args.device == 'cuda'} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}\n"
    )
    rows = ["| method | base | trainable params | step s, median [min-max] | tokens/s | peak MiB | step vs QLoRA | memory vs QLoRA |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['label']} | - | - | failed: {r['error']} | - | - | - | - |")
            continue
        med = statistics.median(r["step_s"])
        vs = f"{med / statistics.median(ref['step_s']):.2f}x" if ref else "-"
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref and ref["peak_bytes"] > 0 else "-"
        rows.append(
            f"| {r['label']} | {r['quant']} | {r['trainable_params']:,} | {med:.3f} [{min(r['step_s']):.3f}-{max(r['step_s']):.3f}] "
            f"| {r['tokens_per_step'] / med:,.0f} | {r['peak_bytes'] / 2**20:,.0f} | {vs} | {mem} |"
        )
    table = header + "\n" + "\n".join(rows) + "\n"
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
