"""The ``moka`` command on the tiny model: finetune and eval smoke runs, exact resume after
Ctrl-C, ``moka info``, and every bad-input error (clear message, exit 2, nothing left behind)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from _main_job import TINY_RUN, metrics, run_moka, subprocess_env, use_private_cache, REPO
from moka_ext.finetune import cli

STEPS = ["--max-steps", "6"]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield use_private_cache(tmp_path_factory, mp)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 6-step MoKA run, in-process."""
    out = tmp_path_factory.mktemp("runs") / "a"
    assert cli.main(["finetune", *TINY_RUN, *STEPS, "--save-steps", "2", "--output-dir", str(out)]) == 0
    return out


def test_finetune_writes_every_output(finished_run, capsys):
    m = metrics(finished_run)
    for key in ("trainable_params", "loss", "accuracy", "throughput", "peak_memory", "config"):
        assert key in m
    assert m["trainable_params"] > 0 and len(m["loss"]["per_step"]) == 6
    assert set(m["accuracy"]["before"]) == {"acc", "acc_norm", "n"} and m["accuracy"]["after"]["n"] == 6
    assert m["config"]["method"] == "moka" and m["config"]["model"] == "tiny"
    assert m["throughput"]["tokens_per_s"] > 0 and m["peak_memory"]["bytes"] > 0
    assert (finished_run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (finished_run / "adapter" / "adapter_config.json").exists()
    assert json.loads((finished_run / "checkpoint" / "trainer_state.json").read_text())["step"] == 6


def test_eval_with_the_saved_adapter_reproduces_the_after_accuracy(finished_run, capsys):
    capsys.readouterr()
    assert cli.main(["eval", "--model", "tiny", "--quant", "none", "--adapter", str(finished_run / "adapter"),
                     "--task", "arc_easy", "--limit", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = metrics(finished_run)["accuracy"]["after"]
    assert (res["acc"], res["acc_norm"], res["n"]) == (after["acc"], after["acc_norm"], 6)


def test_ctrl_c_saves_a_checkpoint_and_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    # Long enough that Ctrl-C, sent at the first checkpoint, always lands mid-run (a tiny
    # step takes milliseconds; the 6-step run used elsewhere can finish before the signal).
    steps = ["--max-steps", "150"]
    out = tmp_path / "b"
    args = ["finetune", *TINY_RUN, *steps, "--save-steps", "1", "--output-dir", str(out)]
    # A shell's background job inherits SIGINT ignored, and Python keeps it ignored: give the
    # child Ctrl-C's default so the test does not depend on how it was started.
    proc = subprocess.Popen([sys.executable, "-m", "moka_ext", *args], env=subprocess_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 180
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    step = json.loads(state.read_text())["step"]
    assert proc.returncode == 130, stderr
    assert 1 <= step < 150 and "--resume" in stdout
    assert not (out / "metrics.json").exists()

    assert cli.main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    reference = tmp_path / "uninterrupted"
    assert cli.main(["finetune", *TINY_RUN, *steps, "--save-steps", "50", "--output-dir", str(reference)]) == 0
    resumed, uninterrupted = metrics(out), metrics(reference)
    assert resumed["loss"]["per_step"] == uninterrupted["loss"]["per_step"]
    assert resumed["accuracy"] == uninterrupted["accuracy"]


def test_ctrl_c_during_the_update_is_taken_after_the_step(tmp_path, capsys):
    # Ctrl-C delivered inside optimizer.step() of step 3: the interrupt must wait until the step
    # is counted, or the checkpoint would hold weights one update ahead of its step and the
    # resumed run would drift from the uninterrupted one.
    steps = ["--max-steps", "6"]
    out, reference = tmp_path / "b", tmp_path / "uninterrupted"
    args = ["finetune", *TINY_RUN, *steps, "--save-steps", "1", "--output-dir", str(out)]
    calls = []

    def interrupt_at_step_3(optimizer, args_, kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the update

    handle = register_optimizer_step_post_hook(interrupt_at_step_3)
    try:
        assert cli.main(args) == 130
    finally:
        handle.remove()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert cli.main([*args, "--resume"]) == 0
    assert cli.main(["finetune", *TINY_RUN, *steps, "--save-steps", "50", "--output-dir", str(reference)]) == 0
    assert metrics(out)["loss"]["per_step"] == metrics(reference)["loss"]["per_step"]


def test_info_reports_versions_and_device():
    r = run_moka("info", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "device:" in r.stdout and "build:" in r.stdout


def _fails(argv, capsys, *fragments):
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moka: error: ") and "Traceback" not in err
    for f in fragments:
        assert f in err, err
    return err


@pytest.mark.parametrize("flags,fragment", [
    (["--task", "arc_medium"], "unknown task 'arc_medium'"),
    (["--eval-task", "commonsense"], "unknown task 'commonsense'"),
    (["--model", "llama-9000"], "unknown model 'llama-9000'"),
    (["--method", "adalora"], "unknown method 'adalora'"),
    (["--method", "lokr", "--quant", "nf4"], "--quant none"),
    (["--method", "lora", "--flops-cap"], "--flops-cap does not apply to 'lora'"),
])
def test_unknown_names_fail_before_any_output(tmp_path, capsys, flags, fragment):
    out = tmp_path / "out"
    _fails(["finetune", *TINY_RUN, *STEPS, *flags, "--output-dir", str(out)], capsys, fragment)
    assert not out.exists()


def test_malformed_jsonl_names_its_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"], "gold": 0}\n')
    out = tmp_path / "out"
    _fails(["finetune", *TINY_RUN, *STEPS, "--task", str(data), "--output-dir", str(out)], capsys, f"{data}:2:")
    assert not out.exists()


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _fails(["finetune", *TINY_RUN, *STEPS, "--output-dir", str(blocker / "out")], capsys, "not a directory")


def test_prime_sized_layers_train_with_the_best_valid_factorization(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moka_ext.finetune.models import _tiny_tokenizer

    model_dir = tmp_path / "prime-llama"
    tok = _tiny_tokenizer()
    # 131 is prime: the MLP projections (131 x 64, 64 x 131) have no Kronecker factorization
    # with every factor dimension at least 2; "auto" falls back to 1 x n factors and warns.
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=131, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"a 131 x 64 layer .*best valid factorization"):
        assert cli.main(["finetune", *TINY_RUN, *STEPS, "--model", str(model_dir), "--output-dir", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_resume_refuses_another_configuration_and_a_used_dir(finished_run, capsys):
    before = (finished_run / "checkpoint" / "trainer_state.json").read_text()
    base = ["finetune", *TINY_RUN, *STEPS, "--output-dir", str(finished_run)]
    _fails([*base, "--lr", "5e-3", "--resume"], capsys, "another configuration", "lr: checkpoint 0.01, now 0.005")
    _fails(base, capsys, "already holds a run", "--resume")
    assert (finished_run / "checkpoint" / "trainer_state.json").read_text() == before


def test_hold_out_dev_and_flops_cap_reach_the_run(tmp_path, capsys):
    import moka_ext
    from moka_ext.finetune import models
    from moka_ext.model import moka_layers
    from moka_ext.shapes import choose_shapes

    out = tmp_path / "run"
    assert cli.main(["finetune", *TINY_RUN, "--max-steps", "1", "--eval-task", "none", "--hold-out-dev",
                     "--flops-cap", "--output-dir", str(out)]) == 0
    assert "on arc_easy (2151 examples)" in capsys.readouterr().out  # 2251 less the 100 dev questions
    m = metrics(out)
    assert m["config"]["hold_out_dev"] is True and m["config"]["flops_cap"] is True
    model, _ = models.load_model("tiny", "none")
    model = moka_ext.load_adapter(model, out / "adapter")
    layers = moka_layers(model)
    assert layers and model.moka_configs["default"].flops == "auto"
    for layer in layers.values():
        capped = choose_shapes(layer.out_features, layer.in_features, 4, flops="auto")
        assert sorted(layer.shapes["default"]) == sorted(capped) != sorted(
            choose_shapes(layer.out_features, layer.in_features, 4))


def test_resume_without_checkpoint(tmp_path, capsys):
    _fails(["finetune", *TINY_RUN, *STEPS, "--resume", "--output-dir", str(tmp_path / "none")], capsys, "no checkpoint")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_baselines_learn_in_every_layer_after_a_no_grad_evaluation(tmp_path, capsys, method):
    """QLoRA/QDoRA on the NF4 tiny model through the same loop. The evaluation before training
    runs in eval mode without gradients, which on AVX512-BF16 CPUs would repack the 4-bit weights
    into a layout without autograd; the lowest layer's adapter only learns if input gradients
    still flow through every 4-bit layer above it."""
    from safetensors.torch import load_file

    out = tmp_path / method
    assert cli.main(["finetune", *TINY_RUN, "--quant", "nf4", "--method", method, "--max-steps", "3",
                     "--output-dir", str(out)]) == 0
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    lowest_b = [v for k, v in weights.items() if "layers.0." in k and "lora_B" in k]
    assert lowest_b and all(v.abs().sum() > 0 for v in lowest_b)  # lora_B starts at zero
    capsys.readouterr()
    assert cli.main(["eval", "--model", "tiny", "--quant", "nf4", "--adapter", str(out / "adapter"),
                     "--task", "arc_easy", "--limit", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["acc"] == metrics(out)["accuracy"]["after"]["acc"]


def test_finetune_scores_before_training_as_moka_eval_scores_the_base(tmp_path, capsys, monkeypatch):
    """Before- and after-accuracies go through the same 4-bit numerics as ``moka eval``, on every
    CPU: Linear4bit layers are made to default to bitsandbytes' CPU inference repacking (as on
    AVX512-BF16 CPUs), and the base model's per-choice log-likelihoods must come out the same
    from ``moka finetune``'s evaluation before training and from ``moka eval``."""
    import bitsandbytes.nn.modules as bnb_modules

    from moka_ext.finetune import evaluate

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    calls = []
    real = evaluate.loglikelihoods

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(list(out))
        return out

    monkeypatch.setattr(evaluate, "loglikelihoods", recording)
    out = tmp_path / "run"
    assert cli.main(["finetune", *TINY_RUN, "--quant", "nf4", "--max-steps", "2", "--output-dir", str(out)]) == 0
    before_lls = calls[0]
    capsys.readouterr()
    assert cli.main(["eval", "--model", "tiny", "--quant", "nf4", "--task", "arc_easy", "--limit", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls[-1] == before_lls
    before = metrics(out)["accuracy"]["before"]
    assert (res["acc"], res["acc_norm"], res["n"]) == (before["acc"], before["acc_norm"], before["n"]) == (
        res["acc"], res["acc_norm"], 6)


def test_bitsandbytes_optional_kernel_notice_is_dropped_and_its_other_warnings_kept():
    """bitsandbytes logs a notice about the optional `kernels` package at import on AVX512-BF16
    CPUs; the command drops exactly that record from bitsandbytes' CPU-backend logger."""
    import logging

    cli._drop_optional_kernel_notice()
    cli._drop_optional_kernel_notice()  # idempotent: one filter
    logger = logging.getLogger(cli.BNB_CPU_LOGGER)
    assert sum(isinstance(f, cli._DropOptionalKernelNotice) for f in logger.filters) == 1
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        logger.warning("%s: No module named 'kernels'. Please make sure...", cli.OPTIONAL_KERNEL_NOTICE)
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other bitsandbytes warning"]


def test_moka_command_output_has_no_optional_kernel_notice():
    proc = run_moka("info")
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stdout + proc.stderr


def test_resume_reads_a_checkpoint_with_unnamed_adapter_keys(finished_run, tmp_path):
    """Checkpoints written when a MoKA layer held one unnamed adapter name its tensors
    ``...q_proj.moka_A.0``; --resume maps them onto the named adapter ``default`` (a run in
    progress survives the upgrade). The resumed run's final adapter equals the original's."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "legacy"
    shutil.copytree(finished_run, run)
    ckpt = run / "checkpoint" / "trainable.safetensors"
    named = load_file(ckpt)
    unnamed = {k.replace(".default", ""): v for k, v in named.items()}
    assert set(unnamed) != set(named) and any(k.endswith(".moka_A.0") for k in unnamed)
    save_file(unnamed, ckpt)
    args = ["finetune", *TINY_RUN, *STEPS, "--save-steps", "2", "--output-dir", str(run), "--resume"]
    assert cli.main(args) == 0
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    want = load_file(finished_run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
