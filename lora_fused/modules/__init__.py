"""Modules layer: drop-in ``nn.Linear`` subclasses with fused LoRA."""

from .base import LoRABase
from .lora_linear import LoRALinear
from .lora_qkv import LoRAQKV

__all__ = ["LoRABase", "LoRALinear", "LoRAQKV"]
