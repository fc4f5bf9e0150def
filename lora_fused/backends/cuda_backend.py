"""The ``"cuda"`` backend: fused LoRA kernels compiled from ``csrc/`` into ``lora_fused._C`` (optional; see
``setup.py`` and ``docs/cuda.md``).

Limits (``reject_reason`` says which one applies): CUDA tensors on a GPU of compute capability 8.0 or newer
whose arch the extension was built for; float16 or bfloat16 (float32/float64 go to another backend under
``"auto"``); per-target rank ``r`` in 1..128; at most 3 targets (q, k, v); sizes below 2**31.

Dropout: the keep decision of element ``(row, col)`` of ``x`` is a pure function of the seed and the position
(Philox-4x32-10 with counter ``(col // 8, row)`` and the seed as key, eight 16-bit draws per call), compared with
``round(p * 65536)``: ``p`` is quantized to 1/65536 as in the torch backend. The mask differs from the torch
backend's mask for the same seed (only masks within one backend are required to agree).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import _cuda_ext

_DEVICE_TYPE = "cuda"  # csrc/tools/dry_run_gpu_tests.py sets "cpu" (with a Python stand-in for the extension)
MAX_RANK = 128
MAX_TARGETS = 3
_DTYPES = (torch.float16, torch.bfloat16)


def _built_archs():
    fn = getattr(_cuda_ext._C, "built_archs", None)
    return list(fn()) if fn is not None else []


@functools.lru_cache(maxsize=None)
def _arch_reason(index: int) -> Optional[str]:
    """Why the kernels cannot run on GPU ``index`` (None: they can)."""
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"GPU {index} has compute capability {major}.{minor}; the CUDA kernels need 8.0 or newer"
    archs = _built_archs()
    for arch in archs:
        digits = "".join(ch for ch in arch if ch.isdigit())
        if not digits:
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        # SASS for sm_XY runs on sm_XZ with Z >= Y (same major); an arch-specific "a" target only on itself.
        if a_major == major and (a_minor == minor if arch.endswith("a") else a_minor <= minor):
            return None
    return (
        f"the CUDA extension was built for archs {archs} and has no code for GPU {index} "
        f"(compute capability {major}.{minor}); rebuild with LORA_FUSED_CUDA_ARCHS including {major}{minor}"
        + ("a" if major >= 9 else "")
    )


class CudaBackend:
    name = "cuda"
    # The kernels have not yet run on a GPU (no device was lent so far): "auto" picks this backend only when
    # LORA_FUSED_CUDA_AUTO=1; naming it ("cuda") always works. Flip the default once the GPU tests pass on hardware.
    auto_device_types = ("cuda",) if os.environ.get("LORA_FUSED_CUDA_AUTO", "0") == "1" else ()

    def unavailable_reason(self) -> Optional[str]:
        if not _cuda_ext.CUDA_EXT_AVAILABLE:
            return _cuda_ext.CUDA_EXT_ERROR
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to PyTorch"
        reasons = [_arch_reason(i) for i in range(torch.cuda.device_count())]
        if all(reasons):
            return "; ".join(reasons)
        return None

    def reject_reason(self, x, weight, lora_A, lora_B) -> Optional[str]:
        if x.device.type != _DEVICE_TYPE:
            return f"tensors are on {x.device}, the CUDA backend needs a CUDA device"
        if _DEVICE_TYPE == "cuda":
            reason = _arch_reason(x.device.index if x.device.index is not None else torch.cuda.current_device())
            if reason is not None:
                return reason
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not supported by the CUDA kernels (float16 and bfloat16 only)"
        for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype != x.dtype or t.device != x.device:
                return f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}"
        if x.dim() != 2 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
            return "the CUDA kernels take 2-D x, weight, lora_A, lora_B"
        r = lora_B.shape[1]
        if not 1 <= r <= MAX_RANK:
            return f"rank r = {r} is outside the CUDA kernels' limit 1..{MAX_RANK}"
        if lora_A.shape[0] % r != 0 or lora_A.shape[0] // r > MAX_TARGETS:
            return f"lora_A has {lora_A.shape[0]} rows: the CUDA kernels take 1..{MAX_TARGETS} targets of rank {r}"
        limit = 2**31
        M, K, N = x.shape[0], x.shape[1], weight.shape[0]
        if max(M, K, N) >= limit:
            return f"shape (M={M}, K={K}, N={N}) exceeds the CUDA kernels' limit of 2**31 - 1 per dimension"
        return None

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices):
        y, h = _cuda_ext._C.forward(
            x.contiguous(),
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            lora_A.contiguous(),
            lora_B.contiguous(),
            float(scaling),
            float(dropout_p),
            seed if dropout_p > 0 else None,
            [int(v) for v in lora_slices],
        )
        return y, h

    def backward(self, grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs):
        grads = _cuda_ext._C.backward(
            grad_y.contiguous(),
            x.contiguous(),
            weight.contiguous(),
            lora_A.contiguous(),
            lora_B.contiguous(),
            h.contiguous(),
            float(scaling),
            float(dropout_p),
            seed if dropout_p > 0 else None,
            [int(v) for v in lora_slices],
            [bool(n) for n in needs],
        )
        return tuple(grads)

    def keep_mask(self, seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
        """The kernels' boolean keep mask ``(rows, cols)`` for ``seed`` and ``p`` (a testing and debugging aid)."""
        return _cuda_ext._C.keep_mask(seed, int(rows), int(cols), float(p))


BACKEND = CudaBackend()
