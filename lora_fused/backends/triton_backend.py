"""The ``"triton"`` backend (placeholder until the Triton kernels land)."""

from __future__ import annotations

from typing import Optional


class TritonBackend:
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        return "the Triton kernels are not implemented in this version"

    def reject_reason(self, x, weight, lora_A, lora_B) -> Optional[str]:
        return self.unavailable_reason()

    def forward(self, *args):
        raise NotImplementedError(self.unavailable_reason())

    backward = forward


BACKEND = TritonBackend()
