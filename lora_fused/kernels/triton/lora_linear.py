"""The Triton LoRA linear: forward (2 launches) and backward (≤ 3 launches + torch GEMMs for dW/db).

    forward:   h = x̂ Aᵀ                      lora_down            (reads x once)
               y = x Wᵀ + b + s·h_t B_tᵀ      lora_linear_fwd      (the base GEMM; y written once)
    backward:  dh' = s/(1-p)·g B, dB = s·gᵀh  lora_bwd_dh_db       (reads g once)
               dx = g W + keep∘(dh' A)        lora_bwd_dx          (the dx GEMM; mask regenerated)
               dA = dh'ᵀ (keep∘x)             lora_bwd_da          (reads x once; mask regenerated)
               dW = gᵀ x, db = Σ g            torch                (only when the base is unfrozen)

``x̂ = keep∘x/(1-p)``; ``keep`` is a pure function of (seed, row, col) (see ``_common``), never stored. Saved
for backward by the op: x, h and the seed tensor.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ..reference.dropout import dropout_scale
from .lora_bwd_da import lora_bwd_da
from .lora_bwd_dh_db import lora_bwd_dh_db
from .lora_bwd_dx import lora_bwd_dx
from .lora_down import lora_down
from .lora_linear_fwd import lora_linear_fwd


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def triton_lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float,
                        seed: Optional[torch.Tensor], lora_slices: Sequence[int]):
    """``(y, h)`` for x (M, K), weight (N, K), bias (N,)|None, lora_A (T·r, K), lora_B (ΣN_t, r).

    The op passes 2-D ``x``; an N-D ``x`` (…, K) is accepted too (leading dims flattened, then restored)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with device_guard(x2):
        h = lora_down(x2, lora_A, dropout_p, seed)
        y = lora_linear_fwd(x2, weight, bias, h, lora_B, scaling, lora_slices)
    return y.view(*lead, y.shape[1]), h.view(*lead, h.shape[1])


def triton_lora_backward(grad_y, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float,
                         seed: Optional[torch.Tensor], lora_slices: Sequence[int], needs: Sequence[bool]):
    """``(dx, dW, db, dA, dB)`` with None where ``needs`` (same order) is False."""
    need_dx, need_dw, need_db, need_da, need_dlb = (bool(n) for n in needs)
    x_shape = x.shape
    x = x.reshape(-1, x_shape[-1])
    g = grad_y.reshape(-1, grad_y.shape[-1])
    h = h.reshape(-1, h.shape[-1])
    drop_scale = dropout_scale(dropout_p) if dropout_p > 0.0 else 1.0
    with device_guard(x):
        dh, dB32 = lora_bwd_dh_db(g, lora_B, h, scaling, drop_scale, lora_slices, need_dx or need_da, need_dlb)
        dx = lora_bwd_dx(g, weight, dh, lora_A, dropout_p, seed).view(x_shape) if need_dx else None
        dA = lora_bwd_da(x, dh, dropout_p, seed).to(lora_A.dtype) if need_da else None
    dB = dB32.to(lora_B.dtype) if need_dlb else None
    dW = g.t() @ x if need_dw else None
    db = g.sum(0) if need_db else None
    return dx, dW, db, dA, dB
