"""Modules layer: drop-in ``nn.Linear`` subclasses with fused LoRA and named adapters."""

from .base import LoRAAdapter, LoRABase
from .lora_linear import LoRALinear
from .lora_qkv import LoRAQKV

__all__ = ["LoRABase", "LoRAAdapter", "LoRALinear", "LoRAQKV"]
