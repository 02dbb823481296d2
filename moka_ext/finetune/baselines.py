"""The adapters MoKA is compared against, built with PEFT, and the one function that puts any
method (MoKA or a baseline) on a model.

``lora`` is LoRA (QLoRA on a 4-bit/8-bit model), ``dora`` is DoRA (QDoRA), ``lokr`` is PEFT's
LoKr. PEFT's LoKr materializes ``kron(w1, w2)`` in every forward and has no bitsandbytes layer,
so it cannot wrap a quantized model; asking for it there is an error that says so (run it with
``--quant none``) rather than a silent change of the experiment.
"""
from __future__ import annotations

METHODS = ("moka", "mokas", "lora", "dora", "lokr")
PEFT_METHODS = ("lora", "dora", "lokr")
# LLaMA's projections; the same set MoKAConfig targets by default, so comparisons are like for like.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class MethodError(ValueError):
    """An adapter method that does not exist or cannot be applied to this model."""


def check_method(method: str, quant: str, gating: bool = True, flops_cap: bool = False) -> None:
    """Fail before loading anything for a method/quantization pair that cannot work."""
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not gating and method not in ("moka", "mokas"):
        raise MethodError(f"gating is a MoKA setting; --no-gating does not apply to {method!r}")
    if flops_cap and method not in ("moka", "mokas"):
        raise MethodError(f"the multiply-add cap is a MoKA shape setting; --flops-cap does not apply to {method!r}")
    if method == "lokr" and quant != "none":
        raise MethodError(
            "PEFT LoKr cannot wrap bitsandbytes quantized layers (it builds the dense kron(w1, w2) "
            f"and has no Linear4bit/Linear8bitLt support); run --method lokr with --quant none (got --quant {quant})"
        )


def peft_config(method: str, r: int, dropout: float = 0.0):
    from peft import LoKrConfig, LoraConfig, TaskType

    if method in ("lora", "dora"):
        # alpha = 2r: the common QLoRA setting, scale 2 independent of r.
        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=LLAMA_TARGETS,
                          use_dora=method == "dora", task_type=TaskType.CAUSAL_LM)
    if method == "lokr":
        return LoKrConfig(r=r, alpha=2 * r, target_modules=LLAMA_TARGETS, task_type=TaskType.CAUSAL_LM)
    raise MethodError(f"{method!r} is not a PEFT baseline ({', '.join(PEFT_METHODS)})")


def apply_method(model, method: str, r: int, quant: str, dropout: float = 0.0, gating: bool = True,
                 flops_cap: bool = False):
    """The model with a fresh trainable adapter of ``method``; the base is frozen. MoKA only:
    ``gating`` False fixes the mixture weights, the paper's gating-off ablation; ``flops_cap``
    True picks the auto shapes under LoRA r=16's multiply-adds per token at each layer
    (``MoKAConfig(flops="auto")``)."""
    check_method(method, quant, gating, flops_cap)
    if method in ("moka", "mokas"):
        import moka_ext

        config = moka_ext.MoKAConfig(r=r, variant=method, dropout=dropout, gating=gating,
                                     flops="auto" if flops_cap else None)
        try:
            return moka_ext.apply_moka(model, config)
        except ValueError as e:  # e.g. a layer shape that does not factor
            raise MethodError(f"cannot put a {method} adapter on this model: {e}") from e
    from peft import get_peft_model

    return get_peft_model(model, peft_config(method, r, dropout))


def trainable_parameters(model) -> dict:
    """``{"trainable", "total", "share"}`` for any method (MoKA's report, or counted for PEFT)."""
    import moka_ext

    return moka_ext.trainable_parameters(model)


def save_method_adapter(model, method: str, directory) -> None:
    """MoKA through moka_ext.save_adapter; baselines in PEFT's own format."""
    if method in ("moka", "mokas"):
        import moka_ext

        moka_ext.save_adapter(model, directory)
    else:
        model.save_pretrained(directory)


def load_method_adapter(model, directory):
    """Put a saved adapter (either format, told apart by its config file) on ``model``."""
    import json
    from pathlib import Path

    directory = Path(directory)
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.exists():
        raise MethodError(f"{directory} has no adapter_config.json (not an adapter directory)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") in ("LORA", "LOKR"):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, directory)
    import moka_ext

    return moka_ext.load_adapter(model, directory)
