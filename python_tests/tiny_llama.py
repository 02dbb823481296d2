"""Tiny random LLaMA models for the adapter tests (no hub: built in-process)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import torch

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 64, 128, 2, 128
N_TARGETS = 7 * LAYERS  # q,k,v,o,gate,up,down per layer


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


@functools.lru_cache(maxsize=1)
def _saved_dir() -> str:
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(llama_config())
    d = tempfile.mkdtemp(prefix="moka_tiny_llama_")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    model.save_pretrained(d)
    return d


def tiny_llama(quant: str | None = None, cpu_repack: bool = False):
    """A fresh copy of the same random tiny LLaMA: full precision, ``"nf4"`` or ``"int8"``.

    ``cpu_repack``: bitsandbytes' CPU inference repacking of the NF4 layers, forced on or off
    (its default follows the CPU; see ``bnb_cpu``), so the model behaves alike on every CPU.
    """
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    kwargs = {"dtype": torch.float32}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quant is not None:
        raise ValueError(quant)
    model = LlamaForCausalLM.from_pretrained(_saved_dir(), device_map="cpu", **kwargs)
    if quant == "nf4":
        from bnb_cpu import set_cpu_repack

        set_cpu_repack(model, cpu_repack)
    return model


def batch(seed: int = 0, b: int = 2, t: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}
