"""The quality study's statistics (benchmarks/quality.py): the paired difference of two runs on
the same questions and its standard error, against numpy on random per-question outcomes, and
the verdict the report prints."""
import importlib.util
import math
import sys

import numpy as np
import pytest

from _main_job import REPO

spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules["quality"] = quality  # dataclasses look their module up there
spec.loader.exec_module(quality)


def fake_scores(rng, p: float, n: int = 200, correlated_with=None) -> dict:
    out = {}
    for t in quality.TASKS:
        if correlated_with is None:
            c = (rng.random(n) < p).astype(int)
        else:  # the same questions right, except a share flipped
            c = np.array(correlated_with[t]["correct"])
            flip = rng.random(n) < p
            c = np.where(flip, 1 - c, c)
        cn = (rng.random(n) < 0.5).astype(int)
        out[t] = {"correct": c.tolist(), "correct_norm": cn.tolist(), "acc": c.mean(), "acc_norm": cn.mean(), "n": n}
    return out


def test_paired_difference_and_standard_error_match_numpy():
    rng = np.random.default_rng(0)
    a = fake_scores(rng, 0.6)
    b = fake_scores(rng, 0.1, correlated_with=a)
    diff, se = quality.paired(a, b)
    d = {t: np.array(a[t]["correct"]) - np.array(b[t]["correct"]) for t in quality.TASKS}
    assert diff == pytest.approx(np.mean([a[t]["acc"] - b[t]["acc"] for t in quality.TASKS]))
    want_se = math.sqrt(sum(np.var(d[t], ddof=1) / len(d[t]) for t in quality.TASKS)) / len(quality.TASKS)
    assert se == pytest.approx(want_se)
    # Pairing pays: the unpaired error of the difference is larger for correlated runs.
    assert se < math.hypot(quality.binomial_se(a), quality.binomial_se(b))
    diff_n, _ = quality.paired(a, b, "acc_norm")
    assert diff_n == pytest.approx(np.mean([a[t]["acc_norm"] - b[t]["acc_norm"] for t in quality.TASKS]))


def test_binomial_standard_error_of_the_average():
    rng = np.random.default_rng(1)
    s = fake_scores(rng, 0.4)
    want = math.sqrt(sum(s[t]["acc"] * (1 - s[t]["acc"]) / s[t]["n"] for t in quality.TASKS)) / len(quality.TASKS)
    assert quality.binomial_se(s) == pytest.approx(want)


def test_compare_over_seeds_and_the_verdict():
    rng = np.random.default_rng(2)
    runs = {"moka": [], "qlora-r4": []}
    for seed in (0, 1, 2):
        b = fake_scores(rng, 0.5, n=500)
        a = fake_scores(rng, 0.01, n=500, correlated_with=b)  # 1% of the answers flipped: same skill
        runs["qlora-r4"].append({"seed": seed, "scores": b})
        runs["moka"].append({"seed": seed, "scores": a})
    c = quality.compare(runs, "moka", "qlora-r4")
    per_seed = [quality.paired(x["scores"], y["scores"])[0] for x, y in zip(runs["moka"], runs["qlora-r4"])]
    assert c["seeds"] == [0, 1, 2] and c["diff"] == pytest.approx(np.mean(per_seed))
    assert c["sd_seeds"] == pytest.approx(np.std(per_seed, ddof=1))
    assert "no difference detectable" in quality.verdict(c, "moka", "qlora-r4", "equal parameters")
    # A run that gets a fifth of the other's wrong answers right is clearly ahead.
    for ra, rb in zip(runs["moka"], runs["qlora-r4"]):
        for t in quality.TASKS:
            wrong = [i for i, x in enumerate(rb["scores"][t]["correct"]) if not x]
            for i in wrong[: len(wrong) // 5]:
                ra["scores"][t]["correct"][i] = 1
    c = quality.compare(runs, "moka", "qlora-r4")
    assert c["diff"] > 0.05 and " is ahead of " in quality.verdict(c, "moka", "qlora-r4", "equal parameters")
    assert quality.compare(runs, "moka", "qlora") is None
    assert "no seed of both" in quality.verdict(None, "moka", "qlora", "the usual QLoRA baseline")
