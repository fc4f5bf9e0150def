"""What an adapter checkpoint holds (:class:`AdapterData`), independent of the file format: taken from a model for
saving (:func:`collect_adapter`) and planned into a model for loading (:func:`plan_load`). Both formats
(``checkpoint.py``: lora_fused's safetensors file; ``peft_format.py``: PEFT's directory) build on it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._errors import LoRAShapeError
from ..modules import LoRAAdapter, LoRABase, LoRALinear, LoRAQKV
from ..modules.base import DEFAULT_ADAPTER, LOAD_CHECKED_FIELDS, check_adapter_name
from ..spec import AdapterSpec
from ._common import NameMap, clean_name, lora_layers, peft_prefix, refuse_peft_model, select_adapter, unwrap
from .plan import Plan, model_active_adapter, modules_saved_with, plan_saved_modules
from .trainable import LoadResult, gathered


META_MODULES = "lora_fused.modules"  # metadata key (both formats): JSON list of {"name", **AdapterSpec.to_json()}


@dataclass
class AdapterData:
    """One adapter as a checkpoint holds it.

    ``specs``: module name → :class:`AdapterSpec`; ``tensors``: ``"<module>.lora_A"`` / ``"<module>.lora_B"`` in
    the packed layout; ``saved_modules``: names of the ``modules_to_save``; ``extras``: non-adapter tensors
    (``"<module>.<state-dict key>"``: the saved modules' states, a PEFT directory's trained biases);
    ``name``: the adapter's name where the checkpoint records one."""

    specs: Dict[str, AdapterSpec]
    tensors: Dict[str, torch.Tensor]
    saved_modules: List[str] = field(default_factory=list)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)
    name: Optional[str] = None


def entries_json(data: "AdapterData") -> str:
    """The :data:`META_MODULES` metadata of ``data``."""
    return json.dumps([dict(name=name, **spec.to_json()) for name, spec in data.specs.items()])


def validate_entries(entries, where: str) -> Dict[str, AdapterSpec]:
    """Module name → :class:`AdapterSpec` of :data:`META_MODULES` entries; ``ValueError`` naming the problem."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: the module list is missing or empty")
    out = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{where}: malformed module entry {entry!r}")
        name = entry["name"]
        if name in out:
            raise ValueError(f"{where}: module {name!r} is listed twice")
        out[name] = AdapterSpec.from_json({k: v for k, v in entry.items() if k != "name"}, f"{where}: module {name!r}")
    return out


def collect_adapter(model: nn.Module, adapter: Optional[str], where: str) -> AdapterData:
    """The active (or named) adapter of ``model`` with its ``modules_to_save``, under the names of the model the user
    means (DDP / ``torch.compile`` / PEFT wrappers looked through). Sharded tensors (FSDP2) are gathered: a
    collective, every rank must call it."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no lora_fused adapters (call inject_lora first)")
    name = select_adapter(layers, adapter, where)
    specs, tensors = {}, {}
    for view in layers:
        if name in view.adapter_names:
            A, B = view.tensors(name)
            specs[view.name] = view.spec(name)
            tensors[f"{view.name}.lora_A"], tensors[f"{view.name}.lora_B"] = gathered(A), gathered(B)
    saved: Dict[str, nn.Module] = dict(modules_saved_with(model, name))
    root = unwrap(model)
    prefix = peft_prefix(root)
    for module_name, module in root.named_modules():  # PEFT's ModulesToSaveWrapper: the adapter's own copy
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and hasattr(module, "original_module") and name in copies:
            saved[clean_name(module_name, prefix)] = copies[name]
    extras = {f"{module_name}.{key}": gathered(value)
              for module_name, module in saved.items() for key, value in module.state_dict().items()}
    return AdapterData(specs, tensors, list(saved), extras, name)


def plan_load(model: nn.Module, items: List[Tuple[Optional[str], AdapterData]], strict: bool,
              where: str) -> Tuple[Plan, LoadResult]:
    """The :class:`Plan` loading each ``(adapter name, data)`` of ``items`` into ``model``.

    An adapter name the model already holds is loaded into: its modules must have the checkpoint's kind, rank,
    alpha, rsLoRA, targets, splits and LoRA-FA (``LoRAShapeError`` otherwise); checkpoint modules without it are
    unexpected keys and its modules missing from the checkpoint missing keys. A new name is added: plain linears
    become LoRA modules and LoRA modules get one more adapter, with the checkpoint's layout. A name of None means
    the model's active adapter, or ``"default"``. The model's first adapter becomes active; later ones do not.
    """
    refuse_peft_model(model, where, "load_adapter")
    root = unwrap(model)
    names = NameMap(root)
    previous = model_active_adapter(root)
    targets = [name if name is not None else (previous or DEFAULT_ADAPTER) for name, _ in items]
    for name in targets:
        check_adapter_name(name)
    if len(set(targets)) != len(targets):
        raise ValueError(f"{where}: two adapters would load into the same name ({targets})")
    active = previous or (DEFAULT_ADAPTER if DEFAULT_ADAPTER in targets else targets[0])
    holders = {name: {key for key, m in names.modules.items() if isinstance(m, LoRABase) and name in m.lora_adapters}
               for name in targets}
    plan = Plan(root)
    pending: Dict[str, LoRABase] = {}  # clean name → LoRA module planned for a plain linear
    missing: List[str] = []
    unexpected: List[str] = []
    for target, (_, data) in zip(targets, items):
        if holders[target]:
            _plan_into_existing(plan, names, target, data, holders[target], missing, unexpected, where)
        else:
            _plan_new(plan, names, pending, target, active, data, strict, unexpected, where)
        _plan_extras(plan, names, target, data, strict, unexpected, where)
    if strict and (missing or unexpected):
        problems = ([f"missing keys: {missing}"] if missing else []) + (
            [f"unexpected keys: {unexpected}"] if unexpected else [])
        raise RuntimeError(f"{where}: " + "; ".join(problems))
    return plan, LoadResult(missing, unexpected)


def _plan_into_existing(plan, names, target, data, holders, missing, unexpected, where) -> None:
    problems = []
    for name, spec in data.specs.items():
        key = names.resolve(name)
        if key not in holders:
            unexpected += [f"{name}.lora_A", f"{name}.lora_B"]
            continue
        module = names.modules[key]
        adapter = module.lora_adapters[target]
        diffs = spec.differences(adapter.spec, fields=LOAD_CHECKED_FIELDS, labels=("checkpoint", "model"))
        if diffs:
            problems.append(f"{key} ({'; '.join(diffs)})")
            continue
        if module.merged_adapter == target:
            plan.unmerge(module, f"loading adapter {target!r}")
        plan.copy(adapter.lora_A, data.tensors[f"{name}.lora_A"], f"{where}: {name}.lora_A")
        plan.copy(adapter.lora_B, data.tensors[f"{name}.lora_B"], f"{where}: {name}.lora_B")
    if problems:
        raise LoRAShapeError(
            f"{where}: the checkpoint's adapters do not match the adapter {target!r} already in the model: "
            + ", ".join(problems)
            + ". Rank (and targets, scaling) must match at inference: load into a model without this adapter and "
            "load_lora injects it with the checkpoint's configuration."
        )
    loaded = {names.resolve(name) for name in data.specs}
    missing += [f"{key}.{ab}" for key in sorted(holders - loaded, key=list(names.modules).index)
                for ab in ("lora_A", "lora_B")]


def _plan_new(plan, names, pending, target, active, data, strict, unexpected, where) -> None:
    for name, spec in data.specs.items():
        key = names.resolve(name)
        module = pending.get(key) if key is not None else None
        if module is None and key is not None:
            module = names.modules[key]
        problem = None
        if module is None:
            problem = "no such module in the model"
        elif not isinstance(module, nn.Linear):
            problem = f"it is a {type(module).__name__}, not an nn.Linear"
        elif (module.in_features, module.out_features) != (spec.in_features, spec.out_features):
            problem = (f"the model's Linear is ({module.in_features} -> {module.out_features}), the checkpoint's "
                       f"({spec.in_features} -> {spec.out_features})")
        if problem is not None:
            if strict or module is not None:
                raise ValueError(f"{where}: cannot inject the checkpoint's adapter into {name!r}: {problem}")
            unexpected += [f"{name}.lora_A", f"{name}.lora_B"]
            continue
        try:
            if isinstance(module, LoRABase):
                if (spec.in_features, spec.out_features) != (module.in_features, module.out_features):
                    raise ValueError(f"the adapter is for a ({spec.in_features} -> {spec.out_features}) linear")
                adapter = LoRAAdapter(spec, device=module.weight.device, dtype=module.weight.dtype)
                _fill(adapter, data, name)
                holder = plan.add_adapter(names.actual[key], module, target, adapter, pending=key in pending)
                if key in pending or holder is not module:
                    pending[key] = holder
            else:
                cls = LoRAQKV if spec.kind == "LoRAQKV" else LoRALinear
                new = cls.from_linear_spec(module, spec, target)
                _fill(new.lora_adapters[target], data, name)
                new.set_adapter(active)
                plan.swap(names.actual[key], new)
                pending[key] = new
        except ValueError as exc:
            raise ValueError(f"{where}: bad configuration for {name!r}: {exc}") from None


def _fill(adapter, data: AdapterData, name: str) -> None:
    with torch.no_grad():
        adapter.lora_A.copy_(data.tensors[f"{name}.lora_A"])
        adapter.lora_B.copy_(data.tensors[f"{name}.lora_B"])


def _plan_extras(plan, names, target, data, strict, unexpected, where) -> None:
    """Non-adapter tensors (saved modules, PEFT's trained biases) into the model's tensors of the same name; the
    saved modules are marked as saved with ``target``."""
    if not data.extras and not data.saved_modules:
        return
    state = {}
    for key, tensor in names.root.state_dict(keep_vars=True).items():
        state.setdefault(clean_name(key, names.prefix), tensor)
    bad = []
    for key, value in data.extras.items():
        dst = state.get(clean_name(key))
        if dst is None and key.startswith("module."):
            dst = state.get(clean_name(key[len("module."):]))
        if dst is None:
            unexpected.append(key)
        elif tuple(dst.shape) != tuple(value.shape):
            bad.append(f"{key} {tuple(value.shape)} vs model {tuple(dst.shape)}")
        else:
            plan.copy(dst, value, f"{where}: {key}")
    if bad:
        raise LoRAShapeError(f"{where}: non-adapter weights of the checkpoint do not fit the model: {bad}")
    saved = {}
    for name in data.saved_modules:
        key = names.resolve(name)
        if key is None:
            if strict:
                raise ValueError(f"{where}: modules_to_save: the model has no module {name!r}")
            continue
        saved[key] = names.modules[key]
    if saved:
        plan_saved_modules(plan, saved, target, [names.resolve(n) or n for n in data.specs], where)
