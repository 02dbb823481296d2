"""MoKALinear: a MoKA adapter around a frozen linear layer.

Owns: the adapter parameters of one layer and their initialization, the
forward pass through the moka ops, merge/unmerge into the base weight, and the
handling of the base kinds it wraps (``torch.nn.Linear``,
``bitsandbytes.nn.Linear4bit``, ``bitsandbytes.nn.Linear8bitLt``, detected
with isinstance): dequantizing them for a dense weight and re-quantizing a
merged weight.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import reference
from .shapes import Shape, choose_shapes, validate_shape
from .ops import gate_softmax, kron_mix_add

try:  # bitsandbytes is optional: plain nn.Linear bases need none of it.
    import bitsandbytes as _bnb
except ImportError:  # pragma: no cover
    _bnb = None

__all__ = [
    "MoKALinear",
    "base_kind",
    "dense_weight",
    "group_shapes",
    "adapter_tensor_shapes",
    "disable_cpu_inference_repack",
]


def base_kind(layer: nn.Module) -> str:
    """``"linear4bit"``, ``"linear8bit"`` or ``"linear"``; raises for anything else."""
    # Linear4bit and Linear8bitLt subclass nn.Linear: test them first.
    if _bnb is not None and isinstance(layer, _bnb.nn.Linear4bit):
        return "linear4bit"
    if _bnb is not None and isinstance(layer, _bnb.nn.Linear8bitLt):
        return "linear8bit"
    if isinstance(layer, nn.Linear):
        return "linear"
    raise TypeError(
        f"MoKALinear: base_layer must be torch.nn.Linear, bitsandbytes.nn.Linear4bit or "
        f"bitsandbytes.nn.Linear8bitLt, got {type(layer).__module__}.{type(layer).__name__}"
    )


def _undo_cpu_inference_packing(layer: nn.Module) -> None:
    """Turn off (and undo) bitsandbytes' AVX512-BF16 CPU inference layout on one Linear4bit.

    On such CPUs an eval-mode forward with no input gradient repacks the weight
    in place into a bf16 layout whose matmul has no autograd, and every later
    forward uses it, so adapters above it silently stop getting correct
    gradients (ENV.md). We give up that inference speed-up for correct training
    and for one set of numerics in training and evaluation.
    """
    layer.support_avx512bf16_for_cpu = False
    w = layer.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
        restored = w.quant_state
        if restored.absmax.dim() == 2:
            # bitsandbytes 0.50's inverse restores the block absmax only for nested (double-
            # quantized) states; otherwise it stays in the packed layout, (in/blocksize, out)
            # in bf16, and dequantization would read the scales of layers wider than one block
            # in the wrong order. Back to one scale per block in row-major block order.
            restored.absmax = restored.absmax.t().reshape(-1).to(restored.dtype).contiguous()
        if getattr(layer, "quant_state", None) is not None:
            layer.quant_state = w.quant_state


def disable_cpu_inference_repack(model: nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` in its trainable layout; returns how many.

    Switches off the CPU inference repacking (``support_avx512bf16_for_cpu``) and
    undoes any repacking that already happened, on wrapped and unwrapped layers
    alike: a repacked layer anywhere above an adapter would cut its input
    gradients. ``apply_moka`` and the PEFT tuner call it on the whole model.
    """
    n = 0
    if _bnb is None:
        return n
    for module in model.modules():
        if isinstance(module, _bnb.nn.Linear4bit):
            _undo_cpu_inference_packing(module)
            n += 1
    return n


def dense_weight(layer: nn.Module) -> Tensor:
    """The (dequantized) ``out x in`` weight of a supported base layer, in float32."""
    kind = base_kind(layer)
    if kind == "linear":
        return layer.weight.detach().float()
    if kind == "linear4bit":
        _undo_cpu_inference_packing(layer)
        w = layer.weight
        if w.quant_state is None:
            raise RuntimeError(
                "dense_weight: the Linear4bit weight is not quantized yet (move the layer with .to(device) first)"
            )
        return _bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    w = layer.weight
    if getattr(layer.state, "has_fp16_weights", False):
        return w.detach().float()
    CB = w.CB if getattr(w, "CB", None) is not None else layer.state.CB
    SCB = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    if CB is None or SCB is None:
        raise RuntimeError("dense_weight: the Linear8bitLt weight is not quantized yet (move it with .to(device))")
    return _bnb.functional.int8_vectorwise_dequant(CB, SCB).float()


def plain_linear(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` of ``dtype`` holding ``weight`` (``out x in``) and ``bias``, on their device."""
    out_features, in_features = weight.shape
    out = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(dtype))
        if bias is not None:
            out.bias.copy_(bias.detach().to(dtype))
    return out


def group_shapes(shapes: Sequence[Shape]) -> list[tuple[Shape, int]]:
    """Components sharing a shape stacked into one group (what kron_mix takes), in first-seen order."""
    groups: dict[Shape, int] = {}
    for s in shapes:
        groups[tuple(s)] = groups.get(tuple(s), 0) + 1
    return list(groups.items())


def adapter_tensor_shapes(shapes: Sequence[Shape], variant: str, gating: bool) -> dict[str, tuple]:
    """Name -> shape of every trainable adapter tensor of a layer (its state-dict layout)."""
    out = {}
    groups = group_shapes(shapes)
    for j, ((ma, na, mb, nb), r_j) in enumerate(groups):
        if variant == "moka":
            out[f"moka_A.{j}"] = (r_j, ma, na)
        out[f"moka_B.{j}"] = (r_j, mb, nb)
    if gating:
        out["moka_gate_logits"] = (sum(r for _, r in groups),)
    return out


class MoKALinear(nn.Module):
    """``y = base(x) + x @ dW.T``, ``dW = sum_i g_i kron(A_i, B_i)`` (DESIGN.md section 1).

    The base layer is frozen; the factors (float32 by default) are the only
    trainable parameters: ``moka_A.j`` (``(r_j, ma, na)``, absent for MoKAs,
    whose A is a fixed identity), ``moka_B.j`` (``(r_j, mb, nb)``) per factor-
    shape group j, and ``moka_gate_logits`` (``(r,)``, only with gating).
    ``shapes`` lists one ``(ma, na, mb, nb)`` per component or is ``"auto"``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 4,
        shapes="auto",
        variant: str = "moka",
        gating: bool = True,
        temperature: float = 1.0,
        scale: float = 1.0,
        dropout: float = 0.0,
        init: str = "zero_b",
        budget: Optional[int] = None,
        flops=None,
        dtype: torch.dtype = torch.float32,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        self.base_kind = base_kind(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        if variant not in ("moka", "mokas"):
            raise ValueError(f"MoKALinear: variant must be 'moka' or 'mokas', got {variant!r}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"MoKALinear: r must be an int >= 1, got {r!r}")
        if init not in ("zero_b", "zero_a", "random") or (variant == "mokas" and init == "zero_a"):
            raise ValueError(f"MoKALinear: init must be 'zero_b', 'zero_a' or 'random' ('zero_b'/'random' for mokas), got {init!r}")
        if shapes == "auto":
            shapes = choose_shapes(self.out_features, self.in_features, r, variant, budget, flops)
        shapes = [
            validate_shape(s, self.out_features, self.in_features, variant, where=f"MoKALinear shapes[{i}]")
            for i, s in enumerate(shapes)
        ]
        if len(shapes) != r:
            raise ValueError(f"MoKALinear: got {len(shapes)} shapes for r={r}; give exactly r shapes")
        if self.base_kind == "linear4bit":  # (only once the settings are known to be valid)
            _undo_cpu_inference_packing(base_layer)
        self.base_layer = base_layer
        self.r = r
        self.variant = variant
        self.gating = gating
        self.temperature = float(temperature)
        self.scale = float(scale)
        self.init = init
        self.adapter_name = adapter_name
        self.groups = group_shapes(shapes)
        # Component order is group order: gates[i] belongs to self.shapes[i].
        self.shapes = [s for s, n in self.groups for _ in range(n)]
        self.moka_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        device = _device_of(base_layer)
        layout = adapter_tensor_shapes(self.shapes, variant, gating)
        self.moka_A = nn.ParameterList()
        self.moka_B = nn.ParameterList()
        for j, ((ma, na, mb, nb), r_j) in enumerate(self.groups):
            if variant == "moka":
                self.moka_A.append(nn.Parameter(torch.empty(layout[f"moka_A.{j}"], dtype=dtype, device=device)))
            else:
                # The fixed identity factor of MoKAs: not trained, not saved.
                eye = torch.eye(ma, dtype=dtype, device=device).expand(r_j, ma, ma).contiguous()
                self.register_buffer(f"moka_identity_{j}", eye, persistent=False)
            self.moka_B.append(nn.Parameter(torch.empty(layout[f"moka_B.{j}"], dtype=dtype, device=device)))
        if gating:
            self.moka_gate_logits = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        else:
            self.moka_gate_logits = None
        self.reset_parameters()

        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerged_base = None

    # ------------------------------------------------------------ parameters

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """One factor zero (dW = 0 at the start), the other random with unit gain.

        The random factor ``F`` (rows x cols) gets ``U(-sqrt(3/cols), sqrt(3/cols))``,
        variance ``1/cols``, so ``F v`` keeps the norm of ``v``: the zero factor's
        first gradients (``dB = g sum_t dY_t^T A X_t`` with A random, or the
        mirror image) then have the scale of the activations, as with LoRA's
        B = 0, A = kaiming.
        """
        for j in range(len(self.groups)):
            if self.variant == "moka":
                A, B = self.moka_A[j], self.moka_B[j]
                for t, zero in ((A, self.init == "zero_a"), (B, self.init == "zero_b")):
                    if zero:
                        t.zero_()
                    else:
                        bound = math.sqrt(3.0 / t.shape[-1])
                        t.uniform_(-bound, bound)
            else:
                B = self.moka_B[j]
                if self.init == "zero_b":
                    B.zero_()
                else:
                    bound = math.sqrt(3.0 / B.shape[-1])
                    B.uniform_(-bound, bound)
        if self.moka_gate_logits is not None:
            self.moka_gate_logits.zero_()

    def factors(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(A, B)`` stacked per group, in the float32 parameter dtype (MoKAs' A is the identity)."""
        if self.variant == "moka":
            A = list(self.moka_A)
        else:
            A = [getattr(self, f"moka_identity_{j}") for j in range(len(self.groups))]
        return A, list(self.moka_B)

    def gates(self) -> Tensor:
        """The final mixture weights ``scale * softmax(logits / temperature)`` (or ``scale / r``)."""
        if self.moka_gate_logits is not None:
            return self.scale * gate_softmax(self.moka_gate_logits, self.temperature)
        ref = self.moka_B[0]
        return torch.full((self.r,), self.scale / self.r, dtype=ref.dtype, device=ref.device)

    def delta_weight(self) -> Tensor:
        """``dW = sum_i g_i kron(A_i, B_i)`` (torch.kron convention), ``out x in``, parameter dtype."""
        A, B = self.factors()
        return reference.delta_weight(A, B, self.gates())

    # ---------------------------------------------------------------- forward

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool = True) -> None:
        """Turn the adapter path on (default) or off (the layer then computes ``base(x)``)."""
        self._disable_adapters = not enabled

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return y
        # The adapter runs in the dtype the base layer computed in (its compute
        # dtype, or the autocast dtype), with float32 parameters cast to it;
        # under autocast the op casts its inputs itself.
        dtype = y.dtype
        A, B = self.factors()
        xa = self.moka_dropout(x).to(dtype)
        return kron_mix_add(y, xa, [a.to(dtype) for a in A], [b.to(dtype) for b in B], self.gates().to(dtype))

    # ------------------------------------------------------------------ merge

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add dW into the base weight (re-quantizing a 4-/8-bit base; the original is kept for unmerge).

        ``safe_merge``: check the merged weight for non-finite values first.
        """
        if self.merged:
            warnings.warn("MoKALinear.merge: already merged; nothing to do")
            return
        W = dense_weight(self.base_layer) + self.delta_weight().float()
        if safe_merge and not torch.isfinite(W).all():
            raise ValueError("MoKALinear.merge: the merged weight has non-finite values; not merging")
        base = self.base_layer
        if self.base_kind == "linear":
            self._unmerged_base = base.weight.detach().clone()
            base.weight.copy_(W.to(base.weight.dtype))
        else:
            self._unmerged_base = _snapshot_quantized(base)
            _warn_requantize(self.base_kind)
            _set_quantized_weight(base, self.base_kind, W)
        self.merged_adapters = [self.adapter_name]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight from before merge() exactly."""
        if not self.merged:
            warnings.warn("MoKALinear.unmerge: not merged; nothing to do")
            return
        base = self.base_layer
        if self.base_kind == "linear":
            base.weight.copy_(self._unmerged_base)
        else:
            _restore_quantized(base, self.base_kind, self._unmerged_base)
        self._unmerged_base = None
        self.merged_adapters = []

    def merged_base(self, full_precision: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A plain layer computing ``base + dW``: the base re-quantized, or an ``nn.Linear`` with ``full_precision``.

        ``dtype`` (full precision): the weight dtype, default the base's compute dtype (float32 for bnb bases).
        """
        base = self.base_layer
        W = dense_weight(base) if self.merged else dense_weight(base) + self.delta_weight().detach().float()
        if self.base_kind == "linear" or full_precision:
            if dtype is None:
                dtype = base.weight.dtype if self.base_kind == "linear" else (
                    getattr(base, "compute_dtype", None) or torch.float32
                )
            return plain_linear(W, base.bias, dtype)
        if not self.merged:
            _warn_requantize(self.base_kind)
            with torch.no_grad():
                _set_quantized_weight(base, self.base_kind, W)
        return base

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}x({ma}x{na} (x) {mb}x{nb})" for (ma, na, mb, nb), n in self.groups)
        return f"variant={self.variant}, r={self.r}, gating={self.gating}, shapes=[{shapes}]"


def _device_of(layer: nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")


def _warn_requantize(kind: str) -> None:
    warnings.warn(
        f"MoKA: merging into a {'4-bit' if kind == 'linear4bit' else '8-bit'} base re-quantizes the merged "
        "weight, so the merged layer differs from base + adapter by the quantization rounding; "
        "pass full_precision=True to merge into a full-precision nn.Linear instead",
        stacklevel=3,
    )


def _snapshot_quantized(base: nn.Module):
    w = base.weight
    if isinstance(w, _bnb.nn.Params4bit):
        return ("4bit", w)
    return ("8bit", w, base.state.CB, base.state.SCB)


def _restore_quantized(base: nn.Module, kind: str, snap) -> None:
    base.weight = snap[1]
    if kind == "linear4bit":
        base.quant_state = snap[1].quant_state
    else:
        base.state.CB, base.state.SCB = snap[2], snap[3]


def _set_quantized_weight(base: nn.Module, kind: str, W: Tensor) -> None:
    """Replace a bnb base's weight by the quantization of the dense ``W`` (a new parameter object)."""
    if kind == "linear4bit":
        old = base.weight
        qs = old.quant_state
        packed, new_qs = _bnb.functional.quantize_4bit(
            W.to(qs.dtype),
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            quant_type=qs.quant_type,
            quant_storage=getattr(old, "quant_storage", torch.uint8),
        )
        base.weight = _bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=new_qs,
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            quant_type=qs.quant_type,
            quant_storage=getattr(old, "quant_storage", torch.uint8),
            module=base,
            bnb_quantized=True,
        )
        base.quant_state = new_qs
    else:
        CB, SCB, _ = _bnb.functional.int8_vectorwise_quant(W.float().contiguous())
        base.weight = _bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
        base.weight.CB, base.weight.SCB = CB, SCB
        base.state.CB, base.state.SCB = CB, SCB
