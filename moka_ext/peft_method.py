"""MoKA as a PEFT method: ``peft.get_peft_model(model, moka_ext.MoKAConfig(...))``.

Owns: extending PEFT's ``PeftType`` enum with ``MOKA`` (``register_peft_method``
accepts only names the enum already has), the PEFT tuner (``MoKAModel``) and
the PEFT flavour of the layer (``PeftMoKALinear``: a ``MoKALinear`` that is
also a ``BaseTunerLayer``). One adapter per model: MoKA layers hold their
parameters directly, not per adapter name.

``register()`` is idempotent; ``import moka_ext`` calls it as soon as peft is
imported (see ``moka_ext/__init__.py``).
"""
from __future__ import annotations

import dataclasses

import enum

from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method

from .config import LLAMA_TARGET_MODULES, MoKAConfig
from .layers import MoKALinear, disable_cpu_inference_repack

__all__ = ["register", "MoKAModel", "PeftMoKALinear", "PEFT_TYPE_NAME"]

PEFT_TYPE_NAME = "MOKA"


def _extend_enum(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add member ``name = value`` to an existing (str) Enum; return it (or the existing one).

    The stdlib has no API for this; we build the member the way ``EnumType``
    does and enter it in the three lookup tables every enum operation uses
    (attribute access, ``Enum(value)``, iteration and ``in``).
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise RuntimeError(f"{enum_cls.__name__}.{name} exists with value {existing.value!r}, expected {value!r}")
        return existing
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(next(iter(enum_cls)), "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    member.__init__(value)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    # Plain class attribute, set past EnumType.__setattr__ (which refuses members).
    type.__setattr__(enum_cls, name, member)
    if enum_cls[name] is not member or enum_cls(value) is not member or member not in list(enum_cls):
        raise RuntimeError(f"could not add {name} to {enum_cls.__name__} on this Python; please report")
    return member


class PeftMoKALinear(MoKALinear, BaseTunerLayer):
    """MoKALinear inside a PEFT model (single adapter)."""

    # The adapter tensors are not per-adapter-name dicts, so PEFT's generic
    # per-name loops must not see them; the methods below handle them.
    adapter_layer_names = ()
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, **settings) -> None:
        MoKALinear.__init__(self, base_layer, adapter_name=adapter_name, **settings)
        self._active_adapter = adapter_name

    def _adapter_params(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for p in self._adapter_params():
            p.requires_grad_(self.adapter_name in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool = True) -> None:
        MoKALinear.enable_adapters(self, enabled)
        for p in self._adapter_params():
            p.requires_grad_(enabled)

    def _get_available_adapters(self) -> set[str]:
        return {self.adapter_name}

    def _all_available_adapter_names(self) -> list[str]:
        return [self.adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("moka_ext: a MoKA layer holds exactly one adapter; it cannot be deleted, only unloaded")

    def _move_adapter_to_device_of_base_layer(self, adapter_name, device=None) -> None:
        pass  # created on the base layer's device already


class MoKAModel(BaseTuner):
    """The PEFT tuner for MoKA: replaces targeted linear layers by PeftMoKALinear."""

    prefix: str = "moka_"
    tuner_layer_cls = PeftMoKALinear
    target_module_mapping = {"llama": list(LLAMA_TARGET_MODULES)}

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        # The same rule as apply_moka: no bitsandbytes CPU inference repacking anywhere in the model.
        disable_cpu_inference_repack(model)

    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("moka_ext supports one MoKA adapter per model; unload the first one before adding another")

    def _create_and_replace(self, moka_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, MoKALinear):
            raise ValueError(f"module {current_key!r} already carries a MoKA adapter (one adapter per model)")
        s = moka_config.resolve(current_key)
        try:
            new = PeftMoKALinear(target, adapter_name, **dataclasses.asdict(s))
        except (TypeError, ValueError) as e:
            raise type(e)(f"MoKA: module {current_key!r}: {e}") from None
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)


_REGISTERED = None


def register():
    """Make MoKA a PEFT method (idempotent); returns ``PeftType.MOKA``."""
    global _REGISTERED
    if _REGISTERED is not None:
        return _REGISTERED
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    member = _extend_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is not MoKAModel:
        if member in PEFT_TYPE_TO_TUNER_MAPPING:
            raise RuntimeError(f"another PEFT method is already registered as {PEFT_TYPE_NAME!r}")
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=MoKAConfig, model_cls=MoKAModel)
    _REGISTERED = member
    return member


register()
