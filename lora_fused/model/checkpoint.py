"""``save_lora`` / ``load_lora``: adapter checkpoints as safetensors with the modules' configuration as metadata
(or a PEFT directory, see :mod:`.peft_format`). No pickle anywhere; writes are atomic."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._version import __version__
from ..spec import AdapterSpec
from ._common import check_model
from ._io import atomic_write_bytes, read_safetensors, tensors_digest, to_cpu
from .adapter_data import META_MODULES, AdapterData, collect_adapter, entries_json, plan_load, validate_entries
from .peft_format import CONFIG_NAME, PREFIX, read_peft_dir, save_peft
from .trainable import LoadResult, is_sharded

FORMAT_TAG = "lora_fused.adapters/2"
READABLE_TAGS = ("lora_fused.adapters/1", FORMAT_TAG)  # /1: no lora_fa, adapter_dtype, modules_to_save
META_FORMAT, META_VERSION, META_SHA = "lora_fused.format", "lora_fused.version", "lora_fused.sha256"
META_SAVED, META_ADAPTER = "lora_fused.modules_to_save", "lora_fused.adapter"


# -- save ----------------------------------------------------------------------------------------------------------
def save_lora(model: nn.Module, path, *, format: str = "safetensors", adapter: Optional[str] = None) -> None:
    """Save an adapter of ``model`` and the modules saved with it (``modules_to_save``).

    ``format="safetensors"``: one file with the active (or named, ``adapter=``) adapter's tensors
    (``<module>.lora_A`` / ``<module>.lora_B``), the states of its ``modules_to_save`` (``<module>.<key>``) and,
    as metadata, every adapted module's configuration (kind, r, lora_alpha, lora_dropout, use_rslora, targets,
    splits, lora_fa, adapter_dtype, shapes), the adapter's name, the package version and a sha256 of the tensors.
    ``format="peft"``: a directory PEFT's ``PeftModel.from_pretrained`` loads; with ``adapter=None`` every adapter
    in PEFT's multi-adapter layout (``"default"`` at the top, the others in sub-directories named after them),
    with ``adapter=name`` that adapter alone at the top (see :mod:`lora_fused.model.peft_format`).

    Module names are those of the model the user means: the ``module.`` of DDP / DataParallel and the
    ``_orig_mod.`` of ``torch.compile`` are not written (loading accepts both). Works on
    :func:`~lora_fused.from_peft` models too. Every file is written atomically (temp file, fsync, rename).
    Raises ``ValueError`` when the model has no adapters or for an unknown format. Sharded adapters (FSDP2) are
    gathered first, a collective: call ``save_lora`` on every rank; rank 0 writes.
    """
    check_model(model, "save_lora")
    path = os.fspath(path)
    if format not in ("safetensors", "peft"):
        raise ValueError(f"save_lora: format must be 'safetensors' or 'peft', got {format!r}")
    if format == "peft":
        datas = [collect_adapter(model, name, "save_lora") for name in _adapters_to_write(model, adapter)]
        if _skip_write(model):
            return
        save_peft(datas, path, single=adapter is not None)
        return
    data = collect_adapter(model, adapter, "save_lora")
    if _skip_write(model):
        return
    if os.path.isdir(path):
        raise ValueError(f"save_lora: {path!r} is a directory; give a file path (or use format='peft')")
    atomic_write_bytes(path, encode_lora_file(data))


def _adapters_to_write(model: nn.Module, adapter: Optional[str]) -> List[Optional[str]]:
    from ._common import lora_layers

    if adapter is not None:
        return [adapter]
    names: List[str] = []
    for view in lora_layers(model):
        names += [n for n in view.adapter_names if n not in names]
    return names or [None]


def _skip_write(model: nn.Module) -> bool:
    """Ranks other than 0 of a sharded model took part in the gathers; rank 0 writes."""
    return is_sharded(model) and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0


def encode_lora_file(data: AdapterData) -> bytes:
    """The safetensors bytes of lora_fused's format for ``data``."""
    from safetensors.torch import save as st_save

    tensors = to_cpu({**data.tensors, **data.extras})
    metadata = {
        "format": "pt",
        META_FORMAT: FORMAT_TAG,
        META_VERSION: __version__,
        META_MODULES: entries_json(data),
        META_SAVED: json.dumps(data.saved_modules),
        META_ADAPTER: data.name or "",
        META_SHA: tensors_digest(tensors),
    }
    return st_save(tensors, metadata=metadata)


# -- load ----------------------------------------------------------------------------------------------------------
def read_lora_file(path: str) -> AdapterData:
    """The adapter of a lora_fused safetensors checkpoint (format 1 or 2), fully validated."""
    tensors, metadata = read_safetensors(path)
    if metadata.get(META_FORMAT) not in READABLE_TAGS:
        hint = ""
        if any(k.startswith(PREFIX) for k in tensors):
            hint = f" It looks like a PEFT adapter file: pass its directory (with {CONFIG_NAME}) instead."
        raise ValueError(f"{path!r} is not a lora_fused adapter checkpoint (no {FORMAT_TAG!r} metadata).{hint}")
    try:
        raw = json.loads(metadata.get(META_MODULES, ""))
        saved = json.loads(metadata.get(META_SAVED, "[]"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r}: the module configuration metadata is not valid JSON ({exc})") from None
    specs = validate_entries(raw, repr(path))
    if not (isinstance(saved, list) and all(isinstance(n, str) for n in saved)):
        raise ValueError(f"{path!r}: bad modules_to_save metadata {saved!r}")
    if metadata.get(META_SHA) != tensors_digest(tensors):
        raise ValueError(f"{path!r}: checksum mismatch, the adapter tensors are corrupted")
    adapter_tensors, extras = split_tensors(specs, saved, tensors, repr(path))
    return AdapterData(specs, adapter_tensors, saved, extras, metadata.get(META_ADAPTER) or None)


def split_tensors(specs: Dict[str, AdapterSpec], saved: List[str], tensors: Dict[str, torch.Tensor],
                  where: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(adapter tensors, extras)``: every configured module has exactly its two tensors with the configured
    shapes, and every other tensor belongs to a saved module."""
    expected = {}
    for name, spec in specs.items():
        expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = spec.a_shape, spec.b_shape
    missing = sorted(set(expected) - set(tensors))
    extras = {k: v for k, v in tensors.items() if k not in expected}
    stray = sorted(k for k in extras if not any(k.startswith(m + ".") for m in saved))
    bad = [f"{k} {tuple(tensors[k].shape)} != {expected[k]}" for k in expected if k in tensors
           and tuple(tensors[k].shape) != tuple(expected[k])]
    if missing or stray or bad:
        raise ValueError(
            f"{where}: tensors do not match the saved configuration (corrupted file?): "
            f"missing {missing}, unexpected {stray}, mis-shaped {bad}"
        )
    return {k: tensors[k] for k in expected}, extras


def load_lora(model: nn.Module, path, *, strict: bool = True, adapter_name: Optional[str] = None) -> LoadResult:
    """Load an adapter saved by :func:`save_lora` (a safetensors file) or a PEFT adapter directory
    (``adapter_config.json`` + ``adapter_model.safetensors``, e.g. written by PEFT's ``save_pretrained``).

    The adapter is loaded into ``adapter_name`` (default: the model's active adapter, or ``"default"`` for a model
    without adapters). If the model lacks that adapter it is added with the checkpoint's configuration (so rank and
    targets can never disagree with it; plain linears become LoRA modules, other parameters' ``requires_grad`` is
    left as it is); the model's first adapter becomes active, a further one does not (:func:`set_adapter`).
    If the model has it, its modules must have the checkpoint's kind, rank, alpha, rsLoRA, targets, splits and
    LoRA-FA (else ``LoRAShapeError``, a ``ValueError`` and ``RuntimeError``). A merged module is unmerged first.
    The modules saved with the adapter (``modules_to_save``) are restored and stay saved with it.

    A PEFT directory in the multi-adapter layout (sub-directories named after the adapters) loads every adapter under
    its name when ``adapter_name`` is None, or the named sub-directory. Module names written by a DDP-wrapped or
    compiled model (``module.``, ``_orig_mod.``) are accepted; so is a wrapped ``model``.

    Returns ``(missing_keys, unexpected_keys)`` (empty with ``strict``). Raises ``ValueError`` for a truncated,
    corrupted or foreign file; ``RuntimeError`` for missing/unexpected keys with ``strict``. Nothing is unpickled
    and the model is unchanged when an error is raised.
    """
    check_model(model, "load_lora")
    path = os.fspath(path)
    where = f"load_lora({path!r})"
    if os.path.isdir(path):
        found = read_peft_dir(path, adapter_name, model)
        items = [(adapter_name if name is None else name, data) for name, data in found]
    elif not os.path.exists(path):
        raise ValueError(f"load_lora: {path!r} does not exist")
    else:
        items = [(adapter_name, read_lora_file(path))]
    plan, result = plan_load(model, items, strict, where)
    plan.apply()
    return result

