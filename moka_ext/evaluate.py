"""Zero-shot log-likelihood multiple-choice accuracy, as lm-evaluation-harness computes it.

Owns the scoring of :class:`moka_ext.data.MultipleChoice` questions:

- each choice is the continuation ``" " + choice`` of its context; its score is the summed
  log-probability of the continuation tokens given the context (the harness's
  ``loglikelihood`` request: context and continuation are encoded as ``encode(context)`` and
  ``encode(context + continuation)[len(encode(context)):]``, no special tokens, the input left-
  truncated to the model's window);
- ``acc``: the argmax of the summed log-likelihoods is the gold choice;
- ``acc_norm``: the argmax of the log-likelihood divided by the choice's length in characters
  (``len(choice)``, without the delimiter) is the gold choice.

Ties go to the first choice, as ``numpy.argmax`` does in the harness.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .data import MultipleChoice


def choice_requests(tokenizer, question: MultipleChoice) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) per choice."""
    out = []
    for context, choice in zip(question.contexts, question.choices):
        continuation = " " + choice
        # The harness moves trailing context spaces into the continuation, so the word
        # boundary is tokenized the same way whatever the prompt's formatting.
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        ctx_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
        whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
        if not ctx_ids:  # nothing to condition on: start from end-of-text, as the harness does
            ctx_ids, cont_ids = [tokenizer.eos_token_id], whole
        else:
            cont_ids = whole[len(ctx_ids) :]
        out.append((ctx_ids, cont_ids))
    return out


def score_questions(loglikelihoods: Sequence[Sequence[float]], questions: Sequence[MultipleChoice]) -> dict:
    """acc and acc_norm from per-choice summed log-likelihoods (the harness's process_results)."""
    acc = acc_norm = 0
    for lls, q in zip(loglikelihoods, questions, strict=True):
        if len(lls) != len(q.choices):
            raise ValueError(f"{len(lls)} log-likelihoods for {len(q.choices)} choices")
        normed = [ll / len(c) if len(c) else -math.inf for ll, c in zip(lls, q.choices)]
        acc += _argmax(lls) == q.gold
        acc_norm += _argmax(normed) == q.gold
    n = len(questions)
    return {"acc": acc / n if n else 0.0, "acc_norm": acc_norm / n if n else 0.0, "n": n}


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   max_length: int | None = None, bf16: bool = False) -> list[float]:
    """Summed continuation log-probabilities for (context, continuation) token lists."""
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows
    # up on the first batch rather than the last.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = []
            for i in idx:
                ctx, cont = requests[i]
                tokens = (ctx + cont)[-(max_length + 1) :]
                rows.append((tokens[:-1], min(len(cont), len(tokens) - 1)))
            # Left padding puts every continuation at the end of its row, so the (vocabulary-
            # sized) logits are computed for the last `keep` positions only. Positions count
            # from each row's first real token, so padding does not shift RoPE.
            width = max(len(r[0]) for r in rows)
            keep = max(n for _, n in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, (tokens, _) in enumerate(rows):
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, (i, (_, n_cont)) in enumerate(zip(idx, rows)):
                # Input position p predicts token p + 1: the continuation's last n_cont tokens
                # are predicted by the row's last n_cont positions.
                full = requests[i][0] + requests[i][1]
                targets = torch.tensor(full[len(full) - n_cont :], dtype=torch.long)
                out[i] = logprobs[row, keep - n_cont :].gather(-1, targets[:, None]).sum().item()
    finally:
        model.train(was_training)
    return out


def evaluate(model, tokenizer, questions: Sequence[MultipleChoice], batch_size: int = 16,
             bf16: bool = False, progress: bool = False, desc: str = "eval") -> dict:
    """``{"acc", "acc_norm", "n"}`` over ``questions``."""
    requests, owners = [], []
    for qi, q in enumerate(questions):
        for req in choice_requests(tokenizer, q):
            requests.append(req)
            owners.append(qi)
    lls = _with_progress(model, requests, batch_size, bf16, progress, desc)
    per_question = [[] for _ in questions]
    for qi, ll in zip(owners, lls):
        per_question[qi].append(ll)
    return score_questions(per_question, questions)


def _with_progress(model, requests, batch_size, bf16, progress, desc):
    if not progress:
        return loglikelihoods(model, requests, batch_size, bf16=bf16)
    from tqdm.auto import tqdm

    # Chunks of two batches: the longest-first ordering still groups lengths, and the bar moves.
    chunk = batch_size * 2
    out = []
    with tqdm(total=len(requests), desc=desc, unit="choice", leave=False, miniters=1) as bar:
        for s in range(0, len(requests), chunk):
            out += loglikelihoods(model, requests[s : s + chunk], batch_size, bf16=bf16)
            bar.update(len(requests[s : s + chunk]))
    return out
