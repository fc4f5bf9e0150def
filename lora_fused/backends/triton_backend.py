"""The ``"triton"`` backend: fused Triton kernels (``lora_fused.kernels.triton``) on CUDA tensors, and on CPU
tensors through the Triton interpreter (``TRITON_INTERPRET=1``, how CI tests it). Triton is imported lazily:
importing ``lora_fused`` does not import it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

MAX_RANK = 128
MAX_TARGETS = 3
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    name = "triton"
    cpu_int_seed = False  # the kernels read the seed from a tensor
    auto_device_types = ("cuda",)

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # a broken install
            return f"Triton failed to import: {exc}"
        if not torch.cuda.is_available() and not _interpreting():
            return "no CUDA GPU is visible and the Triton interpreter is off (set TRITON_INTERPRET=1 to run on CPU)"
        return None

    def reject_reason(self, x, weight, lora_A, lora_B) -> Optional[str]:
        dev = x.device
        if dev.type == "cuda":
            pass
        elif dev.type == "cpu":
            if not _interpreting():
                return "tensors on cpu need the Triton interpreter (TRITON_INTERPRET=1); the kernels target CUDA"
            if x.dtype == torch.bfloat16:
                return "bfloat16 tl.dot is wrong under the Triton interpreter on CPU; bf16 needs a CUDA GPU"
        else:
            return f"device {dev} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not supported (float16, bfloat16, float32)"
        for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype != x.dtype or t.device != dev:
                return f"{name} is {t.dtype} on {t.device}, the input {x.dtype} on {dev}"
        r = lora_B.shape[1] if lora_B.dim() == 2 else 0
        if not 1 <= r <= MAX_RANK:
            return f"rank r={r} is outside 1..{MAX_RANK}"
        if lora_A.shape[0] % r or not 1 <= lora_A.shape[0] // r <= MAX_TARGETS:
            return f"lora_A has {lora_A.shape[0]} rows: not 1 to {MAX_TARGETS} targets of rank {r}"
        return None

    # The kernels' drivers, imported on first use (an import statement per call costs host time).
    _drivers = None

    def _kernels(self):
        if TritonBackend._drivers is None:
            from ..kernels.triton import triton_lora_backward, triton_lora_forward

            TritonBackend._drivers = (triton_lora_forward, triton_lora_backward)
        return TritonBackend._drivers

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices):
        return self._kernels()[0](x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)

    def backward(self, grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs):
        return self._kernels()[1](grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs)


BACKEND = TritonBackend()
