"""Helpers shared by the model-level APIs: name matching (PEFT's rules), wrapper-free names, the LoRA layers of a
model (lora_fused modules and PEFT layers run by ``from_peft``), module swap."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..modules import LoRABase
from ..spec import AdapterSpec

TargetSpec = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


# -- name matching -------------------------------------------------------------------------------------------------
def name_in_list(name: str, items: Sequence[str]) -> bool:
    """PEFT's list rule: ``name`` equals an item or ends with ``"." + item``."""
    return any(name == item or name.endswith("." + item) for item in items)


def make_matcher(spec: TargetSpec, what: str) -> Callable[[str, nn.Module], bool]:
    """A ``(name, module) -> bool`` for a full-match regex ``str``, a list of names (suffix rule) or a callable."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ValueError(f"{what}: {spec!r} is not a valid regular expression ({exc})") from None
        return lambda name, module: pattern.fullmatch(name) is not None
    if callable(spec):
        return lambda name, module: bool(spec(name, module))
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(
            f"{what} must be a regex string, a list of module names or a callable (name, module) -> bool; "
            f"got {type(spec).__name__}"
        ) from None
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise TypeError(f"{what}: every item of the list must be a str, got {bad!r}")
    return lambda name, module: name_in_list(name, items)


def pattern_matches(key: str, name: str, what: str = "pattern") -> bool:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys (``peft.utils.other.get_pattern_key``): ``key``
    matches ``name`` when ``re.match(rf"(.*\\.)?({key})$", name)`` does, i.e. the name equals it, ends with
    ``"." + key``, or matches it as a regular expression anchored at a component boundary."""
    try:
        return re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error as exc:
        raise ValueError(f"{what}: {key!r} is not a valid regular expression ({exc})") from None


def pattern_key(patterns: Optional[Dict[str, object]], name: str, what: str) -> Optional[str]:
    """The first key of ``patterns`` (dict order, as PEFT) that matches ``name`` by :func:`pattern_matches`."""
    for key in patterns or {}:
        if pattern_matches(key, name, what):
            return key
    return None


def shorten_names(names: List[str], limit: int = 25) -> str:
    """``names`` for an error message: all of them when few, else grouped by replacing numeric components with
    ``*`` (``blocks.*.attn.qkv (x12)``), at most ``limit`` groups."""
    if len(names) <= limit:
        return ", ".join(names) if names else "(none)"
    groups: "OrderedDict[str, int]" = OrderedDict()
    for name in names:
        key = ".".join("*" if part.isdigit() else part for part in name.split("."))
        groups[key] = groups.get(key, 0) + 1
    items = [f"{key} (x{count})" if count > 1 else key for key, count in groups.items()]
    more = len(items) - limit
    text = ", ".join(items[:limit])
    if more > 0:
        text += f", … and {more} more groups"
    return f"{text} [{len(names)} nn.Linear modules in all]"


# -- wrappers: DDP, DataParallel, torch.compile, checkpoint/FSDP1 wrappers, PeftModel ------------------------------------
_WRAPPER_COMPONENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def unwrap(model: nn.Module) -> nn.Module:
    """The model the user means: ``model.module`` of a ``DistributedDataParallel`` / ``DataParallel`` and
    ``model._orig_mod`` of a ``torch.compile``d module, repeatedly."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def peft_prefix(model: nn.Module) -> str:
    """``"base_model.model."`` for a PEFT ``PeftModel``, ``"model."`` for its ``LoraModel``, else ``""``: the
    prefix PEFT adds to the wrapped model's module names."""
    if _is_peft_model(model):
        return "base_model.model."
    if type(model).__module__.startswith("peft.") and hasattr(model, "peft_config") and hasattr(model, "model"):
        return "model."
    return ""


def _is_peft_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.") and hasattr(model, "base_model") and hasattr(model, "peft_config")


def clean_name(name: str, prefix: str = "") -> str:
    """``name`` without ``prefix`` and without wrapper components (``_orig_mod``, checkpoint/FSDP wrappers)."""
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


class NameMap:
    """Resolves names written without wrappers (or with a leading ``module.`` from a DDP-wrapped save) to the
    modules of ``model`` (whose own names may contain wrapper components)."""

    def __init__(self, model: nn.Module):
        self.root = unwrap(model)
        self.prefix = peft_prefix(self.root)
        self.modules: Dict[str, nn.Module] = {}
        self.actual: Dict[str, str] = {}
        for name, module in self.root.named_modules():
            key = clean_name(name, self.prefix)
            if key not in self.modules:
                self.modules[key] = module
                self.actual[key] = name

    def resolve(self, name: str) -> Optional[str]:
        """The clean name of the model's module that ``name`` (clean or wrapped) denotes, or None."""
        for candidate in (clean_name(name), clean_name(name[len("module."):]) if name.startswith("module.") else None):
            if candidate is not None and candidate in self.modules:
                return candidate
        return None

    def get(self, name: str) -> Optional[nn.Module]:
        key = self.resolve(name)
        return None if key is None else self.modules[key]


# -- the LoRA layers of a model ---------------------------------------------------------------------------------------
def lora_modules(model: nn.Module) -> Iterator[Tuple[str, LoRABase]]:
    """``(clean name, module)`` of every lora_fused module of ``model`` (wrappers looked through), in model order."""
    root = unwrap(model)
    for name, module in root.named_modules():
        if isinstance(module, LoRABase):
            yield clean_name(name), module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (a dotted path of ``model``'s own names, not the root) by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def is_peft_lora_linear(module: nn.Module) -> bool:
    """A PEFT LoRA ``Linear`` layer (``peft.tuners.lora``), recognised without importing ``peft``."""
    return (type(module).__module__.startswith(("peft.", "lora_fused.model._peft_fused"))
            and type(module).__name__ in ("Linear", "FusedPeftLoraLinear")
            and isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "get_base_layer"))


class LayerView:
    """One LoRA layer seen by the model-level APIs: a lora_fused module or a PEFT LoRA ``Linear``."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.is_peft = not isinstance(module, LoRABase)

    @property
    def adapter_names(self) -> List[str]:
        return list(self.module.lora_A.keys()) if self.is_peft else self.module.adapter_names

    @property
    def active(self) -> Optional[str]:
        """The active adapter of this layer (None when it holds none of the active ones)."""
        if self.is_peft:
            names = [a for a in self.module.active_adapters if a in self.module.lora_A]
            return names[0] if names else None
        return self.module.active_adapter if self.module.has_active_adapter() else None

    @property
    def merged(self) -> bool:
        return bool(self.module.merged)

    def tensors(self, adapter: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` Parameters of ``adapter`` in lora_fused's packed layout."""
        if self.is_peft:
            return self.module.lora_A[adapter].weight, self.module.lora_B[adapter].weight
        holder = self.module.lora_adapters[adapter]
        return holder.lora_A, holder.lora_B

    def spec(self, adapter: str) -> AdapterSpec:
        if not self.is_peft:
            return self.module.lora_adapters[adapter].spec
        layer = self.module
        base = layer.get_base_layer()
        dropout = layer.lora_dropout[adapter]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
        A = layer.lora_A[adapter].weight
        return AdapterSpec(base.in_features, base.out_features, layer.r[adapter], layer.lora_alpha[adapter], p,
                           bool(layer.use_rslora.get(adapter, False)),
                           lora_fa=not A.requires_grad and layer.lora_B[adapter].weight.requires_grad)


def lora_layers(model: nn.Module) -> List[LayerView]:
    """Every LoRA layer of ``model`` (wrappers looked through; PEFT's ``base_model.model.`` prefix removed from the
    names), in model order."""
    root = unwrap(model)
    prefix = peft_prefix(root)
    out = []
    for name, module in root.named_modules():
        if isinstance(module, LoRABase) or is_peft_lora_linear(module):
            out.append(LayerView(clean_name(name, prefix), module))
    return out


def select_adapter(layers: List[LayerView], adapter: Optional[str], where: str) -> str:
    """``adapter``, or the active adapter of ``layers`` when None; ``ValueError`` when no layer holds it."""
    if adapter is None:
        active = {view.active for view in layers} - {None}
        if len(active) != 1:
            raise ValueError(f"{where}: {'no adapter is active' if not active else f'several adapters are active ({sorted(active)})'}; "
                             "name one with adapter=")
        return active.pop()
    if not any(adapter in view.adapter_names for view in layers):
        names = sorted({n for view in layers for n in view.adapter_names})
        raise ValueError(f"{where}: the model has no adapter {adapter!r} (its adapters: {names})")
    return adapter


def check_model(model, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} expects an nn.Module, got {type(model).__name__}")


def refuse_peft_model(model: nn.Module, where: str, instead: str) -> None:
    """``TypeError`` for a PEFT model: lora_fused adapters are not added to PEFT's (use PEFT's own ``instead``)."""
    if peft_prefix(unwrap(model)):
        raise TypeError(f"{where}: the model is a PEFT model; add or load adapters with PEFT's {instead} (from_peft "
                        f"keeps them running on lora_fused's op), or call {where} on the plain model")
