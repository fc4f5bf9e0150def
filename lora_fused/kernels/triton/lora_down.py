"""Forward kernel 1: the dropout + down projection ``h = dropout(x) Aᵀ``, mask generated in-kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, dropout_args, keep_tile, next_pow2, tuned

# (BLOCK_M, BLOCK_K, num_warps, num_stages); the last entry of each list is small enough for fp32 operands
# at r = 128 (autotuning skips configs that run out of shared memory); BLOCK_R is fixed by the rank (next power of two ≥ T·r, ≤ 128).
DOWN_CONFIGS_SM90 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (32, 64, 4, 2)]
]
DOWN_CONFIGS_SM80 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 2)]
]
DOWN_CONFIGS_INTERPRET = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32})]


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr,
    M, K, TR, M_KEY,
    stride_xm, stride_xk, stride_am, stride_ak, stride_hm, stride_hr,
    threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """h[m, j] = (1/(1-p)) · Σ_k keep[m, k] · x[m, k] · A[j, k]

    Shapes: x (M, K), A (T·r, K) (all targets stacked: one pass over x serves every down projection),
    h (M, T·r) in x's dtype, fp32 accumulation. Grid: (cdiv(M, BLOCK_M), cdiv(T·r, BLOCK_R)).
    keep is regenerated from (seed, row, col) by ``keep_tile``: never read from or written to memory.
    Global-memory passes: x once per R-block (once when T·r ≤ 128, the usual case); A once per M-tile (small,
    L2-resident); writes h once. W and g are not touched.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    r_ok = rr < TR
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_row = a_ptr + rr.to(tl.int64)[None, :] * stride_am
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xv = tl.load(x_row + ks.to(tl.int64)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_tile(seed, rows, k0, threshold, BLOCK_M, BLOCK_K)
            xv = tl.where(keep, xv, tl.zeros_like(xv))
        av = tl.load(a_row + ks.to(tl.int64)[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xv, av, acc, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * drop_scale
    h_offs = rows.to(tl.int64)[:, None] * stride_hm + rr[None, :] * stride_hr
    tl.store(h_ptr + h_offs, acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


def _smem(m, e):
    """Pipelined x and A tiles, plus scratch for the mask's layout change (measured ≤ BLOCK_M·BLOCK_K bytes)."""
    rng = m["BLOCK_M"] * m["BLOCK_K"] * 4 if m.get("HAS_DROPOUT") else 0
    return m["num_stages"] * (m["BLOCK_M"] * m["BLOCK_K"] + m["BLOCK_K"] * m["BLOCK_R"]) * e + rng


_KERNEL = tuned(
    _lora_down_kernel,
    {"sm90": DOWN_CONFIGS_SM90, "sm80": DOWN_CONFIGS_SM80, "interpret": DOWN_CONFIGS_INTERPRET},
    key=["M_KEY", "K", "TR", "HAS_DROPOUT", "DOT_PREC"],
    smem=_smem,
)


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    """``h = dropout(x) Aᵀ``: x (M, K), lora_A (T·r, K) → h (M, T·r) in x's dtype. One launch."""
    M, K = x.shape
    TR = lora_A.shape[0]
    h = torch.empty(M, TR, dtype=x.dtype, device=x.device)
    if M == 0 or TR == 0:
        return h
    seed_t, threshold, scale, has_drop = dropout_args(dropout_p, seed, x)
    block_r = min(128, next_pow2(TR))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(TR, block_r))  # noqa: E731
    _KERNEL(x.device)[grid](
        x, lora_A, h, seed_t, M, K, TR, next_pow2(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), h.stride(0), h.stride(1),
        threshold, scale,
        HAS_DROPOUT=has_drop, DOT_PREC=dot_precision(x.dtype), BLOCK_R=block_r,
    )
    return h
