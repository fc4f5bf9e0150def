"""Named adapters on a whole model: ``set_adapter``, ``active_adapter``, ``adapter_names``, ``disable_adapters``,
``delete_adapter``, ``unload_lora``. They also work on PEFT models run through :func:`~lora_fused.from_peft`
(delegating to PEFT's own methods)."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch.nn as nn

from ..modules import LoRABase
from ._common import _is_peft_model, check_model, lora_layers, unwrap
from .plan import SAVED_WITH, Plan, model_active_adapter, saved_with, set_trainable_for_active, setattr_plain


def _peft(model: nn.Module):
    root = unwrap(model)
    return root if _is_peft_model(root) else None


def _modules(model: nn.Module, where: str) -> List[LoRABase]:
    modules = [m for m in unwrap(model).modules() if isinstance(m, LoRABase)]
    if not modules:
        raise ValueError(f"{where}: the model has no lora_fused adapters (call inject_lora first)")
    return modules


def adapter_names(model: nn.Module) -> List[str]:
    """The names of the model's adapters, in the order they were first added."""
    check_model(model, "adapter_names")
    pm = _peft(model)
    if pm is not None:
        return list(pm.peft_config)
    names: List[str] = []
    for view in lora_layers(model):
        names += [n for n in view.adapter_names if n not in names]
    return names


def active_adapter(model: nn.Module) -> Optional[str]:
    """The name of the active adapter (None for a model without adapters)."""
    check_model(model, "active_adapter")
    pm = _peft(model)
    if pm is not None:
        return pm.active_adapter
    return model_active_adapter(model)


def set_adapter(model: nn.Module, name: str) -> None:
    """Activate adapter ``name`` in every LoRA module: it alone computes, and its parameters (``B``, and ``A``
    unless it is LoRA-FA) and the modules saved with it train; the other adapters' parameters and saved modules
    stop requiring grad. Modules without ``name`` compute their base. Merged modules are unmerged first (with a
    warning). ``ValueError`` (nothing changed) when no module has ``name``."""
    check_model(model, "set_adapter")
    pm = _peft(model)
    if pm is not None:
        pm.set_adapter(name)
        return
    modules = _modules(model, "set_adapter")
    if not any(name in m.lora_adapters for m in modules):
        raise ValueError(f"set_adapter: the model has no adapter {name!r} (its adapters: {adapter_names(model)})")
    for module in modules:
        module.set_adapter(name)
    set_trainable_for_active(model, name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """``with disable_adapters(model):`` the model computes its base function (every LoRA module runs its plain
    linear). Merged modules are unmerged on entry (with a warning) and stay unmerged."""
    check_model(model, "disable_adapters")
    pm = _peft(model)
    if pm is not None:
        with pm.disable_adapter():
            yield
        return
    modules = _modules(model, "disable_adapters")
    saved = [(m, m.adapters_disabled) for m in modules]
    for module in modules:
        module.unmerge_before("disabling adapters")
        module.adapters_disabled = True
    try:
        yield
    finally:
        for module, was in saved:
            module.adapters_disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every module (unmerging it where merged). Modules left without adapters become
    plain ``nn.Linear`` again (sharing their weight and bias). If it was active, the first remaining adapter becomes
    active. ``ValueError`` (nothing changed) when no module has it."""
    check_model(model, "delete_adapter")
    pm = _peft(model)
    if pm is not None:
        pm.delete_adapter(name)
        return
    root = unwrap(model)
    holders = [(n, m) for n, m in root.named_modules() if isinstance(m, LoRABase) and name in m.lora_adapters]
    if not holders:
        raise ValueError(f"delete_adapter: the model has no adapter {name!r} (its adapters: {adapter_names(model)})")
    was_active = model_active_adapter(root) == name
    plan = Plan(root)
    for module_name, module in holders:
        if module.adapter_names == [name]:
            if module.merged_adapter is not None:
                plan.unmerge(module, f"deleting adapter {name!r}")
            plan.swap(module_name, module.base_linear(unmerge=False))
        else:
            plan.finally_(lambda module=module: module.delete_adapter(name))

    def after():
        for m in root.modules():
            if name in saved_with(m):
                setattr_plain(m, SAVED_WITH, saved_with(m) - {name})
        remaining = adapter_names(root)
        if was_active and remaining:
            set_adapter(root, remaining[0])
    plan.finally_(after)
    plan.apply()


def unload_lora(model: nn.Module) -> nn.Module:
    """Put the plain ``nn.Linear`` modules back, with their unmerged base weights (merged modules are unmerged;
    the weight and bias Parameters are the original ones, still frozen): the inverse of ``inject_lora``. Every
    adapter is dropped and no module stays marked as saved with one. Returns ``model`` (for a LoRA module itself,
    its plain ``nn.Linear``)."""
    check_model(model, "unload_lora")
    if isinstance(model, LoRABase):
        return model.base_linear()
    root = unwrap(model)
    plan = Plan(root)
    for module_name, module in root.named_modules():
        if isinstance(module, LoRABase):
            if module.merged_adapter is not None:
                plan.unmerge(module, "unloading")
            plan.swap(module_name, module.base_linear(unmerge=False))

    def forget():
        for m in root.modules():
            if SAVED_WITH in m.__dict__:
                del m.__dict__[SAVED_WITH]
    plan.finally_(forget)
    plan.apply()
    return model
