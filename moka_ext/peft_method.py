"""MoKA as a PEFT method: ``peft.get_peft_model(model, moka_ext.MoKAConfig(...))``.

Owns: the PEFT tuner (``MoKAModel``: create-and-replace, trainable marking,
merge/unload, delete/set adapter, mixed-batch forward hooks), the PEFT flavour
of the layer (``PeftMoKALinear``: a ``MoKALinear`` that is also a
``BaseTunerLayer``; its named adapters are PEFT's own layout, ``moka_A.<name>.<j>``),
and the registration of the method in PEFT's tables (``register``).

``register()`` is idempotent; ``import moka_ext`` calls it as soon as peft is
imported (see ``moka_ext/__init__.py``).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Optional

from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from .config import LLAMA_TARGET_MODULES, PEFT_TYPE_NAME, MoKAConfig, peft_type
from .layers import BASE_ROW, MoKALinear, RowAdapters, disable_cpu_inference_repack

__all__ = ["register", "MoKAModel", "PeftMoKALinear", "PEFT_TYPE_NAME"]


class PeftMoKALinear(MoKALinear, BaseTunerLayer):
    """MoKALinear inside a PEFT model: adapters are created in float32 and then moved to the
    base layer's device and dtype as PEFT does it (``autocast_adapter_dtype`` decides whether
    PEFT casts them back to float32 afterwards)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **settings) -> None:
        MoKALinear.__init__(self, base_layer, adapter_name=adapter_name, **settings)

    def update_layer(self, adapter_name: str, **settings) -> None:
        MoKALinear.update_layer(self, adapter_name, **settings)
        self._move_adapter_to_device_of_base_layer(adapter_name)


class MoKAModel(BaseTuner):
    """The PEFT tuner for MoKA: replaces targeted linear layers by PeftMoKALinear and adds
    further adapters to the layers it created.

    Adapter parameters live in PEFT's containers (ModuleDict/ParameterDict keyed by adapter
    name), so PEFT's structural defaults hold for them as they do for LoRA: which parameters
    are adapter parameters (``_mark_only_adapters_as_trainable``, state dicts) and the dtype
    policy (``_cast_adapter_dtype``: ``autocast_adapter_dtype=True`` upcasts float16/bfloat16
    adapters to float32, ``False`` keeps the base layer's dtype)."""

    prefix: str = "moka_"
    tuner_layer_cls = PeftMoKALinear
    target_module_mapping = {"llama": list(LLAMA_TARGET_MODULES)}

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        # The same rule as apply_moka: no bitsandbytes CPU inference repacking anywhere in the model.
        disable_cpu_inference_repack(model)

    def _create_and_replace(self, moka_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        s = dataclasses.asdict(moka_config.resolve(current_key))
        try:
            if isinstance(target, MoKALinear):
                target.update_layer(adapter_name, **s)
                return
            new = PeftMoKALinear(target, adapter_name, **s)
        except (TypeError, ValueError) as e:
            raise type(e)(f"MoKA: module {current_key!r}: {e}") from None
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # The adapter is created on the base layer's device (or on the meta device
        # under low_cpu_mem_usage, to be filled by load_state_dict(assign=True)), and
        # the base layer is wrapped as it is: nothing to move. (PEFT's default moves
        # the whole new module for bitsandbytes 8-bit bases, which fails on meta.)
        setattr(parent, child_name, new_module)

    def _check_adapter_names(self, adapter_names, what: str) -> Optional[list[str]]:
        if adapter_names is None:
            return None
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [a for a in names if a not in self.peft_config]
        if missing:
            raise ValueError(f"MoKA {what}: no adapter called {missing} (the model has {sorted(self.peft_config)})")
        return names

    def _layers(self):
        return [m for m in self.model.modules() if isinstance(m, MoKALinear)]

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge ``adapter_names`` (default: the active adapters) into every layer that has them.
        A name the model does not have is an error."""
        names = self._check_adapter_names(adapter_names, "merge_adapter")
        self._check_merge_allowed()
        for m in self._layers():
            here = m._present(names if names is not None else m.active_adapters)
            if here:
                m.merge(safe_merge=safe_merge, adapter_names=here)

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        names = self._check_adapter_names(adapter_names, "merge_and_unload")
        if merge:
            self._check_merge_allowed()
        for name, m in list(self.model.named_modules()):
            if not isinstance(m, MoKALinear):
                continue
            if merge:
                here = m._present(names if names is not None else m.active_adapters)
                if here:
                    m.merge(safe_merge=safe_merge, adapter_names=here)
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, m.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter from the model and every layer (a merged one is refused); the
        active set loses it."""
        self._check_adapter_names([adapter_name], "delete_adapter")
        super().delete_adapter(adapter_name)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Make one adapter or several (whose updates add) active; trainable unless ``inference_mode``."""
        self._check_adapter_names(adapter_name, "set_adapter")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``adapter_names=[...]`` (one per row, ``"__base__"`` for none) goes to every MoKA layer,
        resolved to row indices once per forward."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:  # PEFT's rule for mixed batches (moka_ext.mixed_batch allows training)
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set().union(*(m.r.keys() for m in self._layers()))
        unknown = sorted({a for a in adapter_names if a != BASE_ROW} - known)
        if unknown:
            raise ValueError(f"adapter_names: no adapter called {unknown} (the model has {sorted(known)})")
        beams = kwargs.get("num_beams")
        names = list(adapter_names)
        if isinstance(beams, int) and beams > 1:  # generate() repeats every row num_beams times
            names = [a for a in names for _ in range(beams)]
        rows = RowAdapters.from_names(names)

        def hook(module, args, kw):
            kw["adapter_names"] = rows
            return args, kw

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self._layers()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


_REGISTERED = None


def register():
    """Make MoKA a PEFT method (idempotent); returns ``PeftType.MOKA``.

    PEFT's ``register_peft_method`` wants the type's value to be its upper-cased name;
    MoKA's value carries the "import moka_ext first" message (see ``moka_ext.config``),
    so the four tables are filled here. Configs saved with ``peft_type: "MOKA"`` load too.
    """
    global _REGISTERED
    if _REGISTERED is not None:
        return _REGISTERED
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    member = peft_type()
    for key in (member, PEFT_TYPE_NAME):
        have = PEFT_TYPE_TO_TUNER_MAPPING.get(key)
        if have is not None and have is not MoKAModel:
            raise RuntimeError(f"another PEFT method is already registered as {key!r}: {have!r}")
        PEFT_TYPE_TO_CONFIG_MAPPING[key] = MoKAConfig
        PEFT_TYPE_TO_TUNER_MAPPING[key] = MoKAModel
        PEFT_TYPE_TO_PREFIX_MAPPING[key] = MoKAModel.prefix
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(member, None)
    _REGISTERED = member
    return member


register()
