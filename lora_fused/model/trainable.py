"""Which parameters train, and the adapter-only state dict: ``mark_only_lora_as_trainable``, ``lora_parameters``,
``lora_state_dict``, ``load_lora_state_dict``."""

from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from ._common import lora_modules, name_in_list

_ADAPTER_ATTRS = ("lora_A", "lora_B")


def mark_only_lora_as_trainable(
    model: nn.Module, bias: str = "none", modules_to_save: Optional[Sequence[str]] = None
) -> nn.Module:
    """Freeze every parameter of ``model`` except the adapters (``lora_A``/``lora_B`` of lora_fused modules).

    Args:
        bias: ``"none"`` (no bias trains), ``"all"`` (every parameter whose name contains ``bias`` trains),
            ``"lora_only"`` (the biases of the LoRA-wrapped linears train) — PEFT's meaning.
        modules_to_save: module names (a name equal to an item or ending with ``"." + item``) whose parameters
            all stay trainable, e.g. a new classification head: ``["classifier"]``.
    Returns ``model``. Raises ``ValueError`` for another ``bias`` or a ``modules_to_save`` item that matches nothing.
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    keep = set()
    for name, module in lora_modules(model):
        keep.update(id(getattr(module, attr)) for attr in _ADAPTER_ATTRS)
        if bias == "lora_only" and module.bias is not None:
            keep.add(id(module.bias))
    if bias == "all":
        keep.update(id(p) for n, p in model.named_parameters() if "bias" in n)
    if modules_to_save:
        found = set()
        for name, module in model.named_modules():
            hits = [item for item in modules_to_save if name and name_in_list(name, [item])]
            if hits:
                found.update(hits)
                keep.update(id(p) for p in module.parameters())
        missing = [item for item in modules_to_save if item not in found]
        if missing:
            raise ValueError(f"modules_to_save: no module of the model is named {missing}")
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The adapter Parameters (``lora_A``, ``lora_B`` of every lora_fused module), in model order."""
    for _, module in lora_modules(model):
        for attr in _ADAPTER_ATTRS:
            yield getattr(module, attr)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached; a sharded one (FSDP2 / DTensor) gathered into the full tensor (a collective:
    every rank must call it)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def is_sharded(model: nn.Module) -> bool:
    """Whether the adapters are sharded (FSDP2 / DTensor)."""
    return any(hasattr(p, "full_tensor") for p in lora_parameters(model))


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<module path>.lora_A": tensor, "<module path>.lora_B": tensor, …}``: the adapter tensors only
    (detached, sharing storage with the model like ``state_dict()``). Under FSDP2 the shards are gathered into
    full tensors, so every rank must call it. A ``LoRAQKV`` stores its targets packed:
    ``lora_A`` ``(T·r, K)`` and ``lora_B`` ``(Σ n_t, r)`` in q, k, v order."""
    out = {}
    for name, module in lora_modules(model):
        for attr in _ADAPTER_ATTRS:
            out[f"{name}.{attr}"] = gathered(getattr(module, attr))
    return out


class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]


def _check_state_dict(model: nn.Module, state_dict) -> tuple:
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping of str to Tensor, got {type(state_dict).__name__}")
    targets = {}
    for name, module in lora_modules(model):
        for attr in _ADAPTER_ATTRS:
            targets[f"{name}.{attr}"] = getattr(module, attr)
    missing = [k for k in targets if k not in state_dict]
    unexpected = [k for k in state_dict if k not in targets]
    mismatched = []
    for key, value in state_dict.items():
        if key not in targets:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a Tensor")
        if tuple(value.shape) != tuple(targets[key].shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(targets[key].shape)}"
            )
    return targets, missing, unexpected, mismatched


def _rank_hint(mismatched: List[str]) -> str:
    return (
        " (a different adapter rank or qkv targets than the model's: rank must match at inference; "
        "load_lora into a model without adapters injects them with the checkpoint's configuration)"
        if mismatched else ""
    )


def load_lora_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Copy adapter tensors (keys as :func:`lora_state_dict` writes them) into the model's adapters.

    With ``strict`` a missing key, an unexpected key or a shape mismatch raises ``RuntimeError`` naming every
    offender, and nothing is loaded. Without it, present keys are loaded and ``(missing_keys, unexpected_keys)``
    is returned; shape mismatches are still refused (``RuntimeError``, nothing loaded).
    """
    targets, missing, unexpected, mismatched = _check_state_dict(model, state_dict)
    if not targets:
        raise ValueError("load_lora_state_dict: the model has no lora_fused adapters (call inject_lora or load_lora)")
    problems = []
    if strict and missing:
        problems.append(f"missing keys: {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}" + _rank_hint(mismatched))
    if problems:
        raise RuntimeError("load_lora_state_dict: " + "; ".join(problems))
    with torch.no_grad():
        for key, value in state_dict.items():
            if key in targets:
                targets[key].copy_(value)
    return LoadResult(missing, unexpected)
