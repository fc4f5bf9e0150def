"""``triton_dropout_keep_mask``: the exact keep mask the Triton LoRA kernels use, materialized (for tests/debugging).

The kernels never write the mask; this one does, using the same :func:`~._common.keep_tile` RNG, so a test can
build the float64 reference from it and compare every output and gradient bit-for-bit in the mask.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..reference.dropout import keep_threshold_u16
from ._common import cdiv, keep_tile

BLOCK_M = 16
BLOCK_K = 32


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep[m, k] = RNG(seed, m, k) ≥ threshold for an (M, K) grid of tiles; writes M·K bytes, reads nothing."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = keep_tile(seed, rows, k0, threshold, BLOCK_M, BLOCK_K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=(rows < M)[:, None] & (cols < K)[None, :])


def triton_dropout_keep_mask(seed, M: int, K: int, p: float, device=None) -> torch.Tensor:
    """Bool ``(M, K)`` keep mask of the Triton kernels for ``seed`` (an int or a one-element int64 tensor) and rate p."""
    if not torch.is_tensor(seed):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    out = torch.empty(M, K, dtype=torch.int8, device=seed.device)
    if M and K:
        grid = (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))
        with (torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()):
            _keep_mask_kernel[grid](seed, out, M, K, keep_threshold_u16(p), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out.bool()
