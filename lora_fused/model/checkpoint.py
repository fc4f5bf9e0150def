"""``save_lora`` / ``load_lora``: adapter checkpoints as safetensors with the modules' configuration as metadata
(or a PEFT directory, see :mod:`.peft_format`). No pickle anywhere; writes are atomic."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .._errors import LoRAShapeError
from .._version import __version__
from ..modules import LoRABase
from ._common import KINDS, build_lora, lora_modules, module_config, set_submodule
from .trainable import LoadResult, is_sharded, load_lora_state_dict, lora_state_dict

FORMAT_TAG = "lora_fused.adapters/1"
META_FORMAT, META_VERSION, META_MODULES, META_SHA = (
    "lora_fused.format", "lora_fused.version", "lora_fused.modules", "lora_fused.sha256"
)


# -- atomic write ------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, ``os.replace``, fsync of
    the directory. A crash leaves either the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_cpu(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors and the metadata of a safetensors file; anything unreadable becomes ``ValueError``."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, OSError, …)
        raise ValueError(
            f"{path!r} is not a readable safetensors file (truncated, corrupted or another format): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return tensors, metadata


# -- configuration checks ----------------------------------------------------------------------------------------
_FIELDS = {
    "kind": str, "r": int, "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": bool,
    "in_features": int, "out_features": int,
}


def scaling_of(cfg: dict) -> float:
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])


def expected_shapes(cfg: dict) -> Tuple[tuple, tuple]:
    """``(lora_A shape, lora_B shape)`` of a module configuration."""
    if cfg["kind"] == "LoRAQKV":
        splits = dict(zip("qkv", cfg["splits"]))
        return (len(cfg["targets"]) * cfg["r"], cfg["in_features"]), (sum(splits[t] for t in cfg["targets"]), cfg["r"])
    return (cfg["r"], cfg["in_features"]), (cfg["out_features"], cfg["r"])


def validate_configs(configs, where: str) -> Dict[str, dict]:
    """Check the saved module configurations' structure; ``ValueError`` naming the problem otherwise."""
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{where}: the module list is missing or empty")
    out = {}
    for entry in configs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{where}: malformed module entry {entry!r}")
        for field, types in _FIELDS.items():
            if not isinstance(entry.get(field), types) or (field != "use_rslora" and isinstance(entry.get(field), bool)):
                raise ValueError(f"{where}: module {entry['name']!r} has a bad or missing {field!r}: {entry.get(field)!r}")
        if entry["kind"] not in KINDS:
            raise ValueError(f"{where}: module {entry['name']!r} has unknown kind {entry['kind']!r}")
        if entry["r"] < 1:
            raise ValueError(f"{where}: module {entry['name']!r} has r={entry['r']}")
        if entry["kind"] == "LoRAQKV":
            t, s = entry.get("targets"), entry.get("splits")
            if not (isinstance(t, str) and t and set(t) <= set("qkv") and len(set(t)) == len(t)):
                raise ValueError(f"{where}: module {entry['name']!r} has bad targets {t!r}")
            if not (isinstance(s, list) and len(s) == 3 and all(isinstance(v, int) and v > 0 for v in s)
                    and sum(s) == entry["out_features"]):
                raise ValueError(f"{where}: module {entry['name']!r} has bad splits {s!r}")
        if entry["name"] in out:
            raise ValueError(f"{where}: module {entry['name']!r} is listed twice")
        out[entry["name"]] = {k: v for k, v in entry.items() if k != "name"}
    return out


def check_tensors(configs: Dict[str, dict], tensors: Dict[str, torch.Tensor], where: str) -> None:
    """Every configured module has exactly its two tensors, with the configured shapes."""
    expected = {}
    for name, cfg in configs.items():
        a, b = expected_shapes(cfg)
        expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = a, b
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    bad = [f"{k} {tuple(tensors[k].shape)} != {expected[k]}" for k in expected if k in tensors
           and tuple(tensors[k].shape) != tuple(expected[k])]
    if missing or extra or bad:
        raise ValueError(
            f"{where}: tensors do not match the saved configuration (corrupted file?): "
            f"missing {missing}, unexpected {extra}, mis-shaped {bad}"
        )


# -- save ----------------------------------------------------------------------------------------------------------
def save_lora(model: nn.Module, path, *, format: str = "safetensors") -> None:
    """Save the adapters of ``model``.

    ``format="safetensors"``: one file with the adapter tensors (:func:`lora_state_dict` keys) and, as metadata,
    every injected module's configuration (kind, r, lora_alpha, lora_dropout, use_rslora, targets, splits, shapes),
    the package version and a sha256 of the tensors. ``format="peft"``: a directory PEFT's
    ``PeftModel.from_pretrained`` loads (see :func:`lora_fused.model.peft_format.save_peft`).
    Every file is written atomically (temp file, fsync, rename). Raises ``ValueError`` when the model has no
    adapters or for an unknown format.

    Sharded adapters (FSDP2) are gathered first, a collective: call ``save_lora`` on every rank; rank 0 writes.
    """
    path = os.fspath(path)
    modules = list(lora_modules(model))
    if not modules:
        raise ValueError("save_lora: the model has no lora_fused adapters (call inject_lora first)")
    sharded = is_sharded(model)
    if sharded and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        lora_state_dict(model)  # take part in the gathers rank 0 makes, write nothing
        return
    if format == "peft":
        from .peft_format import save_peft

        save_peft(model, path)
        return
    if format != "safetensors":
        raise ValueError(f"save_lora: format must be 'safetensors' or 'peft', got {format!r}")
    if os.path.isdir(path):
        raise ValueError(f"save_lora: {path!r} is a directory; give a file path (or use format='peft')")
    from safetensors.torch import save as st_save

    tensors = to_cpu(lora_state_dict(model))
    configs = [dict(name=name, **module_config(module)) for name, module in modules]
    metadata = {
        "format": "pt",
        META_FORMAT: FORMAT_TAG,
        META_VERSION: __version__,
        META_MODULES: json.dumps(configs),
        META_SHA: tensors_digest(tensors),
    }
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


# -- load ----------------------------------------------------------------------------------------------------------
def read_lora_file(path: str) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor]]:
    """``(configs by module name, tensors)`` of a lora_fused safetensors checkpoint, fully validated."""
    tensors, metadata = read_safetensors(path)
    if metadata.get(META_FORMAT) != FORMAT_TAG:
        hint = ""
        if any(k.startswith("base_model.model.") for k in tensors):
            hint = " It looks like a PEFT adapter file: pass its directory (with adapter_config.json) instead."
        raise ValueError(f"{path!r} is not a lora_fused adapter checkpoint (no {FORMAT_TAG!r} metadata).{hint}")
    try:
        raw = json.loads(metadata.get(META_MODULES, ""))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r}: the module configuration metadata is not valid JSON ({exc})") from None
    configs = validate_configs(raw, repr(path))
    if metadata.get(META_SHA) != tensors_digest(tensors):
        raise ValueError(f"{path!r}: checksum mismatch, the adapter tensors are corrupted")
    check_tensors(configs, tensors, repr(path))
    return configs, tensors


def apply_checkpoint(model: nn.Module, configs: Dict[str, dict], tensors: Dict[str, torch.Tensor],
                     strict: bool, where: str, extra_params: Dict[str, torch.Tensor] = None) -> LoadResult:
    """Load ``tensors`` into ``model``: inject from ``configs`` first when the model has no adapters, else check
    that the model's adapters have the checkpoint's configuration. The model is unchanged when this raises."""
    existing = dict(lora_modules(model))
    extra_params = extra_params or {}
    params = dict(model.named_parameters())
    bad_extra = [f"{k} {tuple(v.shape)} vs model {tuple(params[k].shape)}" for k, v in extra_params.items()
                 if k in params and params[k].shape != v.shape]
    if bad_extra:
        raise LoRAShapeError(f"{where}: non-adapter weights of the checkpoint do not fit the model: {bad_extra}")
    extra_unexpected = [k for k in extra_params if k not in params]
    if existing:
        _check_same_config(existing, configs, where)
        result = load_lora_state_dict(model, tensors, strict=strict) if not (strict and extra_unexpected) else None
        if result is None:
            raise RuntimeError(f"{where}: unexpected keys {extra_unexpected}")
        _copy_extra(params, extra_params)
        return LoadResult(result.missing_keys, result.unexpected_keys + extra_unexpected)

    modules = dict(model.named_modules())
    new_modules, unexpected = [], list(extra_unexpected)
    for name, cfg in configs.items():
        target = modules.get(name) if name else None
        problem = None
        if target is None:
            problem = "no such module in the model"
        elif not isinstance(target, nn.Linear):
            problem = f"it is a {type(target).__name__}, not an nn.Linear"
        elif (target.in_features, target.out_features) != (cfg["in_features"], cfg["out_features"]):
            problem = (f"the model's Linear is ({target.in_features} -> {target.out_features}), the checkpoint's "
                       f"({cfg['in_features']} -> {cfg['out_features']})")
        if problem is not None:
            if strict or target is not None:
                raise ValueError(f"{where}: cannot inject the checkpoint's adapter into {name!r}: {problem}")
            unexpected += [f"{name}.lora_A", f"{name}.lora_B"]
            continue
        try:
            new = build_lora(target, cfg)
        except ValueError as exc:
            raise ValueError(f"{where}: bad configuration for {name!r}: {exc}") from None
        with torch.no_grad():
            new.lora_A.copy_(tensors[f"{name}.lora_A"])
            new.lora_B.copy_(tensors[f"{name}.lora_B"])
        new_modules.append((name, new))
    if strict and unexpected:
        raise RuntimeError(f"{where}: unexpected keys {unexpected}")
    for name, new in new_modules:
        set_submodule(model, name, new)
    _copy_extra(params, extra_params)
    return LoadResult([], unexpected)


def _copy_extra(params, extra_params) -> None:
    with torch.no_grad():
        for key, value in extra_params.items():
            if key in params:
                params[key].copy_(value)


def _check_same_config(existing: Dict[str, LoRABase], configs: Dict[str, dict], where: str) -> None:
    problems = []
    for name, cfg in configs.items():
        module = existing.get(name)
        if module is None:
            continue  # reported as an unexpected key by load_lora_state_dict
        mine = module_config(module)
        diffs = []
        for field in ("kind", "r", "targets", "splits", "in_features", "out_features"):
            if mine[field] != cfg.get(field):
                diffs.append(f"{field}: checkpoint {cfg.get(field)!r}, model {mine[field]!r}")
        if not math.isclose(scaling_of(mine), scaling_of(cfg), rel_tol=1e-6):
            diffs.append(f"scaling (lora_alpha/r): checkpoint {scaling_of(cfg):g}, model {scaling_of(mine):g}")
        if diffs:
            problems.append(f"{name} ({'; '.join(diffs)})")
    if problems:
        raise LoRAShapeError(
            f"{where}: the checkpoint's adapters do not match the adapters already injected in the model: "
            + ", ".join(problems)
            + ". Rank (and targets, scaling) must match at inference: load into a model without adapters and "
            "load_lora injects them with the checkpoint's configuration."
        )


def load_lora(model: nn.Module, path, *, strict: bool = True) -> LoadResult:
    """Load adapters saved by :func:`save_lora` (a safetensors file) or a PEFT adapter directory
    (``adapter_config.json`` + ``adapter_model.safetensors``, e.g. written by PEFT's ``save_pretrained``).

    If ``model`` has no lora_fused adapters yet, they are first injected with the checkpoint's configuration (so
    rank and targets always agree with it; other parameters' ``requires_grad`` are left as they are). Otherwise the
    model's adapters must have the checkpoint's kind, rank, targets, splits and scaling (else ``LoRAShapeError``,
    a ``ValueError`` and ``RuntimeError``).

    Returns ``(missing_keys, unexpected_keys)`` (empty with ``strict``). Raises ``ValueError`` for a truncated,
    corrupted or foreign file; ``RuntimeError`` for missing/unexpected keys with ``strict``. Nothing is unpickled
    and the model is unchanged when an error is raised.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from .peft_format import read_peft_dir

        configs, tensors, extra = read_peft_dir(path, model)
        return apply_checkpoint(model, configs, tensors, strict, f"load_lora({path!r})", extra)
    if not os.path.exists(path):
        raise ValueError(f"load_lora: {path!r} does not exist")
    configs, tensors = read_lora_file(path)
    return apply_checkpoint(model, configs, tensors, strict, f"load_lora({path!r})")
