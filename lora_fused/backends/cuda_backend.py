"""The ``"cuda"`` backend: kernels compiled from ``csrc/`` (optional; see ``setup.py``)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _cuda_ext


class CudaBackend:
    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        if not _cuda_ext.CUDA_EXT_AVAILABLE:
            return _cuda_ext.CUDA_EXT_ERROR
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to PyTorch"
        return None

    def reject_reason(self, x, weight, lora_A, lora_B) -> Optional[str]:
        if x.device.type != "cuda":
            return f"tensors are on {x.device}, the CUDA backend needs a CUDA device"
        return "the CUDA kernels are not implemented in this version"

    def forward(self, *args):
        raise NotImplementedError("the CUDA kernels are not implemented in this version")

    backward = forward


BACKEND = CudaBackend()
