"""Model-level MoKA: patching a model with named adapters, the parameter report,
switching, combining, deleting, merging and unloading adapters, mixed batches.

Owns: which modules of a model a ``MoKAConfig`` targets (PEFT's matching
rules), the plan of what each targeted module becomes (``plan_moka``, also
what ``load_adapter`` validates a file against before touching a model),
``apply_moka``, ``set_adapter``, ``delete_adapter``, ``mixed_batch``,
``trainable_parameters``, ``moka_summary`` and ``merge_and_unload``. The
configs of a patched model's adapters are ``model.moka_configs`` (name -> config).
"""
from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .config import MoKAConfig, ModuleSettings
from .shapes import choose_shapes, validate_shape
from .layers import BASE_ROW, MoKALinear, RowAdapters, adapter_tensor_shapes, base_kind, disable_cpu_inference_repack

__all__ = [
    "apply_moka",
    "delete_adapter",
    "mixed_batch",
    "set_adapter",
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


def plan_moka(model: nn.Module, config: MoKAConfig, adapter_name: str = "default") -> dict[str, ModulePlan]:
    """The modules ``config`` targets in ``model`` and what the adapter ``adapter_name`` adds
    to each; changes nothing.

    Raises if a targeted module is not a supported linear layer, already has an
    adapter called ``adapter_name``, or nothing matches. (A targeted MoKA layer
    gets the new adapter beside its others.)
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
            if adapter_name in module.r:
                raise ValueError(f"apply_moka: module {name!r} already has an adapter called {adapter_name!r}")
            module = module.base_layer
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


def apply_moka(model: nn.Module, config: MoKAConfig, adapter_name: str = "default") -> nn.Module:
    """Add the adapter ``adapter_name`` to every targeted linear layer of ``model``, in place
    (wrapping plain layers in a MoKALinear); freeze everything else.

    Returns ``model``. The first adapter is active; a further one is added inactive
    and frozen (``set_adapter`` switches or combines them), as in PEFT.

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
    plans = plan_moka(model, config, adapter_name)
    disable_cpu_inference_repack(model)
    configs = getattr(model, "moka_configs", None) or {}
    first = not configs
    for p in model.parameters():
        p.requires_grad_(False)
    for name, plan in plans.items():
        kwargs = dataclasses.asdict(plan.settings) | {"shapes": list(plan.shapes)}
        module = model.get_submodule(name)
        if isinstance(module, MoKALinear):
            module.update_layer(adapter_name, **kwargs)
        else:
            layer = MoKALinear(module, adapter_name=adapter_name, **kwargs)
            if not first:
                layer.set_adapter(active_adapters(model))
            _set_submodule(model, name, layer)
    model.moka_configs = {**configs, adapter_name: config}
    set_adapter(model, adapter_name if first else active_adapters(model))
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters of a patched model (as set by apply_moka / set_adapter)."""
    return list(getattr(model, "moka_active_adapters", None) or [])


def _check_names(model: nn.Module, names, what: str) -> list[str]:
    configs = getattr(model, "moka_configs", None) or {}
    names = [names] if isinstance(names, str) else list(names)
    missing = [a for a in names if a not in configs]
    if missing:
        raise ValueError(f"{what}: no adapter called {missing} in the model (it has {sorted(configs)})")
    return names


def set_adapter(model: nn.Module, adapter_names, inference_mode: bool = False) -> nn.Module:
    """Activate one adapter or several (their updates add), trainable unless ``inference_mode``;
    every other adapter is frozen and left out of the forward."""
    names = _check_names(model, adapter_names, "set_adapter")
    for m in moka_layers(model).values():
        m.set_adapter(names, inference_mode=inference_mode)
    model.moka_active_adapters = names
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter from every layer (layers left with none go back to their base layer)."""
    _check_names(model, [adapter_name], "delete_adapter")
    for name, m in moka_layers(model).items():
        if adapter_name not in m.r:
            continue
        if adapter_name in m.merged_adapters:
            raise ValueError(f"delete_adapter: {adapter_name!r} is merged in {name!r}; unmerge first")
        if len(m.r) == 1:
            _set_submodule(model, name, m.base_layer)
        else:
            m.delete_adapter(adapter_name)
    configs = dict(model.moka_configs)
    del configs[adapter_name]
    active = [a for a in active_adapters(model) if a != adapter_name] or sorted(configs)[:1]
    if configs:
        model.moka_configs = configs
        set_adapter(model, active)
    else:
        del model.moka_configs
        model.moka_active_adapters = []
    return model


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """Inside the block, the model's forward gives row i of the batch the adapter
    ``adapter_names[i]`` (``"__base__"``: none). For models patched with ``apply_moka``;
    a PeftModel takes ``model(..., adapter_names=[...])`` directly."""
    layers = list(moka_layers(model).values())
    known = set().union(*(m.r.keys() for m in layers)) if layers else set()
    unknown = sorted({a for a in adapter_names if a != BASE_ROW} - known)
    if unknown:
        raise ValueError(f"mixed_batch: no adapter called {unknown} (the model has {sorted(known)})")
    rows = RowAdapters.from_names(list(adapter_names))

    def hook(module, args, kw):
        kw["adapter_names"] = rows
        return args, kw

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


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
        for a in m.r:
            shapes = "  ".join(
                f"{n}x[{ma}x{na} (x) {mb}x{nb}]" if n > 1 else f"[{ma}x{na} (x) {mb}x{nb}]"
                for (ma, na, mb, nb), n in m.groups[a]
            )
            params = sum(p.numel() for p in m._adapter_params(a))
            lines.append(
                f"{name} [{a}]: {m.base_kind} {m.out_features}x{m.in_features} {m.variant[a]} r={m.r[a]} "
                f"gating={'on' if m.gating[a] else 'off'} params={params} shapes: {shapes}"
            )
    c = trainable_parameters(model)
    lines.append(
        f"{len(layers)} MoKA layers, {c['trainable']:,} trainable parameters "
        f"({100 * c['share']:.4f}% of {c['base']:,} base parameters)"
    )
    return "\n".join(lines)


def merge_and_unload(
    model: nn.Module,
    full_precision: bool = False,
    dtype: Optional[torch.dtype] = None,
    adapter_names: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Replace every MoKALinear by a plain layer computing ``base + sum of dW`` over
    ``adapter_names`` (default: the active adapters); returns the model.

    A name the model does not have is an error. Full-precision bases are merged
    exactly (up to the weight dtype's rounding). 4-bit/8-bit bases are
    dequantized, dW added, and re-quantized (warns: the result differs by the
    quantization rounding), or, with ``full_precision=True``, replaced by an
    ``nn.Linear`` of ``dtype`` (default the base's compute dtype) holding the
    exact merged weight.
    """
    if adapter_names is not None and getattr(model, "moka_configs", None) is not None:
        _check_names(model, adapter_names, "merge_and_unload")
    for name, layer in moka_layers(model).items():
        names = layer._present(adapter_names if adapter_names is not None else layer.active_adapters)
        _set_submodule(model, name, layer.merged_base(full_precision=full_precision, dtype=dtype, adapter_names=names))
    for attr in ("moka_configs", "moka_active_adapters"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
