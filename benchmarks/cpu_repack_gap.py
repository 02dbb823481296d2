"""What bitsandbytes' CPU inference repacking changes in a 4-bit model's outputs.

On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` into a bf16 inference layout at
its first eval-mode forward without gradients. moka_ext keeps every 4-bit layer in the
trainable layout instead (``apply_moka``, ``moka eval``, ``moka finetune``), so this script
scores the same questions both ways on the same model and reports the difference in the
per-choice log-likelihoods and in accuracy.

    python benchmarks/cpu_repack_gap.py --task arc_easy --limit 100

Runs only where the CPU has AVX512-BF16 (the repacked layout's matmul needs it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import bitsandbytes as bnb

    from moka_ext.finetune import data, evaluate, models

    if not bnb.functional.has_avx512bf16():
        print("cpu_repack_gap: this CPU has no AVX512-BF16; bitsandbytes does not repack here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    questions = data.load_eval_task(args.task, args.limit)
    model, tok = models.load_model(args.model, "nf4")  # repacking off, as in every moka command
    requests = [r for q in questions for r in evaluate.choice_requests(tok, q)]
    trainable = evaluate.loglikelihoods(model, requests)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    repacked = evaluate.loglikelihoods(model, requests)
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    diff = torch.tensor(repacked, dtype=torch.float64) - torch.tensor(trainable, dtype=torch.float64)

    def score(lls):
        per_q, i = [], 0
        for q in questions:
            per_q.append(lls[i:i + len(q.choices)])
            i += len(q.choices)
        return evaluate.score_questions(per_q, questions)

    out = {
        "model": args.model, "task": args.task, "questions": len(questions), "choices": len(requests),
        "loglik_abs_diff_max": round(diff.abs().max().item(), 4),
        "loglik_abs_diff_median": round(diff.abs().median().item(), 4),
        "loglik_mean_trainable": round(sum(trainable) / len(trainable), 3),
        "trainable_path": score(trainable), "repacked_path": score(repacked),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
