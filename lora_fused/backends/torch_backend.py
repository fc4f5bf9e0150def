"""The ``"torch"`` backend: the pure-PyTorch reference kernels, on any device and floating dtype."""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.reference import lora_linear_backward_ref, lora_linear_forward_ref


def _seed_value(seed: Optional[torch.Tensor], dropout_p: float) -> Optional[int]:
    # ``.item()`` is free on CPU; on CUDA it syncs once per call (the Triton/CUDA backends avoid it).
    return int(seed.item()) if (seed is not None and dropout_p > 0) else None


class TorchBackend:
    name = "torch"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def reject_reason(self, x, weight, lora_A, lora_B) -> Optional[str]:
        if not x.is_floating_point():
            return f"dtype {x.dtype} is not a floating-point type"
        return None

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices):
        return lora_linear_forward_ref(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, _seed_value(seed, dropout_p), lora_slices
        )

    def backward(self, grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs):
        return lora_linear_backward_ref(
            grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, _seed_value(seed, dropout_p), lora_slices, needs
        )


BACKEND = TorchBackend()
