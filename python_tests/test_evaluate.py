"""The accuracy evaluator: log-likelihoods and acc/acc_norm on a hand-computed example, and
agreement with the model's own loss on the tiny model."""
import math
from types import SimpleNamespace

import pytest
import torch

from moka_ext.finetune.data import MultipleChoice
from moka_ext.finetune.evaluate import choice_requests, evaluate, loglikelihoods, score_questions


class CharTokenizer:
    """One token per character of a fixed alphabet."""

    alphabet = "qab xy"
    eos_token_id = len(alphabet)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.alphabet.index(c) for c in text]}


class BigramModel(torch.nn.Module):
    """logits[t] = log P(. | token t): log_softmax of them is exactly log P."""

    def __init__(self, probs: dict):
        super().__init__()
        v = len(CharTokenizer.alphabet) + 1
        table = torch.full((v, v), 1e-9)
        for (prev, nxt), p in probs.items():
            table[CharTokenizer.alphabet.index(prev), CharTokenizer.alphabet.index(nxt)] = p
        table /= table.sum(-1, keepdim=True)
        self.logits = torch.nn.Parameter(table.log())
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, cache=None,
                use_cache=False):
        # A bigram needs no past: its cache only has to follow the batch's row selection.
        return SimpleNamespace(logits=self.logits[input_ids[:, -logits_to_keep:]],
                               cache=SimpleNamespace(batch_select_indices=lambda rows: None))


# P(' '|q) = 1/2, P(a|' ') = 1/4, P(b|' ') = 1/2, P(b|b) = 1/4 (the rest of each row elsewhere).
PROBS = {("q", " "): 0.5, ("q", "x"): 0.5, (" ", "a"): 0.25, (" ", "b"): 0.5, (" ", "y"): 0.25,
         ("b", "b"): 0.25, ("b", "y"): 0.75, ("a", "y"): 1.0}


def test_hand_computed_loglikelihoods_and_accuracies():
    tok, model = CharTokenizer(), BigramModel(PROBS)
    # ll(" a") = log 1/2 + log 1/4 = log 1/8; ll(" bb") = log 1/2 + log 1/2 + log 1/4 = log 1/16.
    # acc picks "a" (-2.08 > -2.77); acc_norm picks "bb" (-2.77/2 = -1.39 > -2.08/1).
    q_norm_right = MultipleChoice(("q", "q"), ("a", "bb"), gold=1)
    q_raw_right = MultipleChoice(("q", "q"), ("a", "bb"), gold=0)
    reqs = choice_requests(tok, q_norm_right)
    assert reqs == [([0], [3, 1]), ([0], [3, 2, 2])]
    lls = loglikelihoods(model, reqs, batch_size=1)
    assert lls == pytest.approx([math.log(1 / 8), math.log(1 / 16)], abs=1e-5)
    assert score_questions([lls], [q_norm_right]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert score_questions([lls], [q_raw_right]) == {"acc": 1.0, "acc_norm": 0.0, "n": 1}
    for progress in (False, True):  # the progress bar path scores the same
        both = evaluate(model, tok, [q_norm_right, q_raw_right], batch_size=3, progress=progress)
        assert both == {"acc": 0.5, "acc_norm": 0.5, "n": 2}


def test_trailing_context_space_moves_into_the_continuation():
    # Context "q " and choice "a": the harness scores context "q" and continuation "  a".
    reqs = choice_requests(CharTokenizer(), MultipleChoice(("q ",), ("a",), gold=0))
    assert reqs == [([0], [3, 3, 1])]


def test_ties_go_to_the_first_choice_and_acc_norm_uses_characters():
    q = MultipleChoice(("q",) * 3, ("xx", "y", "yy"), gold=0)
    # Equal raw scores: first wins. Normalized: -2/2 = -1 (xx), -2/1 (y), -2/2 = -1 (yy): first again.
    assert score_questions([[-2.0, -2.0, -2.0]], [q]) == {"acc": 1.0, "acc_norm": 1.0, "n": 1}
    # Length is characters, not tokens: "yy" normalizes by 2.
    assert score_questions([[-4.0, -3.0, -2.5]], [MultipleChoice(("q",) * 3, ("xxxx", "y", "yy"), 2)])["acc"] == 1.0


def test_padding_and_batching_match_the_models_own_loss(tmp_path_factory, monkeypatch):
    from _main_job import use_private_cache
    from moka_ext.finetune import models

    use_private_cache(tmp_path_factory, monkeypatch)
    torch.manual_seed(0)
    model, tok = models.load_model("tiny", "none")
    questions = [MultipleChoice(("Question: why?\nAnswer:",) * 2, ("because", "no reason at all"), 0),
                 MultipleChoice(("Sky color:", "Grass color:"), ("blue", "blue"), 0)]
    reqs = [r for q in questions for r in choice_requests(tok, q)]
    # A one-token continuation (scored by the context pass alone) and a shared context whose
    # continuations have different lengths.
    reqs += [(reqs[0][0], reqs[0][1][:1]), (reqs[0][0], reqs[1][1] + reqs[0][1])]
    for batch_size in (1, 3, 16):  # one context per pass, a context split over passes, all at once
        batched = loglikelihoods(model, reqs, batch_size=batch_size)
        for (ctx, cont), ll in zip(reqs, batched):
            assert ll == pytest.approx(own_loglikelihood(model, ctx, cont), rel=1e-4, abs=1e-4)


def own_loglikelihood(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    labels = ids.clone()
    labels[0, : len(ctx)] = -100
    with torch.no_grad():
        return -model(input_ids=ids, labels=labels).loss.item() * len(cont)  # the loss is a mean


def test_inputs_longer_than_the_window_are_left_truncated(tmp_path_factory, monkeypatch):
    from _main_job import use_private_cache
    from moka_ext.finetune import models

    use_private_cache(tmp_path_factory, monkeypatch)
    torch.manual_seed(0)
    model, _ = models.load_model("tiny", "none")
    gen = torch.Generator().manual_seed(1)
    ctx, cont = torch.randint(0, 100, (12,), generator=gen).tolist(), torch.randint(0, 100, (5,), generator=gen).tolist()
    # Window 8: the harness scores the continuation on the last 8 + 1 tokens, and with a
    # window of 3 only the continuation's last 3 tokens (given the one before them).
    assert loglikelihoods(model, [(ctx, cont)], max_length=8)[0] == pytest.approx(
        own_loglikelihood(model, ctx[-4:], cont), rel=1e-4, abs=1e-4)
    assert loglikelihoods(model, [(ctx, cont)], max_length=3)[0] == pytest.approx(
        own_loglikelihood(model, cont[1:2], cont[2:]), rel=1e-4, abs=1e-4)
