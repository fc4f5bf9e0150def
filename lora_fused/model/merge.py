"""``merge_lora``: fold the active adapter into each base weight and leave plain ``nn.Linear`` modules."""

from __future__ import annotations

import copy

import torch.nn as nn

from ..modules import LoRABase
from ._common import check_model, unwrap
from .plan import Plan


def _plain(module: LoRABase) -> nn.Linear:
    """``module.to_linear()`` (float32 merge arithmetic), keeping ``requires_grad`` and the train/eval mode."""
    linear = module.to_linear()
    linear.weight.requires_grad_(module.weight.requires_grad)
    if linear.bias is not None:
        linear.bias.requires_grad_(module.bias.requires_grad)
    linear.train(module.training)
    return linear


def merge_lora(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every ``LoRALinear`` / ``LoRAQKV`` of ``model`` by a plain ``nn.Linear`` with its active adapter
    merged, ``W + scaling · B A`` (computed in float32 and cast back, so bf16/fp16 models do not drift), and return
    the model; the other adapters are dropped. Modules already ``merged`` keep their (merged) weight; modules
    without the active adapter keep their base weight. With ``inplace=False`` a merged copy is returned and
    ``model`` is left untouched (the copy is made without duplicating the replaced LoRA modules).
    The result has no lora_fused modules: it saves, scripts and exports (``torch.export``, ONNX) like any model.
    """
    check_model(model, "merge_lora")
    if isinstance(model, LoRABase):
        return _plain(model) if not inplace else _raise_root()
    root = unwrap(model)
    modules = [(name, module) for name, module in root.named_modules() if isinstance(module, LoRABase)]
    if not inplace:
        memo = {id(module): _plain(module) for _, module in modules}
        return copy.deepcopy(model, memo)
    plan = Plan(root)
    for name, module in modules:
        plan.swap(name, _plain(module))
    plan.apply()
    return model


def _raise_root():
    raise ValueError("merge_lora: the model itself is a LoRA module and cannot be replaced in place; "
                     "use module.to_linear() or merge_lora(module, inplace=False)")
