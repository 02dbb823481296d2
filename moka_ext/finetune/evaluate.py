"""Zero-shot log-likelihood multiple-choice accuracy, as lm-evaluation-harness computes it.

Owns the scoring of :class:`moka_ext.finetune.data.MultipleChoice` questions:

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
from typing import Callable, Sequence

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


def score_questions(loglikelihoods: Sequence[Sequence[float]], questions: Sequence[MultipleChoice],
                    per_question: bool = False) -> dict:
    """acc and acc_norm from per-choice summed log-likelihoods (the harness's process_results);
    with ``per_question``, also ``correct`` and ``correct_norm``: 0/1 per question, in order
    (what a paired comparison of two models on the same questions needs)."""
    correct, correct_norm = [], []
    for lls, q in zip(loglikelihoods, questions, strict=True):
        if len(lls) != len(q.choices):
            raise ValueError(f"{len(lls)} log-likelihoods for {len(q.choices)} choices")
        normed = [ll / len(c) if len(c) else -math.inf for ll, c in zip(lls, q.choices)]
        correct.append(int(_argmax(lls) == q.gold))
        correct_norm.append(int(_argmax(normed) == q.gold))
    n = len(questions)
    out = {"acc": sum(correct) / n if n else 0.0, "acc_norm": sum(correct_norm) / n if n else 0.0, "n": n}
    if per_question:
        out.update(correct=correct, correct_norm=correct_norm)
    return out


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   max_length: int | None = None, bf16: bool = False,
                   on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Summed continuation log-probabilities for (context, continuation) token lists.

    Requests with the same context (the choices of one question) share one forward pass over
    it: the context runs once with the key/value cache on, its last position scores each
    continuation's first token, and the continuations (all but their last token) then run on
    the cache, copied once per continuation. ``batch_size`` bounds the continuations per pass;
    ``on_batch(n)`` is called after each pass with the number of requests it scored.
    """
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    # The harness scores (ctx + cont)[-(max_length + 1):] and at most its last len - 1 tokens;
    # that is the request (the tokens before the scored ones, the scored ones).
    scored = []
    for ctx, cont in requests:
        tokens = (ctx + cont)[-(max_length + 1) :]
        n = min(len(cont), len(tokens) - 1)
        scored.append((tuple(tokens[: len(tokens) - n]), tokens[len(tokens) - n :]))
    by_context: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(scored):
        by_context.setdefault(ctx, []).append(i)
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows
    # up on the first batch rather than the last.
    contexts = sorted(by_context, key=lambda c: -len(c) - max(len(scored[i][1]) for i in by_context[c]))
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(contexts):
            batch, n_requests = [], 0
            while start < len(contexts) and (not batch or n_requests + len(by_context[contexts[start]]) <= batch_size):
                batch.append(contexts[start])
                n_requests += len(by_context[contexts[start]])
                start += 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                _score_batch(model, device, batch, [by_context[c] for c in batch], scored, out)
            if on_batch is not None:
                on_batch(n_requests)
    finally:
        model.train(was_training)
    return out


def _padded(rows: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``rows``, padded to the longest on the left or the right."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, tokens in enumerate(rows):
        span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        ids[r, span] = torch.tensor(tokens, dtype=torch.long)
        mask[r, span] = 1
    return ids, mask


def _score_batch(model, device, contexts, members, scored, out) -> None:
    """Adds the log-likelihoods of the requests ``members[k]`` sharing ``contexts[k]`` to ``out``."""
    # Context pass. Left padding puts each context's last token in the last column, so only
    # that column's (vocabulary-sized) logits are computed. Positions count from each row's
    # first real token, so padding does not shift RoPE.
    ids, mask = _padded(contexts, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(res.logits[:, -1].float(), dim=-1).cpu()
    rows, tails = [], []  # per continuation longer than one token: its context's row, its tokens
    for row, idx in enumerate(members):
        for i in idx:
            cont = scored[i][1]
            out[i] = first[row, cont[0]].item()
            if len(cont) > 1:
                rows.append(row)
                tails.append(i)
    if not tails:
        return
    # Continuation pass: each continuation but its last token, right-padded (the padding comes
    # after every real token, so causal attention never sees it), on its context's cache.
    cache = res.cache
    select = torch.tensor(rows, device=device)
    cache.batch_select_indices(select)
    conts = [scored[i][1] for i in tails]
    cids, cmask = _padded([c[:-1] for c in conts], left=False)
    cpos = mask.sum(-1)[rows, None] + torch.arange(cids.shape[1])
    res = model(input_ids=cids.to(device), attention_mask=torch.cat([mask[rows], cmask], dim=1).to(device),
                position_ids=cpos.to(device), cache=cache, use_cache=True)
    logprobs = torch.log_softmax(res.logits.float(), dim=-1).cpu()
    for r, (i, cont) in enumerate(zip(tails, conts)):
        # Position p of the continuation pass predicts continuation token p + 1.
        targets = torch.tensor(cont[1:], dtype=torch.long)
        out[i] += logprobs[r, : len(cont) - 1].gather(-1, targets[:, None]).sum().item()


def evaluate(model, tokenizer, questions: Sequence[MultipleChoice], batch_size: int = 16,
             bf16: bool = False, progress: bool = False, desc: str = "eval", per_question: bool = False) -> dict:
    """``{"acc", "acc_norm", "n"}`` over ``questions`` (and per question, see :func:`score_questions`)."""
    requests, owners = [], []
    for qi, q in enumerate(questions):
        for req in choice_requests(tokenizer, q):
            requests.append(req)
            owners.append(qi)
    if progress:
        from tqdm.auto import tqdm

        with tqdm(total=len(requests), desc=desc, unit="choice", leave=False, miniters=1) as bar:
            lls = loglikelihoods(model, requests, batch_size, bf16=bf16, on_batch=bar.update)
    else:
        lls = loglikelihoods(model, requests, batch_size, bf16=bf16)
    lls_per_question = [[] for _ in questions]
    for qi, ll in zip(owners, lls):
        lls_per_question[qi].append(ll)
    return score_questions(lls_per_question, questions, per_question)
