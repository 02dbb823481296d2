"""MoKALinear: named MoKA adapters around a frozen linear layer.

Owns: the adapter parameters of one layer, keyed by adapter name as PEFT's
layers keep them, and their initialization; the active set; the forward pass
through the moka ops (active adapters summed, or one adapter per row of a mixed
batch); merge/unmerge per adapter into the base weight; and the
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
from .ops import gate_softmax, kron_mix, kron_mix_add, kron_mix_indexed

try:  # bitsandbytes is optional: plain nn.Linear bases need none of it.
    import bitsandbytes as _bnb
except ImportError:  # pragma: no cover
    _bnb = None

__all__ = [
    "BASE_ROW",
    "MoKALinear",
    "RowAdapters",
    "adapter_tensor_shapes",
    "base_kind",
    "dense_weight",
    "disable_cpu_inference_repack",
    "group_shapes",
    "has_gate_logits",
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


def has_gate_logits(r: int, gating: bool) -> bool:
    # One component's softmax is 1 whatever its logit: a logit there would be a
    # parameter with an always-zero gradient.
    return gating and r > 1


def adapter_tensor_shapes(shapes: Sequence[Shape], variant: str, gating: bool) -> dict[str, tuple]:
    """Name -> shape of every trainable tensor of one adapter of a layer, named as in its files
    (``moka_A.<j>``, ``moka_B.<j>``, ``moka_gate_logits``; the model's own names add the adapter
    name after the first part, PEFT's convention)."""
    out = {}
    groups = group_shapes(shapes)
    for j, ((ma, na, mb, nb), r_j) in enumerate(groups):
        if variant == "moka":
            out[f"moka_A.{j}"] = (r_j, ma, na)
        out[f"moka_B.{j}"] = (r_j, mb, nb)
    r = sum(n for _, n in groups)
    if has_gate_logits(r, gating):
        out["moka_gate_logits"] = (r,)
    return out


BASE_ROW = "__base__"  # a row of a mixed batch that gets no adapter


class RowAdapters:
    """The adapter of every row of a mixed batch: ``names`` (the distinct adapters, in sorted
    order, ``"__base__"`` included if present) and ``index`` (int64, one entry per row, into
    ``names``). Built once per forward and shared by every layer."""

    def __init__(self, names: Sequence[str], index: Tensor) -> None:
        self.names = tuple(names)
        self.index = index

    @classmethod
    def from_names(cls, adapter_names: Sequence[str]) -> "RowAdapters":
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of str (one per row), got {adapter_names!r}")
        if len(adapter_names) == 0:
            return cls((), torch.zeros(0, dtype=torch.long))
        # numpy's unique keeps the per-row work out of Python.
        import numpy as np

        names, inverse = np.unique(np.asarray(adapter_names, dtype=str), return_inverse=True)
        return cls([str(n) for n in names], torch.from_numpy(inverse.astype(np.int64).reshape(-1)))

    def __len__(self) -> int:
        return int(self.index.numel())


class MoKALinear(nn.Module):
    """``y = base(x) + sum over active adapters of x @ dW_a.T``, ``dW_a = sum_i g_i kron(A_i, B_i)``
    (DESIGN.md section 1), with any number of named adapters, as PEFT's layers hold them.

    The base layer is frozen. Per adapter ``a``: ``moka_A[a][j]`` (``(r_j, ma, na)``, absent
    for MoKAs, whose A is a fixed identity) and ``moka_B[a][j]`` (``(r_j, mb, nb)``) per
    factor-shape group j, ``moka_gate_logits[a]`` (``(r,)``, only with gating and r > 1), and
    its own settings in the dicts ``r``, ``shapes``, ``groups``, ``variant``, ``gating``,
    ``temperature``, ``scale``, ``init`` and ``moka_dropout``. The constructor adds the first
    adapter (``adapter_name``) with ``update_layer``; ``shapes`` lists one ``(ma, na, mb, nb)``
    per component or is ``"auto"``.

    Several active adapters add their updates: one kron_mix call over the union of their
    groups, each adapter's gates in one flat vector (one call per adapter when dropout is on
    in training, so that each adapter draws its own mask). ``forward(x, adapter_names=...)``
    gives every row of a batch its own adapter (``"__base__"``: none).
    """

    adapter_layer_names = ("moka_A", "moka_B", "moka_gate_logits")
    other_param_names = ("r", "shapes", "groups", "variant", "gating", "temperature", "scale", "init", "moka_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", **settings) -> None:
        """Wrap ``base_layer`` and add its first adapter: ``settings`` as in ``update_layer``."""
        super().__init__()
        self.base_kind = base_kind(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.base_layer = base_layer
        self.moka_A = nn.ModuleDict()
        self.moka_B = nn.ModuleDict()
        self.moka_gate_logits = nn.ParameterDict()
        self.moka_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.shapes: dict[str, list] = {}
        self.groups: dict[str, list] = {}
        self.variant: dict[str, str] = {}
        self.gating: dict[str, bool] = {}
        self.temperature: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.init: dict[str, str] = {}
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerged_base = None
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(adapter_name, **settings)

    # ------------------------------------------------------------ adapters

    def update_layer(
        self,
        adapter_name: str,
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
    ) -> None:
        """Add the adapter ``adapter_name`` with its own settings (validated before anything changes)."""
        where = f"MoKALinear.update_layer({adapter_name!r})"
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == BASE_ROW:
            raise ValueError(f"{where}: adapter_name must be a non-empty str without '.' and not {BASE_ROW!r}")
        if adapter_name in self.r:
            raise ValueError(f"{where}: this layer already has an adapter called {adapter_name!r}; delete it first")
        if variant not in ("moka", "mokas"):
            raise ValueError(f"{where}: variant must be 'moka' or 'mokas', got {variant!r}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"{where}: r must be an int >= 1, got {r!r}")
        if init not in ("zero_b", "zero_a", "random") or (variant == "mokas" and init == "zero_a"):
            raise ValueError(
                f"{where}: init must be 'zero_b', 'zero_a' or 'random' ('zero_b'/'random' for mokas), got {init!r}"
            )
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout!r}")
        if isinstance(shapes, str) and shapes == "auto":
            shapes = choose_shapes(self.out_features, self.in_features, r, variant, budget, flops)
        shapes = [
            validate_shape(s, self.out_features, self.in_features, variant, where=f"{where} shapes[{i}]")
            for i, s in enumerate(shapes)
        ]
        if len(shapes) != r:
            raise ValueError(f"{where}: got {len(shapes)} shapes for r={r}; give exactly r shapes")
        if self.base_kind == "linear4bit":  # (only once the settings are known to be valid)
            _undo_cpu_inference_packing(self.base_layer)
        groups = group_shapes(shapes)
        device = _device_of(self.base_layer)
        layout = adapter_tensor_shapes(shapes, variant, gating)
        A, B = nn.ParameterList(), nn.ParameterList()
        for j in range(len(groups)):
            if variant == "moka":
                A.append(nn.Parameter(torch.empty(layout[f"moka_A.{j}"], dtype=dtype, device=device)))
            B.append(nn.Parameter(torch.empty(layout[f"moka_B.{j}"], dtype=dtype, device=device)))
        if variant == "moka":
            self.moka_A[adapter_name] = A
        self.moka_B[adapter_name] = B
        if "moka_gate_logits" in layout:
            self.moka_gate_logits[adapter_name] = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.moka_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        # Component order is group order: gates[i] belongs to shapes[i].
        self.shapes[adapter_name] = [s for s, n in groups for _ in range(n)]
        self.groups[adapter_name] = groups
        self.variant[adapter_name] = variant
        self.gating[adapter_name] = bool(gating)
        self.temperature[adapter_name] = float(temperature)
        self.scale[adapter_name] = float(scale)
        self.init[adapter_name] = init
        self.reset_parameters(adapter_name)
        self.set_adapter(self.active_adapters)

    def _check_adapter(self, adapter_name: str, what: str) -> None:
        if adapter_name not in self.r:
            raise ValueError(
                f"MoKALinear.{what}: no adapter called {adapter_name!r} in this layer (it has {sorted(self.r)})"
            )

    @property
    def active_adapter(self):
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        """Make ``adapter_names`` (a name or a list) the active adapters, trainable unless
        ``inference_mode``; every other adapter is frozen. Names this layer lacks are allowed
        (PEFT adapters need not cover every layer) and skipped in its forward."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.r:
            grad = name in names and not inference_mode and not self._disable_adapters
            for p in self._adapter_params(name):
                p.requires_grad_(grad)
        self._active_adapter = names

    def _adapter_params(self, adapter_name: str) -> list[nn.Parameter]:
        out = list(self.moka_A[adapter_name]) if adapter_name in self.moka_A else []
        out += list(self.moka_B[adapter_name])
        if adapter_name in self.moka_gate_logits:
            out.append(self.moka_gate_logits[adapter_name])
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged); a deleted active adapter leaves the active set.
        A name this layer does not have is ignored, as in PEFT's layers (model-level callers check
        names against the whole model)."""
        if adapter_name not in self.r:
            return
        if adapter_name in self.merged_adapters:
            raise ValueError(f"MoKALinear.delete_adapter: {adapter_name!r} is merged; unmerge() first")
        for attr in self.adapter_layer_names + self.other_param_names:
            d = getattr(self, attr)
            if adapter_name in d:
                del d[adapter_name]
        if adapter_name in self.active_adapters:
            rest = [a for a in self.active_adapters if a != adapter_name]
            self.set_adapter(rest if rest else sorted(self.r)[:1])

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.r)

    def _get_available_adapters(self) -> set[str]:
        return set(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool = True) -> None:
        """Turn the adapter path on (default) or off (the layer then computes ``base(x)``;
        adapter parameters stop requiring gradients until it is turned on again)."""
        self._disable_adapters = not enabled
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for name in self.r:
                for p in self._adapter_params(name):
                    p.requires_grad_(False)

    # ------------------------------------------------------------ parameters

    @torch.no_grad()
    def reset_parameters(self, adapter_name: Optional[str] = None) -> None:
        """One factor zero (dW = 0 at the start), the other random with unit gain.

        The random factor ``F`` (rows x cols) gets ``U(-sqrt(3/cols), sqrt(3/cols))``,
        variance ``1/cols``, so ``F v`` keeps the norm of ``v``: the zero factor's
        first gradients (``dB = g sum_t dY_t^T A X_t`` with A random, or the
        mirror image) then have the scale of the activations, as with LoRA's
        B = 0, A = kaiming. ``adapter_name=None``: every adapter.
        """
        for name in ([adapter_name] if adapter_name is not None else list(self.r)):
            init = self.init[name]
            for j in range(len(self.groups[name])):
                pairs = [(self.moka_B[name][j], init == "zero_b")]
                if self.variant[name] == "moka":
                    pairs.append((self.moka_A[name][j], init == "zero_a"))
                for t, zero in pairs:
                    if t.is_meta:  # created empty to be loaded (PEFT's low_cpu_mem_usage)
                        continue
                    if zero:
                        t.zero_()
                    else:
                        bound = math.sqrt(3.0 / t.shape[-1])
                        t.uniform_(-bound, bound)
            if name in self.moka_gate_logits and not self.moka_gate_logits[name].is_meta:
                self.moka_gate_logits[name].zero_()

    def _name(self, adapter_name: Optional[str], what: str) -> str:
        if adapter_name is None:
            if len(self.r) != 1:
                raise ValueError(
                    f"MoKALinear.{what}: this layer has adapters {sorted(self.r)}; say which (adapter_name=...)"
                )
            return next(iter(self.r))
        self._check_adapter(adapter_name, what)
        return adapter_name

    def factors(self, adapter_name: Optional[str] = None) -> tuple[list[Tensor], list[Tensor]]:
        """``(A, B)`` of one adapter stacked per group, in the parameter dtype (MoKAs' A is the identity).

        ``adapter_name`` may be left out when the layer has one adapter.
        """
        name = self._name(adapter_name, "factors")
        B = list(self.moka_B[name])
        if self.variant[name] == "moka":
            return list(self.moka_A[name]), B
        # The fixed identity factor of MoKAs: never trained, never saved.
        A = [
            torch.eye(ma, dtype=b.dtype, device=b.device).expand(n, ma, ma)
            for ((ma, _, _, _), n), b in zip(self.groups[name], B)
        ]
        return A, B

    def gates(self, adapter_name: Optional[str] = None) -> Tensor:
        """One adapter's mixture weights ``scale * softmax(logits / temperature)`` (or ``scale / r``)."""
        name = self._name(adapter_name, "gates")
        if name in self.moka_gate_logits:
            return self.scale[name] * gate_softmax(self.moka_gate_logits[name], self.temperature[name])
        ref = self.moka_B[name][0]
        return torch.full((self.r[name],), self.scale[name] / self.r[name], dtype=ref.dtype, device=ref.device)

    def delta_weight(self, adapter_name: Optional[str] = None) -> Tensor:
        """One adapter's ``dW = sum_i g_i kron(A_i, B_i)`` (torch.kron convention), ``out x in``."""
        name = self._name(adapter_name, "delta_weight")
        A, B = self.factors(name)
        return reference.delta_weight(A, B, self.gates(name))

    # ---------------------------------------------------------------- forward

    def _present(self, names: Sequence[str]) -> list[str]:
        return [a for a in names if a in self.r]

    def forward(self, x: Tensor, *args, adapter_names=None, **kwargs) -> Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError(
                    "MoKALinear: Cannot pass `adapter_names` when there are merged adapters, please call "
                    "`unmerge_adapter` first."
                )
            rows = adapter_names if isinstance(adapter_names, RowAdapters) else RowAdapters.from_names(adapter_names)
            return self._mixed_forward(x, rows, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        active = self._present(self.active_adapters)
        if self.merged or not active:
            return y
        # The adapter runs in the dtype the base layer computed in (its compute
        # dtype, or the autocast dtype), with float32 parameters cast to it;
        # under autocast the op casts its inputs itself.
        dtype = y.dtype
        own_masks = self.training and any(isinstance(self.moka_dropout[a], nn.Dropout) for a in active)
        batches = [[a] for a in active] if own_masks else [active]
        for names in batches:
            A, B, g = [], [], []
            for a in names:
                fa, fb = self.factors(a)
                A += fa
                B += fb
                g.append(self.gates(a))
            xa = self.moka_dropout[names[0]](x).to(dtype)
            gates = torch.cat(g) if len(g) > 1 else g[0]
            y = kron_mix_add(y, xa, [t.to(dtype) for t in A], [t.to(dtype) for t in B], gates.to(dtype))
        return y

    def same_structure(self, names: Sequence[str]) -> bool:
        """Whether the adapters ``names`` have equal variant and factor-shape groups (what
        kron_mix_indexed needs to stack them)."""
        first = names[0]
        return all(self.variant[a] == self.variant[first] and self.groups[a] == self.groups[first] for a in names)

    def _mixed_forward(self, x: Tensor, rows: RowAdapters, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if x.dim() < 2 or x.shape[0] != len(rows):
            raise ValueError(
                f"MoKALinear: Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(rows)} names for an input of shape {tuple(x.shape)} (one name per row of the batch)"
            )
        present = [(k, a) for k, a in enumerate(rows.names) if a in self.r]
        if not present:
            return y
        dtype = y.dtype
        names = [a for _, a in present]
        index = rows.index.to(x.device)
        own_masks = self.training and any(isinstance(self.moka_dropout[a], nn.Dropout) for a in names)
        if self.same_structure(names) and not own_masks:
            # One call for the whole batch: the factors of the adapters in the batch
            # stacked along a new leading dim, each row indexing its own.
            local = torch.full((len(rows.names),), -1, dtype=torch.long, device=x.device)
            local[torch.tensor([k for k, _ in present], device=x.device)] = torch.arange(len(present), device=x.device)
            fs = [self.factors(a) for a in names]
            A = [torch.stack([f[0][j] for f in fs]).to(dtype) for j in range(len(fs[0][0]))]
            B = [torch.stack([f[1][j] for f in fs]).to(dtype) for j in range(len(fs[0][1]))]
            gates = torch.stack([self.gates(a) for a in names]).to(dtype)
            return y + kron_mix_indexed(x.to(dtype), local[index], A, B, gates)
        return y + self._grouped_delta(x, index, present, dtype)

    def _grouped_delta(self, x: Tensor, index: Tensor, present, dtype) -> Tensor:
        """The mixed-batch update one adapter at a time: each adapter's rows gathered, mixed and
        scattered back (a loop over the adapters in the batch, not over rows)."""
        out = None
        for k, a in present:
            rows = (index == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            A, B = self.factors(a)
            xa = self.moka_dropout[a](x.index_select(0, rows)).to(dtype)
            d = kron_mix(xa, [t.to(dtype) for t in A], [t.to(dtype) for t in B], self.gates(a).to(dtype))
            if out is None:
                out = x.new_zeros((*x.shape[:-1], self.out_features), dtype=dtype)
            out = out.index_add(0, rows, d)
        return out if out is not None else x.new_zeros((*x.shape[:-1], self.out_features), dtype=dtype)

    # ------------------------------------------------------------------ merge

    def _merge_names(self, adapter_names, what: str) -> list[str]:
        names = self._present(self.active_adapters) if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        )
        for a in names:
            self._check_adapter(a, what)
        return names

    @torch.no_grad()
    def _merged_dense(self, names: Sequence[str]) -> Tensor:
        """The base weight plus the updates of ``names``, in float32 (float64 for a float64 base)."""
        W = dense_weight(self.base_layer)
        if self.base_kind == "linear" and self.base_layer.weight.dtype == torch.float64:
            W = self.base_layer.weight.detach().clone()
        for a in names:
            W = W + self.delta_weight(a).detach().to(W.dtype)
        return W

    @torch.no_grad()
    def _write_merged(self, names: list[str], safe_merge: bool = False) -> None:
        """Set the base weight to the original weight plus the updates of ``names`` (the original
        is kept, so every merge and unmerge starts from it, never from a rounded merge)."""
        base = self.base_layer
        if self._unmerged_base is not None:
            self._restore_base()
        if not names:
            return
        W = self._merged_dense(names)
        if safe_merge and not torch.isfinite(W).all():
            if self.merged_adapters:  # back to the merge that was in place
                self._write_merged(self.merged_adapters)
            raise ValueError(f"MoKALinear.merge: the merged weight with {names} has non-finite values; not merging")
        if self.base_kind == "linear":
            self._unmerged_base = base.weight.detach().clone()
            base.weight.copy_(W.to(base.weight.dtype))
        else:
            self._unmerged_base = _snapshot_quantized(base)
            _warn_requantize(self.base_kind)
            _set_quantized_weight(base, self.base_kind, W)

    @torch.no_grad()
    def _restore_base(self) -> None:
        base = self.base_layer
        if self.base_kind == "linear":
            base.weight.copy_(self._unmerged_base)
        else:
            _restore_quantized(base, self.base_kind, self._unmerged_base)
        self._unmerged_base = None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the updates of ``adapter_names`` (default: the active adapters) into the base
        weight, re-quantizing a 4-/8-bit base; the original is kept for unmerge.

        Naming an adapter this layer does not have is an error. ``safe_merge``: check the
        merged weight for non-finite values first.
        """
        names = self._merge_names(adapter_names, "merge")
        new = [a for a in names if a not in self.merged_adapters]
        if not new:
            warnings.warn("MoKALinear.merge: All adapters are already merged, nothing to do.")
            return
        self._write_merged(self.merged_adapters + new, safe_merge)
        self.merged_adapters = self.merged_adapters + new

    def unmerge(self, adapter_names: Optional[list[str]] = None) -> None:
        """Take merged adapters (default: all) out of the base weight; with none left merged,
        the base weight is exactly the one from before the first merge."""
        if not self.merged:
            warnings.warn("MoKALinear.unmerge: not merged; nothing to do")
            return
        drop = list(self.merged_adapters) if adapter_names is None else self._merge_names(adapter_names, "unmerge")
        keep = [a for a in self.merged_adapters if a not in drop]
        self._write_merged(keep)
        self.merged_adapters = keep

    def merged_base(
        self, full_precision: bool = False, dtype: Optional[torch.dtype] = None, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """A plain layer computing ``base + sum of dW`` over ``adapter_names`` (default: the
        active adapters; merged ones are in the base already): the base re-quantized, or an
        ``nn.Linear`` with ``full_precision``.

        ``dtype`` (full precision): the weight dtype, default the base's compute dtype (float32 for bnb bases).
        """
        base = self.base_layer
        names = [a for a in self._merge_names(adapter_names, "merged_base") if a not in self.merged_adapters]
        W = self._merged_dense(names)
        if self.base_kind == "linear" or full_precision:
            if dtype is None:
                dtype = base.weight.dtype if self.base_kind == "linear" else (
                    getattr(base, "compute_dtype", None) or torch.float32
                )
            return plain_linear(W, base.bias, dtype)
        if names:
            _warn_requantize(self.base_kind)
            with torch.no_grad():
                _set_quantized_weight(base, self.base_kind, W)
        return base

    def extra_repr(self) -> str:
        parts = []
        for a in self.r:
            shapes = ", ".join(f"{n}x({ma}x{na} (x) {mb}x{nb})" for (ma, na, mb, nb), n in self.groups[a])
            parts.append(
                f"{a}: variant={self.variant[a]}, r={self.r[a]}, gating={self.gating[a]}, shapes=[{shapes}]"
            )
        return "; ".join(parts)


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
