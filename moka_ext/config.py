"""MoKAConfig and the choice of Kronecker factor shapes.

Owns: the user-facing configuration (validated when built) and its
per-module resolution (regex overrides, explicit shapes per module pattern).
The ``"auto"`` shape choice itself lives in ``shapes.py``. Nothing here
touches a model.

``MoKAConfig`` is a dataclass. When PEFT is installed it subclasses
``peft.PeftConfig`` so the same object can be passed to ``peft.get_peft_model``
(the method itself is registered by ``moka_ext.peft_method``); without PEFT it
is a plain dataclass with the same MoKA fields. This module also adds ``MOKA``
to PEFT's ``PeftType`` enum (the type a config names); its value, which every
saved ``adapter_config.json`` carries as ``peft_type``, reads
``"MOKA (import moka_ext first)"``, so that PEFT alone, which does not know the
type, fails with a ``KeyError`` that says what to do.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .shapes import VARIANTS

try:  # PEFT is optional: the adapter layer works without it.
    from peft import PeftConfig as _ConfigBase

    HAVE_PEFT = True
except ImportError:  # pragma: no cover - exercised only without peft installed
    HAVE_PEFT = False

    @dataclass
    class _ConfigBase:  # type: ignore[no-redef]
        """Stand-in for ``peft.PeftConfig`` when PEFT is not installed."""

        task_type: Optional[str] = None
        peft_type: Optional[str] = None

        def __post_init__(self):
            pass

        def to_dict(self) -> dict:
            return dataclasses.asdict(self)


__all__ = ["MoKAConfig", "ModuleSettings", "LLAMA_TARGET_MODULES", "PEFT_TYPE_VALUE", "peft_type"]

PEFT_TYPE_NAME = "MOKA"
# What `peft_type` reads in saved configs. PEFT looks a loaded config's type up
# in its own tables first; without moka_ext imported the lookup raises
# KeyError(<this value>), the only message a saved file can put in front of a
# user who loads it with PEFT alone.
PEFT_TYPE_VALUE = "MOKA (import moka_ext first)"

LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INITS = ("zero_b", "zero_a", "random")
# Fields a per-module override may change (everything that shapes one layer).
OVERRIDABLE = ("r", "shapes", "variant", "gating", "temperature", "scale", "dropout", "init", "budget", "flops")
# The MoKA fields of the config, i.e. what an adapter file must agree on.
MOKA_FIELDS = OVERRIDABLE + (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "overrides",
)


@dataclass(frozen=True)
class ModuleSettings:
    """The resolved MoKA settings for one module (after overrides)."""

    r: int
    shapes: Any  # "auto" or a list of (ma, na, mb, nb)
    variant: str
    gating: bool
    temperature: float
    scale: float
    dropout: float
    init: str
    budget: Optional[int]
    flops: Union[int, str, None]


@dataclass
class MoKAConfig(_ConfigBase):
    """Configuration of a MoKA adapter (DESIGN.md section 1 and 4).

    r: Kronecker components per layer. shapes: ``"auto"``, a list of r
    ``(ma, na, mb, nb)`` (A: ma x na, B: mb x nb, ma*mb == out, na*nb == in),
    or a dict ``{regex: "auto" | list}`` matched (``re.search``) against the
    module name, first match wins, unmatched modules use ``"auto"``. For
    ``variant="mokas"`` (``dW = sum g_i kron(I_k, B_i)``) a shape is
    ``(k, k, out/k, in/k)``. gating: learned softmax gate (True) or fixed
    uniform weights ``scale / r`` (False). init: ``"zero_b"`` (B = 0, A random;
    the default), ``"zero_a"`` (A = 0, B random) or ``"random"`` (both random,
    dW != 0: for tests and experiments). budget: most adapter parameters per
    module for ``"auto"`` (default ``4 * r * sqrt(out * in)`` for MoKA, none
    for MoKAs). flops: most multiply-adds per token per module for ``"auto"``
    shapes: None (no cap, the default), an int, or ``"auto"`` (LoRA r=16's
    at that layer, ``r * (in + out)``). target_modules,
    exclude_modules, layers_to_transform, layers_pattern: PEFT's matching
    rules. overrides: ``{regex: {field: value}}`` applied in order to every
    module whose name matches.
    """

    r: int = 4
    shapes: Any = "auto"
    variant: str = "moka"
    gating: bool = True
    temperature: float = 1.0
    scale: float = 1.0
    dropout: float = 0.0
    init: str = "zero_b"
    budget: Optional[int] = None
    flops: Union[int, str, None] = None
    target_modules: Optional[Union[list[str], str]] = field(
        default_factory=lambda: list(LLAMA_TARGET_MODULES)
    )
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    overrides: Optional[dict] = None
    # PEFT reads these on every config; MoKA does not use them.
    target_parameters: Optional[list[str]] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        super().__post_init__()
        if HAVE_PEFT:
            self.peft_type = peft_type()
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
        if self.target_modules is None or (not isinstance(self.target_modules, str) and len(self.target_modules) == 0):
            raise ValueError(f"MoKAConfig: target_modules must name at least one module, got {self.target_modules!r}")
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.shapes = _normalize_shapes_spec("shapes", self.shapes)
        _check_settings("MoKAConfig", self._base_settings_dict())
        if self.overrides is not None:
            if not isinstance(self.overrides, dict):
                raise ValueError(
                    f"MoKAConfig: overrides must be a dict {{regex: {{field: value}}}}, got {type(self.overrides).__name__}"
                )
            normalized = {}
            for pattern, values in self.overrides.items():
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise ValueError(f"MoKAConfig: overrides key {pattern!r} is not a valid regex: {e}") from None
                if not isinstance(values, dict):
                    raise ValueError(
                        f"MoKAConfig: overrides[{pattern!r}] must be a dict of fields, got {type(values).__name__}"
                    )
                unknown = sorted(set(values) - set(OVERRIDABLE))
                if unknown:
                    raise ValueError(
                        f"MoKAConfig: overrides[{pattern!r}] has unknown fields {unknown}; allowed: {list(OVERRIDABLE)}"
                    )
                values = dict(values)
                if "shapes" in values:
                    values["shapes"] = _normalize_shapes_spec(f"overrides[{pattern!r}]['shapes']", values["shapes"])
                # The base shapes may be per-pattern for other modules; check the
                # override's own shapes here, the combination at apply time.
                merged = {**self._base_settings_dict(), "shapes": "auto", **values}
                _check_settings(f"MoKAConfig: overrides[{pattern!r}]", merged)
                normalized[pattern] = values
            self.overrides = normalized

    def _base_settings_dict(self) -> dict:
        return {k: getattr(self, k) for k in OVERRIDABLE}

    def resolve(self, module_name: str) -> ModuleSettings:
        """The settings for the module called ``module_name`` (overrides applied, shapes per pattern picked)."""
        values = self._base_settings_dict()
        for pattern, over in (self.overrides or {}).items():
            if re.search(pattern, module_name):
                values.update(over)
        shapes = values["shapes"]
        if isinstance(shapes, dict):
            shapes = next((spec for pat, spec in shapes.items() if re.search(pat, module_name)), "auto")
        values["shapes"] = shapes
        return ModuleSettings(**values)

    def moka_dict(self) -> dict:
        """The MoKA fields only, JSON-ready (what an adapter file stores and checks)."""
        return {k: _jsonable(getattr(self, k)) for k in MOKA_FIELDS}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _normalize_shapes_spec(where: str, spec):
    """``"auto"``, a list of 4-int shapes (as tuples), or ``{regex: one of those}``."""
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"{where}: must be 'auto', a list of (ma, na, mb, nb) or a dict {{regex: ...}}, got {spec!r}")
        return spec
    if isinstance(spec, dict):
        out = {}
        for pattern, sub in spec.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"{where}: key {pattern!r} is not a valid regex: {e}") from None
            if isinstance(sub, dict):
                raise ValueError(f"{where}[{pattern!r}]: nested dicts are not allowed")
            out[pattern] = _normalize_shapes_spec(f"{where}[{pattern!r}]", sub)
        return out
    if isinstance(spec, (list, tuple)):
        if len(spec) == 0:
            raise ValueError(f"{where}: an explicit shape list must not be empty")
        shapes = []
        for i, s in enumerate(spec):
            if (
                not isinstance(s, (list, tuple))
                or len(s) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in s)
                or any(v < 1 for v in s)
            ):
                raise ValueError(f"{where}[{i}]: expected 4 positive ints (ma, na, mb, nb), got {s!r}")
            shapes.append(tuple(s))
        return shapes
    raise ValueError(f"{where}: must be 'auto', a list of (ma, na, mb, nb) or a dict, got {type(spec).__name__}")


def _check_settings(where: str, v: dict) -> None:
    r = v["r"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: r must be an int >= 1 (Kronecker components per layer), got {r!r}")
    if v["variant"] not in VARIANTS:
        raise ValueError(f"{where}: variant must be one of {list(VARIANTS)}, got {v['variant']!r}")
    if not isinstance(v["gating"], bool):
        raise ValueError(f"{where}: gating must be True or False, got {v['gating']!r}")
    t = v["temperature"]
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {t!r}")
    s = v["scale"]
    if not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"{where}: scale must be a finite number, got {s!r}")
    d = v["dropout"]
    if not isinstance(d, (int, float)) or not (0.0 <= d < 1.0):
        raise ValueError(f"{where}: dropout must be in [0, 1), got {d!r}")
    if v["init"] not in INITS:
        raise ValueError(f"{where}: init must be one of {list(INITS)}, got {v['init']!r}")
    if v["variant"] == "mokas" and v["init"] == "zero_a":
        raise ValueError(f"{where}: init='zero_a' is impossible for variant='mokas' (A is the fixed identity); use 'zero_b'")
    b = v["budget"]
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
        raise ValueError(f"{where}: budget must be None or an int >= 1 (adapter parameters per module), got {b!r}")
    f = v["flops"]
    if f is not None and f != "auto" and (not isinstance(f, int) or isinstance(f, bool) or f < 1):
        raise ValueError(f"{where}: flops must be None, 'auto' or an int >= 1 (multiply-adds per token per module), got {f!r}")
    shapes = v["shapes"]
    specs = shapes.values() if isinstance(shapes, dict) else [shapes]
    for spec in specs:
        if isinstance(spec, list):
            if len(spec) != r:
                raise ValueError(f"{where}: shapes lists {len(spec)} components but r={r}; give exactly r shapes")
            if v["variant"] == "mokas":
                for s in spec:
                    if s[0] != s[1]:
                        raise ValueError(
                            f"{where}: variant='mokas' needs square identity factors (k, k, out/k, in/k), got {s}"
                        )


def _extend_enum(enum_cls, name: str, value: str):
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


def peft_type():
    """``peft.PeftType.MOKA`` (added on first call); needs PEFT. ``PeftType("MOKA")`` finds it
    too (the value in adapter files of format version 1)."""
    from peft.utils import PeftType

    member = _extend_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_VALUE)
    PeftType._value2member_map_.setdefault(PEFT_TYPE_NAME, member)
    return member
