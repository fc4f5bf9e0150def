"""The PEFT LoRA ``Linear`` whose forward runs on lora_fused's op. Imports ``peft``: only :func:`from_peft`
imports this module (importing ``lora_fused`` never imports ``peft``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ..ops.lora_linear import lora_linear


class FusedPeftLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` (same parameters, state-dict keys, merge/unmerge, save_pretrained) whose forward
    for one active vanilla LoRA adapter is ``lora_fused.ops.lora_linear``. Disabled or merged adapters and
    mixed-batch calls (``adapter_names=``) take PEFT's own path; what lora_fused cannot compute raises."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A.keys()]
        if not active:
            return super().forward(x)
        problem = unsupported_reason(self, active)
        if problem:
            raise RuntimeError(f"lora_fused.from_peft: {problem}")
        adapter = active[0]
        base = self.get_base_layer()
        dropout = self.lora_dropout[adapter]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
        return lora_linear(
            x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
            self.scaling[adapter], p, self.training,
        )


def unsupported_reason(layer: PeftLoraLinear, active) -> str:
    """Why ``layer`` cannot run on lora_fused (empty string when it can)."""
    if len(active) > 1:
        return f"{len(active)} active adapters {list(active)}; only one active adapter is supported"
    adapter = active[0]
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weights, e.g. GPT-2) is not supported"
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        name = "DoRA (use_dora=True)" if getattr(layer, "use_dora", {}).get(adapter) else variant
        return f"adapter {adapter!r} uses {name}, which is not supported"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return f"adapter {adapter!r} uses lora_bias=True, which is not supported"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear and not (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward):
        return f"the base layer is a {type(base).__name__} (quantized or custom), not an nn.Linear"
    return ""
