"""moka_ext: Mixture of Kronecker Adapters (MoKA) for quantized LLaMA-family models.

The public API. ``import moka_ext`` registers the ``torch.ops.moka`` ops, and
registers MoKA as a PEFT method as soon as ``peft`` is (or gets) imported. The
adapter API (config, layer, model patching, adapter files) loads on first use,
so the ops alone do not pay for importing transformers/peft/bitsandbytes.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from . import reference
from ._version import __version__
from .ops import gate_softmax, kron_mix, kron_mix_add, kron_mix_indexed


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels are compiled, archs."""
    import torch

    from . import _C

    info = dict(_C.build_info())
    info["torch_version_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info


# name -> submodule, loaded on first attribute access
_ADAPTER_API = {
    "MoKAConfig": "config",
    "MoKALinear": "layers",
    "apply_moka": "model",
    "delete_adapter": "model",
    "merge_and_unload": "model",
    "mixed_batch": "model",
    "set_adapter": "model",
    "moka_summary": "model",
    "trainable_parameters": "model",
    "load_adapter": "adapter_io",
    "save_adapter": "adapter_io",
}


_SUBMODULES = {"adapter_io", "config", "layers", "model", "peft_method", "shapes"}


def __getattr__(name: str):
    if name in _SUBMODULES:  # e.g. moka_ext.adapter_io.SaveAdapterCallback before any import of it
        return importlib.import_module(f".{name}", __name__)
    sub = _ADAPTER_API.get(name)
    if sub is None:
        raise AttributeError(f"module 'moka_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{sub}", __name__), name)
    globals()[name] = value
    if "peft" in sys.modules:
        _register_with_peft()
    return value


def __dir__():
    return sorted(set(globals()) | set(_ADAPTER_API))


def _initializing(name: str) -> bool:
    mod = sys.modules.get(name)
    return mod is not None and getattr(getattr(mod, "__spec__", None), "_initializing", False)


def _register_with_peft(config_done: bool = False) -> None:
    """Import peft_method (which registers the method), unless the config module is being
    imported right now: peft_method needs it whole, so the hook on the config module
    registers once it is (``config_done``)."""
    if f"{__name__}.peft_method" in sys.modules:
        return
    if not config_done and _initializing(f"{__name__}.config"):
        return
    try:
        importlib.import_module(".peft_method", __name__)
    except Exception as e:  # never break the user's `import peft`
        warnings.warn(f"moka_ext: could not register MoKA as a PEFT method: {e!r}")


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """Registers MoKA with PEFT right after ``peft``, or ``moka_ext.config`` when it imports
    peft, finishes importing (there is no stdlib post-import hook)."""

    def __init__(self, names) -> None:
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        if not self.names:
            sys.meta_path.remove(self)
        # Find the real spec past this hook (it is still on sys.meta_path while names remain).
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        inner = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                module.__loader__ = module.__spec__.loader = inner
                inner.exec_module(module)
                if "peft" in sys.modules:
                    _register_with_peft(config_done=module.__name__ != "peft")

        spec.loader = _Loader()
        return spec


if "peft" in sys.modules:
    _register_with_peft()
elif importlib.util.find_spec("peft") is not None:
    sys.meta_path.insert(0, _PeftImportHook(["peft", f"{__name__}.config"]))


__all__ = [
    "__version__",
    "apply_moka",
    "build_info",
    "gate_softmax",
    "kron_mix",
    "kron_mix_add",
    "kron_mix_indexed",
    "delete_adapter",
    "load_adapter",
    "merge_and_unload",
    "mixed_batch",
    "MoKAConfig",
    "MoKALinear",
    "moka_summary",
    "reference",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
]
