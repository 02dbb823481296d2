"""Saving and loading MoKA adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

Owns: the adapter file format, atomic writes and the full validation of a
file before any weight of a model changes. Only safetensors is read; nothing
is ever unpickled.

Format (PEFT's layout, so that ``save_adapter``, PEFT's ``save_pretrained``,
``PeftModel.from_pretrained`` and ``load_adapter`` all read and write the same
files): the safetensors file holds one tensor per adapter parameter, keyed
``base_model.model.<module name>.<parameter>`` with the adapter name left out
(e.g. ``base_model.model.model.layers.0.self_attn.q_proj.moka_B.0``), and
``adapter_config.json`` is the config as PEFT writes it. ``save_adapter`` also
puts, in the safetensors metadata (key ``moka_config``), the config plus the
layout of every adapted module; when present it is the authority. The weights
file is replaced in one ``os.replace``, so a reader sees either the previous
adapter or the new one, never a mix; ``adapter_config.json`` is written first,
so after an interrupted save it may be ahead of the weights, which
``load_adapter`` notices and reports.

Older files (format version 1: keys ``<module name>.<parameter>``, the config
in the metadata and in ``adapter_config.json`` with moka_ext's own header)
still load.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Optional

import torch
from torch import nn

from ._version import __version__
from .config import MOKA_FIELDS, PEFT_TYPE_NAME, PEFT_TYPE_VALUE, MoKAConfig
from .model import apply_moka, moka_layers, plan_moka

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME", "AdapterFileError", "SaveAdapterCallback"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "moka_ext.adapter"
FORMAT_VERSION = 2
KEY_PREFIX = "base_model.model."  # PEFT's prefix of every saved key


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the model."""


def _configs_of(model: nn.Module) -> dict:
    cfgs = getattr(model, "moka_configs", None)
    if cfgs:
        return cfgs
    peft_cfg = getattr(model, "peft_config", None)
    if isinstance(peft_cfg, dict):
        return {k: v for k, v in peft_cfg.items() if isinstance(v, MoKAConfig)}
    return {}


def _adapter_of(model: nn.Module, adapter_name: Optional[str], what: str) -> tuple[str, MoKAConfig]:
    cfgs = _configs_of(model)
    if not cfgs:
        raise ValueError(f"{what}: model carries no MoKA adapter (call moka_ext.apply_moka(model, config) first)")
    if adapter_name is None:
        if len(cfgs) != 1:
            raise ValueError(f"{what}: the model has adapters {sorted(cfgs)}; say which (adapter_name=...)")
        adapter_name = next(iter(cfgs))
    if adapter_name not in cfgs:
        raise ValueError(f"{what}: no adapter called {adapter_name!r} in the model (it has {sorted(cfgs)})")
    return adapter_name, cfgs[adapter_name]


def _layers(model: nn.Module, adapter_name: str) -> dict:
    """Module name (as in the unwrapped model) -> MoKALinear, for the layers that have the adapter."""
    out = {}
    for name, m in moka_layers(model).items():
        if adapter_name in m.r:
            out[name.removeprefix(KEY_PREFIX)] = m
    return out


def _layout_entry(m, a: str) -> dict:
    return {
        "base_kind": m.base_kind,
        "out_features": m.out_features,
        "in_features": m.in_features,
        "variant": m.variant[a],
        "gating": m.gating[a],
        "temperature": m.temperature[a],
        "scale": m.scale[a],
        "shapes": [list(s) for s in m.shapes[a]],
    }


def _adapter_tensors(layer, adapter_name: str) -> dict[str, torch.Tensor]:
    """File name (``moka_B.0``...) -> parameter of one adapter of a layer."""
    out = {}
    if adapter_name in layer.moka_A:
        out.update({f"moka_A.{j}": p for j, p in enumerate(layer.moka_A[adapter_name])})
    out.update({f"moka_B.{j}": p for j, p in enumerate(layer.moka_B[adapter_name])})
    if adapter_name in layer.moka_gate_logits:
        out["moka_gate_logits"] = layer.moka_gate_logits[adapter_name]
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(directory: str, name: str, write) -> None:
    """Write ``directory/name`` via a temp file in the same directory, fsync, os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _peft_config_json(cfg: MoKAConfig) -> dict:
    """The config as PEFT's ``save_pretrained`` writes it (JSON types only)."""
    d = cfg.to_dict()
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    d.update(cfg.moka_dict())
    d["peft_type"] = PEFT_TYPE_VALUE
    if d.get("task_type") is not None:
        d["task_type"] = str(getattr(d["task_type"], "value", d["task_type"]))
    return json.loads(json.dumps(d, default=str))


def save_adapter(model: nn.Module, directory: str, adapter_name: Optional[str] = None) -> None:
    """Write the adapter ``adapter_name`` of ``model`` (default: its only one) to ``directory``
    (created if needed), atomically, in PEFT's layout.

    An interrupted save leaves the previous adapter in ``directory`` loadable.
    """
    from safetensors.torch import save_file

    adapter_name, cfg = _adapter_of(model, adapter_name, "save_adapter")
    layers = _layers(model, adapter_name)
    tensors, layout = {}, {}
    for name, layer in layers.items():
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"save_adapter: adapter {adapter_name!r} is merged in layer {name!r}; unmerge() first")
        for pname, p in _adapter_tensors(layer, adapter_name).items():
            tensors[f"{KEY_PREFIX}{name}.{pname}"] = p.detach().to("cpu").contiguous().clone()
        layout[name] = _layout_entry(layer, adapter_name)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moka_ext_version": __version__,
        "peft_type": PEFT_TYPE_VALUE,
        **cfg.moka_dict(),
        "moka_modules": layout,
    }
    config_text = json.dumps(_peft_config_json(cfg), indent=2, sort_keys=True)
    os.makedirs(directory, exist_ok=True)

    def write_config(path):
        with open(path, "w") as f:
            f.write(config_text + "\n")

    _write_atomic(directory, CONFIG_NAME, write_config)
    meta = {"format": "pt", "moka_config": json.dumps(header, sort_keys=True)}
    _write_atomic(directory, WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata=meta))


def _read(directory: str) -> tuple[dict, dict[str, torch.Tensor], int]:
    """Parse and fully read an adapter directory: (header, tensors keyed ``<module>.<parameter>``,
    format version); raise AdapterFileError on any defect.

    The header is the metadata ``save_adapter`` writes, or for a file written by PEFT's
    ``save_pretrained`` (no such metadata) the MoKA fields of ``adapter_config.json``.
    """
    from safetensors import safe_open

    path = os.path.join(str(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"load_adapter: directory={str(directory)!r} has no {WEIGHTS_NAME}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or short data
        raise AdapterFileError(
            f"load_adapter: {path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    cpath = os.path.join(str(directory), CONFIG_NAME)
    side = None
    if os.path.isfile(cpath):
        try:
            with open(cpath) as f:
                side = json.load(f)
        except (OSError, json.JSONDecodeError):
            side = None
    if "moka_config" in meta:
        try:
            header = json.loads(meta["moka_config"])
        except json.JSONDecodeError as e:
            raise AdapterFileError(f"load_adapter: the config stored in {path} is not valid JSON: {e}") from None
        version = header.get("format_version")
        if header.get("format") != FORMAT or version not in (1, FORMAT_VERSION):
            raise AdapterFileError(
                f"load_adapter: {path}: expected format {FORMAT!r} version 1 or {FORMAT_VERSION}, got "
                f"{header.get('format')!r} version {version!r}"
            )
        if side is None or {k: side.get(k) for k in MOKA_FIELDS} != {k: header.get(k) for k in MOKA_FIELDS}:
            warnings.warn(
                f"load_adapter: {cpath} does not match the config stored in {WEIGHTS_NAME} "
                "(edited, or a save was interrupted); using the one in the weights file",
                stacklevel=3,
            )
    else:
        if not isinstance(side, dict):
            raise AdapterFileError(
                f"load_adapter: {path} has no 'moka_config' metadata and {cpath} is missing or not valid JSON; "
                "it is not a MoKA adapter"
            )
        if side.get("peft_type") not in (PEFT_TYPE_NAME, PEFT_TYPE_VALUE):
            raise AdapterFileError(
                f"load_adapter: {cpath} names peft_type {side.get('peft_type')!r}, not MoKA ({PEFT_TYPE_VALUE!r})"
            )
        header, version = side, FORMAT_VERSION
    if version >= 2:
        bad = [k for k in tensors if not k.startswith(KEY_PREFIX)]
        if bad:
            raise AdapterFileError(f"load_adapter: keys must start with {KEY_PREFIX!r} (PEFT's layout), got {bad[:3]}")
        tensors = {k[len(KEY_PREFIX):]: v for k, v in tensors.items()}
    else:
        # A single gate logit was saved for r = 1; it never mattered (softmax of one value is 1).
        tensors = {
            k: v for k, v in tensors.items() if not (k.endswith(".moka_gate_logits") and tuple(v.shape) == (1,))
        }
    return header, tensors, version


def _config_from_header(header: dict) -> MoKAConfig:
    try:
        return MoKAConfig(**{k: header[k] for k in MOKA_FIELDS if k in header})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"load_adapter: the stored config is invalid: {e}") from None


def load_adapter(
    model: nn.Module, directory: str, adapter_name: str = "default", strict_config: bool = True
) -> nn.Module:
    """Load the adapter in ``directory`` into ``model`` as ``adapter_name`` and return the model.

    If the model has no adapter of that name, it is added from the stored config
    (active if it is the model's first adapter, else inactive, as in PEFT);
    otherwise its weights are replaced. Everything (the file, the config, every
    key, shape and dtype) is checked before any weight changes; on any mismatch
    an ``AdapterFileError`` says what was expected and what was found, and the
    model is left as it was. ``strict_config``: also require the config of an
    existing adapter to equal the stored one.
    """
    header, tensors, _ = _read(directory)
    stored_cfg = _config_from_header(header)
    stored_layout = header.get("moka_modules")
    if stored_layout is not None and not isinstance(stored_layout, dict):
        raise AdapterFileError("load_adapter: the stored 'moka_modules' layout is not a dict")

    layers = _layers(model, adapter_name)
    if layers:
        have_cfg = _configs_of(model).get(adapter_name)
        if strict_config and isinstance(have_cfg, MoKAConfig) and have_cfg.moka_dict() != stored_cfg.moka_dict():
            have = have_cfg.moka_dict()
            diff = {k: (v, have[k]) for k, v in stored_cfg.moka_dict().items() if have[k] != v}
            raise AdapterFileError(
                f"load_adapter: the adapter's config differs from the model's adapter {adapter_name!r} "
                f"(field: (stored, model)): {diff}"
            )
        have_layout = {name: _layout_entry(m, adapter_name) for name, m in layers.items()}
        expected = {
            f"{name}.{pname}": (tuple(p.shape), p.dtype) for name, m in layers.items()
            for pname, p in _adapter_tensors(m, adapter_name).items()
        }
    else:
        if hasattr(model, "peft_config") and hasattr(model, "base_model"):
            raise AdapterFileError(
                f"load_adapter: this PeftModel has no adapter {adapter_name!r}; add it with "
                f"model.load_adapter(directory, adapter_name={adapter_name!r})"
            )
        try:
            plans = plan_moka(model, stored_cfg, adapter_name)
        except (TypeError, ValueError) as e:
            raise AdapterFileError(f"load_adapter: the stored config does not fit this model: {e}") from None
        have_layout = {n: p.to_json() for n, p in plans.items()}
        expected = {
            f"{name}.{pname}": (shape, torch.float32) for name, p in plans.items()
            for pname, shape in p.tensor_shapes().items()
        }

    if stored_layout is not None:
        _check_layout(stored_layout, have_layout)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(
            f"load_adapter: the adapter's keys do not match the model's MoKA parameters: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)})"
        )
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise AdapterFileError(f"load_adapter: {key}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise AdapterFileError(f"load_adapter: {key}: expected dtype {dtype}, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"load_adapter: {key} has non-finite values")

    # Everything checked: now change the model.
    if not layers:
        apply_moka(model, stored_cfg, adapter_name)
        layers = _layers(model, adapter_name)
    with torch.no_grad():
        for name, m in layers.items():
            for pname, p in _adapter_tensors(m, adapter_name).items():
                p.copy_(tensors[f"{name}.{pname}"])
    return model


def _check_layout(stored: dict, have: dict) -> None:
    if set(stored) != set(have):
        missing = sorted(set(have) - set(stored))
        extra = sorted(set(stored) - set(have))
        raise AdapterFileError(
            f"load_adapter: the adapter covers other modules than the model: model modules missing from the "
            f"adapter {missing[:5]} ({len(missing)}), adapter modules absent from the model {extra[:5]} ({len(extra)})"
        )
    for name, want in have.items():
        got = stored[name]
        for k in ("out_features", "in_features", "variant", "gating", "shapes", "temperature", "scale"):
            if got.get(k) != want[k]:
                raise AdapterFileError(
                    f"load_adapter: module {name!r}: {k} is {got.get(k)!r} in the adapter, {want[k]!r} in the model"
                )


try:  # transformers is optional; the callback exists only with it.
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover
    _TrainerCallback = object


class SaveAdapterCallback(_TrainerCallback):
    """A ``transformers.Trainer`` callback writing the MoKA adapter into every checkpoint.

    For models patched with ``apply_moka`` (the Trainer saves a ``PeftModel``'s
    adapter by itself): ``<output_dir>/checkpoint-<step>/<subdir>/``, loadable
    with ``load_adapter``.
    """

    def __init__(self, subdir: str = "moka_adapter") -> None:
        self.subdir = subdir

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_adapter(model, os.path.join(ckpt, self.subdir))
        return control
