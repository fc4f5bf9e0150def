"""The ``"cuda"`` backend: fused LoRA kernels compiled from ``csrc/`` into ``lora_fused._C`` (optional; see
``setup.py`` and ``docs/cuda.md``). The two big GEMMs are CUTLASS/CuTe kernels (TMA + wgmma, warp-specialized
and persistent on sm_90a; cp.async + mma.sync elsewhere) with the rank-r term fused in as extra K-blocks.

Limits (``reject_reason`` says which one applies): CUDA tensors on a GPU of compute capability 8.0 or newer
whose arch the extension was built for; float16 or bfloat16 (float32/float64 go to another backend under
``"auto"``); in_features and out_features multiples of 8 (16-byte rows for TMA / cp.async); per-target rank ``r``
in 1..128; at most 3 targets (q, k, v); sizes below 2**31.

Strides: ``x``, ``weight`` and ``grad_y`` are read in place when their rows are contiguous, do not overlap and start
on 16-byte boundaries (any row stride that keeps them there, e.g. a column slice of a wider tensor); any other
layout (transposed, expanded, odd offsets) is copied to a contiguous tensor once per call, with a one-time warning naming the
operand, because the kernels stream whole 16-byte row segments. The small adapters and the bias are made
contiguous (a no-op for parameters).

Dropout: the keep decision of element ``(row, col)`` of ``x`` is a pure function of the seed and the position
(Philox-4x32-10 with counter ``(col // 8, row)`` and the seed as key, eight 16-bit draws per call), compared with
``round(p * 65536)``: ``p`` is quantized to 1/65536 as in the torch backend. The mask differs from the torch
backend's mask for the same seed (only masks within one backend are required to agree).

Determinism: ``dA`` and ``dB`` are reduced through fp32 partials summed in a fixed order (no atomics), so every
output is bitwise reproducible run to run on the same GPU, whether or not
``torch.use_deterministic_algorithms`` is on.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from .. import _cuda_ext

_DEVICE_TYPE = "cuda"  # csrc/tools/dry_run_gpu_tests.py sets "cpu" (with a Python stand-in for the extension)
MAX_RANK = 128
MAX_TARGETS = 3
ROW_ALIGN_ELEMS = 8  # 16 bytes of fp16/bf16
_DTYPES = (torch.float16, torch.bfloat16)
_AUTO_ENV = os.environ.get("LORA_FUSED_CUDA_AUTO", "").strip()
# Compute-capability majors on which "auto" picks this backend by default: sm_90 (H100/H200), where every GPU
# test passed and it matched or beat Triton in every suite row but the large eval forward; sm_80 joins once its
# kernels have passed on an A100.
AUTO_MAJORS = (9,)


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def _built_archs():
    fn = getattr(_cuda_ext._C, "built_archs", None)
    return list(fn()) if fn is not None else []


@functools.lru_cache(maxsize=None)
def _arch_reason(index: int) -> Optional[str]:
    """Why the kernels cannot run on GPU ``index`` (None: they can)."""
    major, minor = _capability(index)
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
        + ("a" if major == 9 else "")
    )


def rows_in_place(t: torch.Tensor) -> bool:
    """Whether the kernels can stream the 2-D tensor ``t`` without a copy: contiguous, non-overlapping rows with
    a 16-byte aligned start and row stride (what TMA descriptors and 16-byte cp.async require)."""
    if t.dim() != 2 or t.stride(1) != 1 or t.stride(0) < t.shape[1]:
        return False
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0


_warned = set()


def _rows_operand(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` itself when :func:`rows_in_place`, else a contiguous copy (warned about once per operand name)."""
    if rows_in_place(t):
        return t
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"lora_fused cuda backend: {name} with shape {tuple(t.shape)} and strides {tuple(t.stride())} is copied "
            "to a contiguous tensor on every call: the kernels stream rows that are contiguous and start on "
            "16-byte boundaries",
            stacklevel=3,
        )
    return t.contiguous()


class CudaBackend:
    name = "cuda"
    cpu_int_seed = False  # the kernels read the seed from a tensor
    # "auto" picks this backend on the GPU generations where its tests passed on hardware and it beat the Triton
    # backend (AUTO_MAJORS; measured in benchmarks/results/h100-2026-11-26), on every GPU it has code for with
    # LORA_FUSED_CUDA_AUTO=1, and never with LORA_FUSED_CUDA_AUTO=0. Naming it ("cuda") always works.
    auto_device_types = () if _AUTO_ENV == "0" else ("cuda",)

    def auto_skip_reason(self, device: torch.device) -> Optional[str]:
        """Why ``"auto"`` passes this backend over on ``device`` although it could run there (None: it does not)."""
        if _AUTO_ENV == "1" or device.type != "cuda":
            return None
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if major in AUTO_MAJORS:
            return None
        return (f"auto uses the CUDA kernels on compute capability {', '.join(f'{m}.x' for m in AUTO_MAJORS)} "
                f"(validated on hardware), not {major}.{minor}; LORA_FUSED_CUDA_AUTO=1 includes it")

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
        ref = x if x is not None else weight
        if ref.device.type != _DEVICE_TYPE:
            return f"tensors are on {ref.device}, the CUDA backend needs a CUDA device"
        if _DEVICE_TYPE == "cuda":
            reason = _arch_reason(ref.device.index if ref.device.index is not None else torch.cuda.current_device())
            if reason is not None:
                return reason
        if ref.dtype not in _DTYPES:
            return f"dtype {ref.dtype} is not supported by the CUDA kernels (float16 and bfloat16 only)"
        for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype != ref.dtype or t.device != ref.device:
                return f"{name} is {t.dtype} on {t.device}, x is {ref.dtype} on {ref.device}"
        if (x is not None and x.dim() != 2) or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
            return "the CUDA kernels take 2-D x, weight, lora_A, lora_B"
        r = lora_B.shape[1]
        if not 1 <= r <= MAX_RANK:
            return f"rank r = {r} is outside the CUDA kernels' limit 1..{MAX_RANK}"
        if lora_A.shape[0] % r != 0 or not 1 <= lora_A.shape[0] // r <= MAX_TARGETS:
            return f"lora_A has {lora_A.shape[0]} rows: the CUDA kernels take 1..{MAX_TARGETS} targets of rank {r}"
        N, K = weight.shape
        if K % ROW_ALIGN_ELEMS or N % ROW_ALIGN_ELEMS:
            return (
                f"in_features={K} and out_features={N} must be multiples of {ROW_ALIGN_ELEMS} for the CUDA kernels "
                "(16-byte rows for TMA and cp.async)"
            )
        M = x.shape[0] if x is not None else 0
        if max(M, K, N) >= 2**31:
            return f"shape (M={M}, K={K}, N={N}) exceeds the CUDA kernels' limit of 2**31 - 1 per dimension"
        return None

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices):
        y, h = _cuda_ext._C.forward(
            _rows_operand(x, "x"),
            _rows_operand(weight, "weight"),
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
        """``x`` may be None when neither dA nor dW is needed, ``h`` None when dB is not."""
        needs = [bool(n) for n in needs]
        grads = _cuda_ext._C.backward(
            _rows_operand(grad_y, "grad_y"),
            _rows_operand(x, "x") if x is not None and (needs[1] or needs[3]) else None,
            _rows_operand(weight, "weight"),
            lora_A.contiguous(),
            lora_B.contiguous(),
            h if h is not None and needs[4] else None,
            float(scaling),
            float(dropout_p),
            seed if dropout_p > 0 else None,
            [int(v) for v in lora_slices],
            needs,
        )
        return tuple(grads)

    def keep_mask(self, seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
        """The kernels' boolean keep mask ``(rows, cols)`` for ``seed`` and ``p`` (a testing and debugging aid)."""
        return _cuda_ext._C.keep_mask(seed, int(rows), int(cols), float(p))


BACKEND = CudaBackend()
