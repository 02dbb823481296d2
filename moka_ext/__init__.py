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
from .ops import gate_softmax, kron_mix, kron_mix_add


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
    "merge_and_unload": "model",
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
    return value


def __dir__():
    return sorted(set(globals()) | set(_ADAPTER_API))


def _register_with_peft() -> None:
    # Importing the config registers the method; if the config module is the
    # one importing peft right now, it registers itself when it finishes.
    try:
        importlib.import_module(".config", __name__)
    except Exception as e:  # never break the user's `import peft`
        warnings.warn(f"moka_ext: could not register MoKA as a PEFT method: {e!r}")


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """Registers MoKA with PEFT right after ``peft`` finishes importing (there is no stdlib post-import hook)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return spec
        inner = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                module.__loader__ = module.__spec__.loader = inner
                inner.exec_module(module)
                _register_with_peft()

        spec.loader = _Loader()
        return spec


if "peft" in sys.modules:
    _register_with_peft()
elif importlib.util.find_spec("peft") is not None:
    sys.meta_path.insert(0, _PeftImportHook())


__all__ = [
    "__version__",
    "apply_moka",
    "build_info",
    "gate_softmax",
    "kron_mix",
    "kron_mix_add",
    "load_adapter",
    "merge_and_unload",
    "MoKAConfig",
    "MoKALinear",
    "moka_summary",
    "reference",
    "save_adapter",
    "trainable_parameters",
]
