"""bitsandbytes' CPU inference repacking of 4-bit layers, made explicit for the tests.

On CPUs with AVX512-BF16, ``bitsandbytes.nn.Linear4bit`` defaults to
``support_avx512bf16_for_cpu = True`` and repacks its weight into a bf16 inference layout at
its first eval-mode forward without gradients. Tests must not depend on which CPU runs them,
so every test that involves 4-bit layers sets the flag itself (``set_cpu_repack``) and
repacks by calling bitsandbytes' own conversion (``repack_for_cpu_inference``), which is plain
PyTorch and works on any CPU. Only computing *through* the repacked layout needs the
instructions: such tests are marked ``needs_avx512bf16``.
"""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

CPU_HAS_AVX512BF16 = bool(bnb.functional.has_avx512bf16())

needs_avx512bf16 = pytest.mark.skipif(
    not CPU_HAS_AVX512BF16,
    reason="computes through bitsandbytes' repacked CPU layout, whose matmul is an AVX512-BF16 kernel; "
    "this CPU lacks avx512_bf16 (the repacking itself and the rest are tested everywhere)",
)


def set_cpu_repack(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    """Force bitsandbytes' CPU inference repacking on or off for every Linear4bit of ``model``."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = on
    return model


def repack_for_cpu_inference(layer: "bnb.nn.Linear4bit") -> None:
    """What an eval-mode no-grad forward does to a Linear4bit on an AVX512-BF16 CPU, without the forward."""
    w = layer.weight
    w.data, qs = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)
    w.quant_state = layer.quant_state = qs


def is_repacked(layer: "bnb.nn.Linear4bit") -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
