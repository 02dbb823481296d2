"""moka_ext: Mixture of Kronecker Adapters (MoKA) for quantized LLaMA-family models.

The public API. ``import moka_ext`` registers the ``torch.ops.moka`` ops.
"""
from __future__ import annotations

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


__all__ = ["__version__", "build_info", "gate_softmax", "kron_mix", "kron_mix_add", "reference"]
