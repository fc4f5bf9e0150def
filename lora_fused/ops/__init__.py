"""Ops layer: ``torch.library`` custom ops (namespace ``lora_fused::``) with autograd, fake impls, FLOP
formulas and an ONNX decomposition."""

from . import flops as _flops
from .lora_linear import draw_seed, lora_linear
from .lora_qkv import lora_qkv

_flops.install()

__all__ = ["lora_linear", "lora_qkv", "draw_seed"]
