"""Which parameters train, and the adapter-only state dict: ``mark_only_lora_as_trainable``, ``lora_parameters``,
``lora_state_dict``, ``load_lora_state_dict``."""

from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .._errors import LoRAShapeError
from ..modules.base import CONFIG_KEY, LOAD_CHECKED_FIELDS, config_tensor, spec_from_tensor
from ._common import NameMap, check_model, lora_layers, name_in_list, select_adapter, unwrap
from .plan import Plan, set_trainable_for_active

_ADAPTER_ATTRS = ("lora_A", "lora_B")


def mark_only_lora_as_trainable(
    model: nn.Module, bias: str = "none", modules_to_save: Optional[Sequence[str]] = None
) -> nn.Module:
    """Freeze every parameter of ``model`` except the active adapter's (``B``, and ``A`` unless the adapter is
    LoRA-FA) and the modules saved with the active adapter (``modules_to_save`` of ``inject_lora`` /
    ``add_adapter`` / ``load_lora``).

    Args:
        bias: ``"none"`` (no bias trains), ``"all"`` (every parameter whose name contains ``bias`` trains),
            ``"lora_only"`` (the biases of the LoRA-wrapped linears train) — PEFT's meaning.
        modules_to_save: further module names (a name equal to an item or ending with ``"." + item``) whose
            parameters all stay trainable, e.g. a new classification head: ``["classifier"]``.
    Returns ``model``. Raises ``ValueError`` for another ``bias``, a ``modules_to_save`` item that matches
    nothing, or a model without adapters (which would freeze everything).
    """
    check_model(model, "mark_only_lora_as_trainable")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    layers = lora_layers(model)
    if not layers:
        raise ValueError("mark_only_lora_as_trainable: the model has no LoRA adapters, so every parameter would be "
                         "frozen (call inject_lora first)")
    root = unwrap(model)
    keep = set()
    for view in layers:
        if bias == "lora_only" and getattr(view.module, "bias", None) is not None:
            keep.add(id(view.module.bias))
        if view.is_peft and view.active is not None:  # a PEFT layer: its active adapter trains
            keep.update(id(t) for t in view.tensors(view.active))
    if bias == "all":
        keep.update(id(p) for n, p in root.named_parameters() if "bias" in n)
    if modules_to_save:
        found = set()
        for name, module in root.named_modules():
            hits = [item for item in modules_to_save if name and name_in_list(name, [item])]
            if hits:
                found.update(hits)
                keep.update(id(p) for p in module.parameters())
        missing = [item for item in modules_to_save if item not in found]
        if missing:
            raise ValueError(f"modules_to_save: no module of the model is named {missing}")
    for p in root.parameters():
        p.requires_grad_(id(p) in keep)
    active = {view.active for view in layers if not view.is_peft} - {None}
    for name in active:
        set_trainable_for_active(root, name)
    return model


def lora_parameters(model: nn.Module, adapter: Optional[str] = None) -> Iterator[nn.Parameter]:
    """The Parameters (``lora_A``, ``lora_B`` per module, in model order) of the active adapter, or of
    ``adapter``. Works on models from :func:`~lora_fused.inject_lora` and :func:`~lora_fused.from_peft`.
    (A LoRA-FA adapter's ``lora_A`` is included; it does not require grad.)"""
    check_model(model, "lora_parameters")
    layers = lora_layers(model)
    if not layers:
        return iter(())
    name = select_adapter(layers, adapter, "lora_parameters")
    return (t for view in layers if name in view.adapter_names for t in view.tensors(name))


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached; a sharded one (FSDP2 / DTensor) gathered into the full tensor (a collective:
    every rank must call it)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def is_sharded(model: nn.Module) -> bool:
    """Whether the adapters are sharded (FSDP2 / DTensor)."""
    return any(hasattr(t, "full_tensor") for view in lora_layers(model) for name in view.adapter_names
               for t in view.tensors(name))


def lora_state_dict(model: nn.Module, adapter: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The active (or named) adapter as ``{"<module>.lora_A": A, "<module>.lora_B": B, "<module>.lora_config":
    config, …}``: the adapter tensors (detached, sharing storage with the model like ``state_dict()``) and each
    module's configuration as a uint8 tensor of JSON (kind, r, lora_alpha, lora_dropout, use_rslora, targets,
    splits, lora_fa, shapes), so ``torch.save`` / ``torch.load(weights_only=True)`` keep it and
    :func:`load_lora_state_dict` can refuse a model that differs. Module names are those of the model the user
    means (no ``module.`` / ``_orig_mod.`` wrapper prefixes; PEFT's ``base_model.model.`` removed).
    Under FSDP2 the shards are gathered into full tensors, so every rank must call it. A ``LoRAQKV`` stores its
    targets packed: ``lora_A`` ``(T·r, K)`` and ``lora_B`` ``(Σ n_t, r)`` in q, k, v order."""
    check_model(model, "lora_state_dict")
    layers = lora_layers(model)
    if not layers:
        return {}
    name = select_adapter(layers, adapter, "lora_state_dict")
    out = {}
    for view in layers:
        if name in view.adapter_names:
            A, B = view.tensors(name)
            out[f"{view.name}.lora_A"], out[f"{view.name}.lora_B"] = gathered(A), gathered(B)
            out[f"{view.name}.{CONFIG_KEY}"] = config_tensor(view.spec(name))
    return out


class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]


def _rank_hint(mismatched: List[str]) -> str:
    return (
        " (a different adapter rank or qkv targets than the model's: rank must match at inference; "
        "load_lora into a model without adapters injects them with the checkpoint's configuration)"
        if mismatched else ""
    )


def load_lora_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True,
                         adapter: Optional[str] = None) -> LoadResult:
    """Copy adapter tensors (keys as :func:`lora_state_dict` writes them; names with ``module.`` / ``_orig_mod.``
    wrapper prefixes are accepted) into the active (or named) adapter of the model.

    With ``strict`` a missing key, an unexpected key or a shape mismatch raises ``RuntimeError`` naming every
    offender, and nothing is loaded. Without it, present keys are loaded and ``(missing_keys, unexpected_keys)``
    is returned; shape mismatches are still refused. A ``<module>.lora_config`` entry (written by
    :func:`lora_state_dict`) that differs from the module's adapter in kind, r, lora_alpha, use_rslora, targets,
    splits or lora_fa is refused (``LoRAShapeError``, a ``ValueError`` and ``RuntimeError``) naming the module and
    both values. A merged module is unmerged before its adapter is replaced (with a warning).
    """
    check_model(model, "load_lora_state_dict")
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping of str to Tensor, got {type(state_dict).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("load_lora_state_dict: the model has no lora_fused adapters (call inject_lora or load_lora)")
    name = select_adapter(layers, adapter, "load_lora_state_dict")
    names = NameMap(model)
    by_name = {view.name: view for view in layers if name in view.adapter_names}
    targets, configs = {}, {}
    for view in by_name.values():
        A, B = view.tensors(name)
        targets[f"{view.name}.lora_A"], targets[f"{view.name}.lora_B"] = A, B
    unexpected, mismatched, config_problems, resolved = [], [], [], {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        module_name, _, attr = key.rpartition(".")
        clean = names.resolve(module_name) or module_name
        if attr == CONFIG_KEY and clean in by_name:
            configs[clean] = (key, value)
            continue
        full = f"{clean}.{attr}"
        if full not in targets:
            unexpected.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a Tensor")
        if tuple(value.shape) != tuple(targets[full].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(targets[full].shape)}")
        resolved[full] = value
    loading = {full.rpartition(".")[0] for full in resolved}
    for clean, (key, value) in configs.items():
        if clean not in loading:
            continue  # a configuration without tensors describes nothing that is loaded
        saved = spec_from_tensor(value, f"load_lora_state_dict: {key}")
        diffs = saved.differences(by_name[clean].spec(name), fields=LOAD_CHECKED_FIELDS,
                                  labels=("state dict", "model"))
        if diffs:
            config_problems.append(f"{clean} ({'; '.join(diffs)})")
    missing = [k for k in targets if k not in resolved]
    problems = []
    if config_problems:
        problems.append("the adapter configuration differs: " + ", ".join(config_problems))
    if strict and missing:
        problems.append(f"missing keys: {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        text = "load_lora_state_dict: " + "; ".join(problems) + _rank_hint(config_problems or mismatched)
        raise (LoRAShapeError if config_problems or mismatched else RuntimeError)(text)
    plan = Plan(model)
    for full, value in resolved.items():
        view = by_name[full.rpartition(".")[0]]
        if not view.is_peft:
            plan.unmerge(view.module, f"loading adapter {name!r}")
        plan.copy(targets[full], value, full)
    plan.apply()
    return LoadResult(missing, unexpected)
