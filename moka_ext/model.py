"""Model-level MoKA: patching a model, the parameter report, merging and unloading.

Owns: which modules of a model a ``MoKAConfig`` targets (PEFT's matching
rules), the plan of what each targeted module becomes (``plan_moka``, also
what ``load_adapter`` validates a file against before touching a model),
``apply_moka``, ``trainable_parameters``, ``moka_summary`` and
``merge_and_unload``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import MoKAConfig, ModuleSettings
from .shapes import choose_shapes, shape_cost, validate_shape
from .layers import MoKALinear, adapter_tensor_shapes, base_kind, disable_cpu_inference_repack

__all__ = [
    "apply_moka",
    "plan_moka",
    "moka_layers",
    "trainable_parameters",
    "moka_summary",
    "merge_and_unload",
    "ModulePlan",
]


@dataclass(frozen=True)
class ModulePlan:
    """What one targeted module becomes: its base, dims, settings and component shapes (group order)."""

    name: str
    base_kind: str
    out_features: int
    in_features: int
    settings: ModuleSettings
    shapes: tuple

    def tensor_shapes(self) -> dict[str, tuple]:
        return adapter_tensor_shapes(self.shapes, self.settings.variant, self.settings.gating)

    def to_json(self) -> dict:
        return {
            "base_kind": self.base_kind,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "variant": self.settings.variant,
            "gating": self.settings.gating,
            "temperature": self.settings.temperature,
            "scale": self.settings.scale,
            "shapes": [list(s) for s in self.shapes],
        }


def _layer_index(name: str, layers_pattern) -> Optional[int]:
    if layers_pattern:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
            if m:
                return int(m.group(1))
        return None
    m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_targeted(config: MoKAConfig, name: str) -> bool:
    """PEFT's rules: a list matches a name exactly or as its last dotted part(s); a str is a full regex."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, name):
                return False
        elif name in ex or any(name.endswith("." + e) for e in ex):
            return False
    tm = config.target_modules
    if isinstance(tm, str):
        return re.fullmatch(tm, name) is not None
    if not (name in tm or any(name.endswith("." + t) for t in tm)):
        return False
    lt = config.layers_to_transform
    if lt is None or (isinstance(lt, list) and not lt):
        return True
    idx = _layer_index(name, config.layers_pattern)
    if idx is None:
        return False
    return idx == lt if isinstance(lt, int) else idx in lt


def _resolve_shapes(settings: ModuleSettings, out_f: int, in_f: int, name: str) -> tuple:
    try:
        if settings.shapes != "auto" and len(settings.shapes) != settings.r:
            raise ValueError(f"shapes lists {len(settings.shapes)} components but r={settings.r}")
        if settings.shapes == "auto":
            shapes = choose_shapes(out_f, in_f, settings.r, settings.variant, settings.budget, settings.flops)
        else:
            shapes = [
                validate_shape(s, out_f, in_f, settings.variant, where=f"shapes[{i}]")
                for i, s in enumerate(settings.shapes)
            ]
    except ValueError as e:
        raise ValueError(f"apply_moka: module {name!r} ({out_f} x {in_f}): {e}") from None
    # Group order, as MoKALinear stores them.
    order: dict = {}
    for s in shapes:
        order.setdefault(tuple(s), []).append(tuple(s))
    return tuple(s for group in order.values() for s in group)


def plan_moka(model: nn.Module, config: MoKAConfig) -> dict[str, ModulePlan]:
    """The modules ``config`` targets in ``model`` and what each becomes; changes nothing.

    Raises if a targeted module is not a supported linear layer, is already a
    MoKA layer, or nothing matches.
    """
    if not isinstance(config, MoKAConfig):
        raise TypeError(f"config must be a moka_ext.MoKAConfig, got {type(config).__name__}")
    plans: dict[str, ModulePlan] = {}
    inside_moka = set()
    for name, module in model.named_modules():
        if isinstance(module, MoKALinear):
            inside_moka.add(name)
        if any(name.startswith(p + ".") for p in inside_moka) or not name:
            continue
        if not is_targeted(config, name):
            continue
        if isinstance(module, MoKALinear):
            raise ValueError(f"apply_moka: module {name!r} already carries a MoKA adapter (one adapter per model)")
        try:
            kind = base_kind(module)
        except TypeError as e:
            raise TypeError(f"apply_moka: target module {name!r}: {e}") from None
        settings = config.resolve(name)
        out_f, in_f = module.out_features, module.in_features
        plans[name] = ModulePlan(name, kind, out_f, in_f, settings, _resolve_shapes(settings, out_f, in_f, name))
    if not plans:
        raise ValueError(
            f"apply_moka: no module of the model matches target_modules={config.target_modules!r} "
            f"(exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r})"
        )
    return plans


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_moka(model: nn.Module, config: MoKAConfig) -> nn.Module:
    """Wrap every targeted linear layer of ``model`` in a MoKALinear, in place; freeze the rest.

    Returns ``model``. Only the adapter parameters are trainable afterwards.

    bitsandbytes 4-bit layers on CPU: on CPUs with AVX512-BF16, bitsandbytes
    repacks a ``Linear4bit`` into a bf16 inference layout at its first eval-mode
    forward without gradients, and that layout has no autograd. ``apply_moka``
    switches the repacking off on every ``Linear4bit`` of the model, targeted or
    not, and undoes it where it already happened
    (:func:`moka_ext.layers.disable_cpu_inference_repack`). The model then
    computes through bitsandbytes' differentiable path in training and in
    evaluation alike: at init its outputs equal the base model's computed with
    repacking off, bit for bit. Against outputs computed through the repacked
    layout they differ by the bf16 rounding of that layout (README, "Use it in
    your model").
    """
    plans = plan_moka(model, config)
    disable_cpu_inference_repack(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, plan in plans.items():
        s = plan.settings
        kwargs = dataclasses.asdict(s) | {"shapes": list(plan.shapes)}
        layer = MoKALinear(model.get_submodule(name), **kwargs)
        _set_submodule(model, name, layer)
    model.moka_config = config
    return model


def moka_layers(model: nn.Module) -> dict[str, MoKALinear]:
    """Name -> MoKALinear of every adapted layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoKALinear)}


def _logical_numel(p: torch.Tensor) -> int:
    # A bitsandbytes 4-bit parameter stores two weights per byte: count the weights.
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


def trainable_parameters(model: nn.Module) -> dict:
    """Parameter counts: ``trainable``, ``adapter`` (all MoKA parameters), ``base`` (everything
    else, quantized weights counted as weights), ``total`` and ``share`` = trainable / base."""
    adapter_ids = {
        id(p) for m in moka_layers(model).values() for n, p in m.named_parameters() if not n.startswith("base_layer.")
    }
    trainable = adapter = base = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _logical_numel(p)
        if id(p) in adapter_ids:
            adapter += n
        else:
            base += n
        if p.requires_grad:
            trainable += n
    total = adapter + base
    return {
        "trainable": trainable,
        "adapter": adapter,
        "base": base,
        "total": total,
        "share": trainable / base if base else float("nan"),
    }


def moka_summary(model: nn.Module) -> str:
    """A table of the adapted modules: base kind, dims, variant, the chosen shapes and parameters."""
    layers = moka_layers(model)
    if not layers:
        return "no MoKA layers"
    lines = []
    for name, m in layers.items():
        shapes = "  ".join(
            f"{n}x[{ma}x{na} (x) {mb}x{nb}]" if n > 1 else f"[{ma}x{na} (x) {mb}x{nb}]"
            for (ma, na, mb, nb), n in m.groups
        )
        params = sum(shape_cost(s, m.variant) for s in m.shapes) + (m.r if m.gating else 0)
        lines.append(
            f"{name}: {m.base_kind} {m.out_features}x{m.in_features} {m.variant} r={m.r} "
            f"gating={'on' if m.gating else 'off'} params={params} shapes: {shapes}"
        )
    c = trainable_parameters(model)
    lines.append(
        f"{len(layers)} MoKA layers, {c['trainable']:,} trainable parameters "
        f"({100 * c['share']:.4f}% of {c['base']:,} base parameters)"
    )
    return "\n".join(lines)


def merge_and_unload(
    model: nn.Module, full_precision: bool = False, dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Replace every MoKALinear by a plain layer computing ``base + dW``; returns the model.

    Full-precision bases are merged exactly (up to the weight dtype's rounding).
    4-bit/8-bit bases are dequantized, dW added, and re-quantized (warns: the
    result differs by the quantization rounding), or, with
    ``full_precision=True``, replaced by an ``nn.Linear`` of ``dtype`` (default
    the base's compute dtype) holding the exact merged weight.
    """
    for name, layer in moka_layers(model).items():
        _set_submodule(model, name, layer.merged_base(full_precision=full_precision, dtype=dtype))
    if hasattr(model, "moka_config"):
        del model.moka_config
    return model
