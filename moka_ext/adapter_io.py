"""Saving and loading MoKA adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

Owns: the adapter file format, atomic writes and the full validation of a
file before any weight of a model changes. Only safetensors is read; nothing
is ever unpickled.

Format: the safetensors file holds one tensor per adapter parameter, keyed
``<module name>.<parameter name>`` (e.g. ``model.layers.0.self_attn.q_proj.moka_B.0``),
and in its metadata (key ``moka_config``) the JSON of the config plus the
layout of every adapted module. That file is the authority: it is replaced in
one ``os.replace``, so a reader sees either the previous adapter or the new
one, never a mix. ``adapter_config.json`` carries the same JSON for people and
tools; it is written first, so after an interrupted save it may be ahead of
the weights, which ``load_adapter`` notices and reports.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch
from torch import nn

from ._version import __version__
from .config import MOKA_FIELDS, MoKAConfig
from .model import apply_moka, moka_layers, plan_moka

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME", "AdapterFileError", "SaveAdapterCallback"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "moka_ext.adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the model."""


def _config_of(model: nn.Module) -> MoKAConfig:
    cfg = getattr(model, "moka_config", None)
    if cfg is None:
        peft_cfg = getattr(model, "peft_config", None)
        if isinstance(peft_cfg, dict) and len(peft_cfg) == 1:
            cfg = next(iter(peft_cfg.values()))
    if not isinstance(cfg, MoKAConfig):
        raise ValueError("save_adapter: model carries no MoKA adapter (call moka_ext.apply_moka(model, config) first)")
    return cfg


def _layout(model: nn.Module) -> dict:
    out = {}
    for name, m in moka_layers(model).items():
        out[name] = {
            "base_kind": m.base_kind,
            "out_features": m.out_features,
            "in_features": m.in_features,
            "variant": m.variant,
            "gating": m.gating,
            "temperature": m.temperature,
            "scale": m.scale,
            "shapes": [list(s) for s in m.shapes],
        }
    return out


def _adapter_tensors(layer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base_layer.")}


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


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write the adapter of ``model`` to ``directory`` (created if needed), atomically.

    An interrupted save leaves the previous adapter in ``directory`` loadable.
    """
    from safetensors.torch import save_file

    cfg = _config_of(model)
    layers = moka_layers(model)
    tensors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"save_adapter: layer {name!r} is merged; unmerge() before saving the adapter")
        for pname, p in _adapter_tensors(layer).items():
            tensors[f"{name}.{pname}"] = p.detach().to("cpu").contiguous().clone()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moka_ext_version": __version__,
        "peft_type": "MOKA",
        **cfg.moka_dict(),
        "moka_modules": _layout(model),
    }
    text = json.dumps(header, indent=2, sort_keys=True)
    os.makedirs(directory, exist_ok=True)

    def write_config(path):
        with open(path, "w") as f:
            f.write(text + "\n")

    _write_atomic(directory, CONFIG_NAME, write_config)
    _write_atomic(directory, WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"moka_config": text}))


def _read(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse and fully read an adapter directory; raise AdapterFileError on any defect."""
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
    if "moka_config" not in meta:
        raise AdapterFileError(f"load_adapter: {path} has no 'moka_config' metadata; it is not a moka_ext adapter")
    try:
        header = json.loads(meta["moka_config"])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"load_adapter: the config stored in {path} is not valid JSON: {e}") from None
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"load_adapter: {path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
            f"{header.get('format')!r} version {header.get('format_version')!r}"
        )
    cpath = os.path.join(str(directory), CONFIG_NAME)
    if os.path.isfile(cpath):
        try:
            with open(cpath) as f:
                side = json.load(f)
        except (OSError, json.JSONDecodeError):
            side = None
        if side != header:
            warnings.warn(
                f"load_adapter: {cpath} does not match the config stored in {WEIGHTS_NAME} "
                "(edited, or a save was interrupted); using the one in the weights file",
                stacklevel=3,
            )
    return header, tensors


def _config_from_header(header: dict) -> MoKAConfig:
    try:
        return MoKAConfig(**{k: header[k] for k in MOKA_FIELDS if k in header})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"load_adapter: the stored config is invalid: {e}") from None


def load_adapter(model: nn.Module, directory: str, strict_config: bool = True) -> nn.Module:
    """Load the adapter in ``directory`` into ``model`` and return it.

    If ``model`` has no MoKA layers yet, they are created from the stored
    config first. Everything (the file, the config, every key, shape and
    dtype) is checked before any weight changes; on any mismatch an
    ``AdapterFileError`` says what was expected and what was found, and the
    model is left as it was. ``strict_config``: also require the MoKA config
    of an already-patched model to equal the stored one.
    """
    header, tensors = _read(directory)
    stored_cfg = _config_from_header(header)
    stored_layout = header.get("moka_modules")
    if not isinstance(stored_layout, dict):
        raise AdapterFileError("load_adapter: the stored config has no 'moka_modules' layout")

    layers = moka_layers(model)
    if layers:
        have_cfg = getattr(model, "moka_config", None)
        if strict_config and isinstance(have_cfg, MoKAConfig) and have_cfg.moka_dict() != stored_cfg.moka_dict():
            diff = {
                k: (v, have_cfg.moka_dict()[k]) for k, v in stored_cfg.moka_dict().items() if have_cfg.moka_dict()[k] != v
            }
            raise AdapterFileError(
                f"load_adapter: the adapter's config differs from the model's (field: (stored, model)): {diff}"
            )
        have_layout = _layout(model)
        expected = {
            f"{name}.{pname}": (tuple(p.shape), p.dtype) for name, m in layers.items()
            for pname, p in _adapter_tensors(m).items()
        }
    else:
        try:
            plans = plan_moka(model, stored_cfg)
        except (TypeError, ValueError) as e:
            raise AdapterFileError(f"load_adapter: the stored config does not fit this model: {e}") from None
        have_layout = {n: p.to_json() for n, p in plans.items()}
        expected = {
            f"{name}.{pname}": (shape, torch.float32) for name, p in plans.items()
            for pname, shape in p.tensor_shapes().items()
        }

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
        apply_moka(model, stored_cfg)
        layers = moka_layers(model)
    with torch.no_grad():
        for name, m in layers.items():
            for pname, p in _adapter_tensors(m).items():
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
