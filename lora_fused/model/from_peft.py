"""``from_peft``: run a PEFT LoRA model on lora_fused's op, in place."""

from __future__ import annotations

import torch.nn as nn


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Make every PEFT LoRA ``Linear`` of ``peft_model`` (e.g. from ``peft.get_peft_model``) compute through
    ``lora_fused.ops.lora_linear``, in place, and return ``peft_model``.

    PEFT's parameters, state-dict keys, ``save_pretrained``, ``merge_adapter``/``unmerge_adapter`` and
    ``merge_and_unload`` keep working; outputs and gradients equal PEFT's (dropout draws its own masks).
    The layers stay instances of PEFT's ``lora.Linear`` (their class becomes a subclass that only overrides
    ``forward``). Every PEFT adapter is kept; the forward follows PEFT's ``set_adapter`` (the active adapter runs on
    lora_fused's op). Disabled adapters, merged adapters and mixed-batch calls (``adapter_names=``) use PEFT's own
    path. The model is first-class for lora_fused's APIs: ``lora_parameters``, ``lora_state_dict``,
    ``lora_summary``, ``save_lora`` (both formats), ``set_adapter``, ``active_adapter``, ``adapter_names``,
    ``disable_adapters``, ``delete_adapter``.

    Not supported (``ValueError``, nothing changed), for any of its adapters: DoRA (``use_dora``) and other LoRA
    variants, several active adapters, ``fan_in_fan_out`` (GPT-2 ``Conv1D``), ``lora_bias``, LoRA on layers other
    than ``nn.Linear`` (Embedding; Conv: "Conv LoRA is not supported"; ``target_parameters``), quantized base
    layers (bitsandbytes, GPTQ, …).
    ``peft`` is imported here, never by ``import lora_fused``.
    """
    try:
        from peft.tuners.lora.layer import LoraLayer, Linear as PeftLoraLinear
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ImportError("lora_fused.from_peft needs the optional dependency peft (pip install peft)") from exc
    from ._peft_fused import FusedPeftLoraLinear, unsupported_reason

    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"from_peft expects a PEFT model (an nn.Module), got {type(peft_model).__name__}")
    layers, problems = [], []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) not in (PeftLoraLinear, FusedPeftLoraLinear):
            conv = "Conv" in type(module).__name__ or isinstance(module.get_base_layer(), nn.modules.conv._ConvNd)
            problems.append(f"{name}: a {type(module).__module__}.{type(module).__name__} LoRA layer: "
                            + ("Conv LoRA is not supported (only LoRA on nn.Linear)" if conv
                               else "only LoRA on nn.Linear is supported"))
            continue
        if len(module.active_adapters) > 1:
            problems.append(f"{name}: several active adapters {list(module.active_adapters)}")
            continue
        # every adapter, active or not: set_adapter may switch to any of them later
        reasons = [unsupported_reason(module, [adapter]) for adapter in module.lora_A.keys()]
        reasons = [r for r in reasons if r]
        if reasons:
            problems.append(f"{name}: {'; '.join(reasons)}")
            continue
        layers.append(module)
    if problems:
        raise ValueError("from_peft: unsupported PEFT features (nothing was changed):\n  " + "\n  ".join(problems))
    if not layers:
        raise ValueError("from_peft: the model has no PEFT LoRA layers (build it with peft.get_peft_model first)")
    for module in layers:
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedPeftLoraLinear
    return peft_model
