"""The Triton LoRA linear: the forward and backward drivers used by the backend.

On sm_90+ (and under the interpreter), when every operand suits a TMA descriptor and T·r ≤ 128, one persistent
kernel per direction:

    forward:   y = x Wᵀ + b + s·h_t B_tᵀ, h = x̂ Aᵀ     lora_fwd_persistent   (h from the GEMM's own x tiles)
    backward:  dx = g W + keep∘(dh' A), dh' = s/(1-p)·g B,
               dB = s·gᵀh, dA = dh'ᵀ (keep∘x)          lora_bwd_persistent   (dh', dB from the GEMM's g tiles;
                                                                              dA from one x tile per dx tile)

Otherwise (sm_80, misaligned strides, T·r > 128, no dx wanted, or a backward whose dx tiles do not fit the
shared memory: fp32 or fp16/bf16 with T·r above 64) the pointer-based kernels:

    forward:   h = x̂ Aᵀ                      lora_down            (reads x once)
               y = x Wᵀ + b + s·h_t B_tᵀ      lora_linear_fwd      (the base GEMM; y written once)
    backward:  dh' = s/(1-p)·g B, dB = s·gᵀh  lora_bwd_dh_db       (reads g once)
               dx = g W + keep∘(dh' A)        lora_bwd_dx          (the dx GEMM; mask regenerated)
               dA = dh'ᵀ (keep∘x)             lora_bwd_da          (reads x once; mask regenerated)

and in both: dW = gᵀ x, db = Σ g by torch (only when the base is unfrozen).

``x̂ = keep∘x/(1-p)``; ``keep`` is a pure function of (seed, row, col) (see ``_common``), never stored. Saved
for backward by the op: x, h and the seed tensor.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ..reference.dropout import dropout_scale
from ._common import deterministic, tma_ok
from .lora_bwd_da import lora_bwd_da
from .lora_bwd_dh_db import lora_bwd_dh_db
from .lora_bwd_dx import lora_bwd_dx
from .lora_bwd_persistent import bwd_fits, lora_bwd_persistent
from .lora_down import lora_down
from .lora_fwd_persistent import lora_fwd_persistent
from .lora_linear_fwd import lora_linear_fwd

# T·r up to this many adapter rows fit one BLOCK_R of the persistent kernels.
PERSISTENT_MAX_TR = 128


_NO_GUARD = contextlib.nullcontext()
_several_gpus: Optional[bool] = None  # more than one visible CUDA device (fixed once CUDA is initialized)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device (multi-GPU processes; with one
    visible GPU it is the current one already, and switching costs host time on every call)."""
    global _several_gpus
    if not t.is_cuda:
        return _NO_GUARD
    if _several_gpus is None:
        _several_gpus = torch.cuda.device_count() > 1
    return torch.cuda.device(t.device) if _several_gpus else _NO_GUARD


def triton_lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float,
                        seed: Optional[torch.Tensor], lora_slices: Sequence[int]):
    """``(y, h)`` for x (M, K), weight (N, K), bias (N,)|None, lora_A (T·r, K), lora_B (ΣN_t, r).

    The op passes 2-D ``x``; an N-D ``x`` (…, K) is accepted too (leading dims flattened, then restored)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    with device_guard(x2):
        if (x2.shape[0] and weight.shape[0] and lora_A.shape[0] <= PERSISTENT_MAX_TR
                and tma_ok(x2.device, weight.shape[0], x2, weight, lora_A)):
            y, h = lora_fwd_persistent(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)
        else:
            h = lora_down(x2, lora_A, dropout_p, seed)
            y = lora_linear_fwd(x2, weight, bias, h, lora_B, scaling, lora_slices)
    if x2 is x:
        return y, h
    lead = x.shape[:-1]
    return y.view(*lead, y.shape[1]), h.view(*lead, h.shape[1])


def triton_lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float,
                         seed: Optional[torch.Tensor], lora_slices: Sequence[int], needs: Sequence[bool]):
    """``(dx, dW, db, dA, dB)`` with None where ``needs`` (same order) is False.

    ``x`` may be None when neither dW nor dA is needed, ``h`` when dB is not (the mask needs only the seed);
    then M = rows of grad_y, K = weight.shape[1]. dA and dB are bitwise reproducible (no float atomics) when
    ``torch.are_deterministic_algorithms_enabled()``."""
    need_dx, need_dw, need_db, need_da, need_dlb = (bool(n) for n in needs)
    if x is None and (need_da or need_dw):
        raise ValueError("triton_lora_backward: x is needed for dA or dW but was None")
    if h is None and need_dlb:
        raise ValueError("triton_lora_backward: h is needed for dB but was None")
    K = weight.shape[1]
    flat = grad_y.dim() == 2  # the op's eager route passes 2-D tensors
    g = grad_y if flat else grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x if x is None or x.dim() == 2 else x.reshape(-1, x.shape[-1])
    h2 = h if h is None or h.dim() == 2 else h.reshape(-1, h.shape[-1])
    det = deterministic()
    dx = dA32 = dB32 = None
    with device_guard(g):
        fused = (need_dx and g.shape[0] and K and lora_A.shape[0] <= PERSISTENT_MAX_TR
                 and tma_ok(g.device, K, g, weight, *([x2] if need_da else []))
                 and bwd_fits(g.element_size(), lora_A.shape[0], g.device))
        if fused:
            dx, dA32, dB32 = lora_bwd_persistent(g, weight, lora_A, lora_B, h2 if need_dlb else None,
                                                 x2 if need_da else None, scaling, dropout_p, seed, lora_slices,
                                                 need_da, need_dlb, det)
        elif need_dx or need_da or need_dlb:
            drop_scale = dropout_scale(dropout_p) if dropout_p > 0.0 else 1.0
            dh, dB32 = lora_bwd_dh_db(g, lora_B, h2, scaling, drop_scale, lora_slices, need_dx or need_da,
                                      need_dlb, det)
            dx = lora_bwd_dx(g, weight, dh, lora_A, dropout_p, seed) if need_dx else None
            dA32 = lora_bwd_da(x2, dh, dropout_p, seed, det) if need_da else None
    dx = (dx if flat else dx.view(*grad_y.shape[:-1], K)) if need_dx else None
    dA = dA32.to(lora_A.dtype) if need_da else None
    # the persistent kernel's atomically summed dA and dB share one scratch buffer: in fp32 (no conversion) the small
    # dB is copied so the two gradients do not alias; the other paths give them buffers of their own
    dB = dB32.to(lora_B.dtype, copy=bool(fused and need_da and not det)) if need_dlb else None
    dW = g.t() @ x2 if need_dw else None
    db = g.sum(0) if need_db else None
    return dx, dW, db, dA, dB
