"""The ``"torch"`` backend: the pure-PyTorch reference kernels, on any device and floating dtype."""

from __future__ import annotations

from typing import Optional


from ..kernels.reference import lora_linear_backward_ref, lora_linear_forward_ref


class TorchBackend:
    name = "torch"
    cpu_int_seed = True  # the CPU mask is drawn from a Python int seed: the eager route may pass one

    def unavailable_reason(self) -> Optional[str]:
        return None

    def reject_reason(self, x, weight, lora_A, lora_B) -> Optional[str]:
        if not x.is_floating_point():
            return f"dtype {x.dtype} is not a floating-point type"
        return None

    # The seed reaches the reference kernels as a Python integer for CPU tensors (the eager route passes one; the
    # registered op's tensor is read with ``.item()``, free on the CPU), as the tensor itself on other devices
    # (hashed there: no host sync, capturable in a CUDA graph).

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices):
        if dropout_p > 0.0 and seed.__class__ is not int and x.is_cpu:
            seed = seed.item()
        return lora_linear_forward_ref(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)

    def backward(self, grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs):
        if dropout_p > 0.0 and seed.__class__ is not int and grad_y.is_cpu:
            seed = seed.item()
        return lora_linear_backward_ref(
            grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs
        )


BACKEND = TorchBackend()
