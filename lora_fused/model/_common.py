"""Helpers shared by the model-level APIs: name matching (PEFT's rules), LoRA-module iteration, module swap."""

from __future__ import annotations

import numbers
import re
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ..modules import LoRABase, LoRALinear, LoRAQKV

TargetSpec = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]

KINDS = {"LoRALinear": LoRALinear, "LoRAQKV": LoRAQKV}


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


def pattern_value(patterns: Optional[Dict[str, object]], name: str, default):
    """The value of the first pattern of ``patterns`` (dict order, PEFT's rule) that ``name`` matches by the list
    rule, else ``default``."""
    if patterns:
        for key, value in patterns.items():
            if name_in_list(name, [key]):
                return value
    return default


def lora_modules(model: nn.Module) -> Iterator[Tuple[str, LoRABase]]:
    """``(qualified name, module)`` of every lora_fused module of ``model``, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRABase):
            yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (a dotted path, not the root) by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


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


def module_config(module: LoRABase) -> dict:
    """The configuration of an injected module, as saved in checkpoints (JSON-serialisable)."""
    kind = type(module).__name__ if type(module).__name__ in KINDS else (
        "LoRAQKV" if isinstance(module, LoRAQKV) else "LoRALinear"
    )
    alpha = module.lora_alpha
    alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
    return {
        "kind": kind,
        "r": int(module.r),
        "lora_alpha": alpha,
        "lora_dropout": float(module.lora_dropout),
        "use_rslora": bool(module.use_rslora),
        "targets": "".join(module.targets) if isinstance(module, LoRAQKV) else None,
        "splits": list(module.splits) if isinstance(module, LoRAQKV) else None,
        "in_features": int(module.in_features),
        "out_features": int(module.out_features),
        "bias": module.bias is not None,
    }


def build_lora(linear: nn.Linear, cfg: dict) -> LoRABase:
    """A new LoRA module wrapping ``linear`` per ``cfg`` (a :func:`module_config` dict)."""
    common = dict(r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"], use_rslora=cfg["use_rslora"])
    if cfg["kind"] == "LoRAQKV":
        return LoRAQKV.from_linear(linear, targets=cfg["targets"], splits=cfg["splits"], **common)
    return LoRALinear.from_linear(linear, **common)
