"""Ops layer: ``torch.library`` custom ops (namespace ``lora_fused::``) with autograd and fake impls."""

from .lora_linear import draw_seed, lora_linear
from .lora_qkv import lora_qkv

__all__ = ["lora_linear", "lora_qkv", "draw_seed"]
