"""Plan, then apply: every model-changing API (``inject_lora``, ``add_adapter``, ``load_lora``, ``merge_lora``,
``unload_lora``) first computes and validates all its changes without touching the model, then makes them in one
step that cannot fail half-way. A call that raises therefore leaves every module, parameter and ``requires_grad``
flag as it was.

It also keeps the per-model adapter bookkeeping that lives outside the LoRA modules: which modules are saved
with which adapter (``modules_to_save``), as a marker attribute on those modules.
"""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn as nn

from ..modules import LoRAAdapter, LoRABase
from ._common import lora_layers, set_submodule, unwrap

SAVED_WITH = "_lora_fused_saved_with"  # attribute on a modules_to_save module: frozenset of adapter names


class Plan:
    """Changes to make to ``model``, in this order: unmerge merged modules that an adapter change touches (with a
    warning), swap submodules, attach new adapters to existing LoRA modules, copy tensors, then ``finally_``
    callbacks (activation, ``requires_grad``, markers). Everything is validated while the plan is built."""

    def __init__(self, model: nn.Module):
        self.root = unwrap(model)
        self.unmerges: List[Tuple[LoRABase, str]] = []
        self.swaps: Dict[str, nn.Module] = {}
        self.attaches: List[Tuple[LoRABase, str, LoRAAdapter]] = []
        self.copies: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.finals: List[Callable[[], None]] = []

    def unmerge(self, module: LoRABase, action: str) -> None:
        if module.merged and all(m is not module for m, _ in self.unmerges):
            self.unmerges.append((module, action))

    def swap(self, actual_name: str, new: nn.Module) -> None:
        """Replace submodule ``actual_name`` of the (unwrapped) model by ``new`` (a new LoRA module's base is frozen
        then). A later swap of the same name replaces an earlier one."""
        self.swaps[actual_name] = new

    def attach(self, module: LoRABase, name: str, adapter: LoRAAdapter) -> None:
        self.attaches.append((module, name, adapter))

    def add_adapter(self, actual_name: str, module: LoRABase, name: str, adapter: LoRAAdapter,
                    pending: bool = False) -> LoRABase:
        """Plan adding ``adapter`` as ``name`` to the LoRA module ``module`` (at ``actual_name``), unmerging it first.
        A ``LoRALinear`` receiving a per-projection (qkv) adapter is replaced by a ``LoRAQKV`` holding the same
        adapters. ``pending``: ``module`` is itself a planned new module (not in the model yet), changed at once.
        Returns the module that will hold the adapter. ``ValueError`` (nothing planned) when it cannot hold it."""
        if name in module.lora_adapters:
            raise ValueError(f"{module._describe()} already has an adapter named {name!r}")
        if adapter.spec.kind not in type(module).accepts:
            from ..modules import LoRAQKV

            upgraded = LoRAQKV.from_lora_module(module, adapter.spec.splits)
            if module.merged and not pending:
                self.unmerge(module, f"adding adapter {name!r}")
                upgraded.merged_adapter = None  # the shared weight is unmerged when the plan applies
            upgraded.attach_adapter(name, adapter)
            self.swap(actual_name, upgraded)
            return upgraded
        module.check_spec(adapter.spec)
        if pending:
            module.attach_adapter(name, adapter)
        else:
            self.unmerge(module, f"adding adapter {name!r}")
            self.attach(module, name, adapter)
        return module

    def copy(self, dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{what}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        self.copies.append((dst, src))

    def finally_(self, fn: Callable[[], None]) -> None:
        self.finals.append(fn)

    def apply(self) -> None:
        for module, action in self.unmerges:
            module.unmerge_before(action)
        for name, new in self.swaps.items():
            if isinstance(new, LoRABase):
                new.freeze_base()
            set_submodule(self.root, name, new)
        for module, name, adapter in self.attaches:
            module.attach_adapter(name, adapter)
        with torch.no_grad():
            for dst, src in self.copies:
                dst.copy_(src)
        for fn in self.finals:
            fn()


# -- model-wide adapter state -------------------------------------------------------------------------------------------
def model_active_adapter(model: nn.Module) -> Optional[str]:
    """The adapter the model's lora_fused modules have active (None when it has none); ``RuntimeError`` when the
    modules disagree (module-level ``set_adapter`` calls on some of them)."""
    names = {view.module.active_adapter for view in lora_layers(model) if not view.is_peft}
    if len(names) > 1:
        raise RuntimeError(f"the model's LoRA modules have different active adapters {sorted(names)}; "
                           "call lora_fused.set_adapter(model, name)")
    return names.pop() if names else None


def saved_with(module: nn.Module) -> FrozenSet[str]:
    """The adapters ``module`` is saved with (``modules_to_save``)."""
    return module.__dict__.get(SAVED_WITH, frozenset())


def modules_saved_with(model: nn.Module, adapter: str) -> List[Tuple[str, nn.Module]]:
    """``(clean name, module)`` of every module saved with ``adapter``, in model order."""
    from ._common import clean_name, peft_prefix

    root = unwrap(model)
    prefix = peft_prefix(root)
    return [(clean_name(name, prefix), m) for name, m in root.named_modules() if adapter in saved_with(m)]


def plan_saved_modules(plan: Plan, modules: Dict[str, nn.Module], adapter: str, targets: List[str],
                       where: str) -> None:
    """Mark ``modules`` (clean name → module) as saved with ``adapter``. ``ValueError`` when one is also adapted
    (``targets``), holds a LoRA module, or is already saved with another adapter (lora_fused keeps one copy of a
    module, so two tasks would overwrite each other's head)."""
    problems = []
    for name, module in modules.items():
        if name in targets or any(t.startswith(name + ".") for t in targets if name) or isinstance(module, LoRABase):
            problems.append(f"{name!r} is also adapted by LoRA")
        elif any(isinstance(m, LoRABase) for m in module.modules()):
            problems.append(f"{name!r} contains LoRA modules")
        else:
            others = sorted(saved_with(module) - {adapter})
            if others:
                problems.append(f"{name!r} is already saved with adapter {others[0]!r} (one copy of a module exists: "
                                "give each task its own head)")
    if problems:
        raise ValueError(f"{where}: modules_to_save: " + "; ".join(problems))

    def mark():
        for module in modules.values():
            setattr_plain(module, SAVED_WITH, saved_with(module) | {adapter})
    plan.finally_(mark)


def setattr_plain(module: nn.Module, name: str, value) -> None:
    """Set an attribute in ``module.__dict__`` (not a parameter, buffer or submodule)."""
    object.__setattr__(module, name, value)


def set_trainable_for_active(model: nn.Module, active: str) -> None:
    """The active adapter's parameters (``A`` only without LoRA-FA) and the modules saved with it train; every other
    adapter's parameters and saved modules do not. Other parameters are left alone."""
    root = unwrap(model)
    for module in root.modules():
        if isinstance(module, LoRABase):
            for key, adapter in module.lora_adapters.items():
                adapter.set_trainable(key == active)
    for module in root.modules():
        names = saved_with(module)
        if names and active not in names:
            for p in module.parameters():
                p.requires_grad_(False)
    for module in root.modules():
        if active in saved_with(module):
            for p in module.parameters():
                p.requires_grad_(True)
