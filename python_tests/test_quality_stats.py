"""The quality study (benchmarks/quality.py): the paired difference of two runs on the same
questions and its standard error, against numpy on random per-question outcomes, the verdict the
report prints, and how a stage resumes from its record."""
import argparse
import importlib.util
import json
import math
import shutil
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


def test_a_stage_resumes_from_its_record_and_rescores_a_lost_training(tmp_path, monkeypatch):
    """The record (committed) outlives the trainer's outputs (another machine): a complete record
    is not trained again; a partial one whose training is gone trains again and drops the old
    scores; a record made with other settings is refused."""
    n = 7
    monkeypatch.setattr(quality, "questions_of", lambda task, split, limit: [None] * n)
    calls = []

    def fake_train(name, seed, lr, steps, work, args):
        calls.append(("train", work.name))
        metrics = {"throughput": {"train_seconds": 2.0 * steps}, "trainable_params": 123, "steps": steps,
                   "device": "cpu", "loss": {"per_step": [1.0] * steps}}
        (work / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    def fake_score(name, rec, work, split, limit, args):
        calls.append(("score", rec.name))
        path = rec / "scores.json"
        scores = json.loads(path.read_text()) if path.exists() else {}
        for t in quality.TASKS:
            scores.setdefault(t, {"correct": [1] * n, "correct_norm": [0] * n, "acc": 1.0, "acc_norm": 0.0,
                                  "n": n, "split": split})
        path.write_text(json.dumps(scores))
        return scores

    monkeypatch.setattr(quality, "train", fake_train)
    monkeypatch.setattr(quality, "score", fake_score)
    args = argparse.Namespace(batch_size=8, seq_len=128)
    dirs = quality.Dirs(tmp_path / "record", tmp_path / "work")
    rel = quality.run_rel("moka", 0)
    meta = quality.stage(dirs, rel, "moka", 0, 3e-3, 10, "validation", 0, args)
    assert calls == [("train", "moka-s0"), ("score", "moka-s0")]
    assert meta["seconds_per_step"] == 2.0 and meta["losses"] == [1.0] * 10
    assert json.loads((dirs.record / rel / "run.json").read_text()) == meta

    calls.clear()  # complete record: nothing runs, with or without the trainer's outputs
    assert quality.stage(dirs, rel, "moka", 0, 3e-3, 10, "validation", 0, args) == meta
    shutil.rmtree(dirs.work)
    assert quality.stage(dirs, rel, "moka", 0, 3e-3, 10, "validation", 0, args) == meta
    assert calls == []

    # Half scored, training gone: train again, and the old half is not mixed with the new scores.
    scores_path = dirs.record / rel / "scores.json"
    scores = json.loads(scores_path.read_text())
    scores_path.write_text(json.dumps({t: scores[t] for t in quality.TASKS[:4]}))
    seen = []
    monkeypatch.setattr(quality, "score", lambda *a, **k: seen.append(scores_path.exists()) or fake_score(*a))
    quality.stage(dirs, rel, "moka", 0, 3e-3, 10, "validation", 0, args)
    assert calls == [("train", "moka-s0"), ("score", "moka-s0")] and seen == [False]

    with pytest.raises(SystemExit, match="--record"):
        quality.stage(dirs, rel, "moka", 0, 1e-3, 10, "validation", 0, args)


def test_the_report_from_a_record_with_and_without_trained_runs(tmp_path, monkeypatch):
    """The report of a record holding only the base model (no parameter axis to plot), then with
    a trained run: tables, verdict and both plots."""
    n = 20
    monkeypatch.setattr(quality, "questions_of", lambda task, split, limit: [None] * n)
    rng = np.random.default_rng(3)
    record = tmp_path / "record"

    def put(name, seed, params, p):
        run = record / quality.run_rel(name, seed)
        run.mkdir(parents=True)
        scores = fake_scores(rng, p, n=n)
        for t in quality.TASKS:
            scores[t]["split"] = "validation"
        meta = {"method": name, "seed": seed, "study": {"lr": 0.0 if params == 0 else 3e-3},
                "trainable_params": params, "seconds_per_step": None if params == 0 else 1.5,
                "losses": [] if params == 0 else list(np.linspace(3, 2, 50))}
        (run / "run.json").write_text(json.dumps(meta))
        (run / "scores.json").write_text(json.dumps(scores))
        return scores

    args = argparse.Namespace(limit=0, probe_steps=100, lrs=[1e-3, 3e-3], dev_limit=0, plot=None)
    base = put("base", 0, 0, 0.4)
    text = quality.report(record, args)
    assert f"{100 * quality.mean_acc(base):.2f}" in text and "no compared method has a scored run" in text
    assert not (record / "accuracy_vs_params.png").exists() and not (record / "loss_curves.png").exists()
    moka = put("moka", 0, 1_171_560, 0.5)
    text = quality.report(record, args)
    assert "| MoKA r=4, auto shapes | 0.003 | 0 | 1,171,560 | 1.50 |" in text
    assert f"{100 * quality.mean_acc(moka):.2f}" in text and "no seed of both is scored yet" in text
    for plot in ("accuracy_vs_params.png", "loss_curves.png"):
        assert (record / plot).stat().st_size > 1000
    assert (record / "quality.md").read_text() == text
