"""Backward kernel 2: ``dx = g W + mask/(1-p) ∘ (dh A)``, two accumulators and one epilogue, mask regenerated."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, dropout_args, keep_tile_mma, next_pow2, tuned
from .lora_linear_fwd import GEMM_CONFIGS_INTERPRET, GEMM_CONFIGS_SM80, GEMM_CONFIGS_SM90, _grouped_tile, gemm_smem

# dx is (M, K) with an N-deep reduction: the same GEMM shape class as the forward, so the same config lists
# (BLOCK_N here is the reduction block, BLOCK_K the output-column block; both multiples of 8 as the RNG needs).
DX_CONFIGS_SM90 = GEMM_CONFIGS_SM90
DX_CONFIGS_SM80 = GEMM_CONFIGS_SM80
DX_CONFIGS_INTERPRET = GEMM_CONFIGS_INTERPRET


@triton.jit
def _lora_bwd_dx_kernel(
    g_ptr, w_ptr, dh_ptr, a_ptr, dx_ptr, seed_ptr,
    M, N, K, TR, M_KEY,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dm, stride_dr, stride_am, stride_ak, stride_xm, stride_xk,
    threshold,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx[m, k] = Σ_n g[m, n] W[n, k] + keep[m, k] · Σ_j dh'[m, j] A[j, k]        (dh' = s/(1-p) · g B, kernel 1)

    Shapes: g (M, N), W (N, K), dh' (M, T·r), A (T·r, K), dx (M, K). Grid: cdiv(M, BLOCK_M)·cdiv(K, BLOCK_K),
    swizzled by GROUP_M. Accumulator 1 runs the N loop of g W; accumulator 2 the (T·r)-deep dh' A (one MMA
    for T·r ≤ 128); the epilogue regenerates the tile's keep mask from (seed, row, col), adds
    where(keep, acc2, 0) and writes dx once (without dropout the two share one accumulator).
    Global-memory passes: as the plain dx GEMM: g once per K-tile column, W once per M-tile row; dh' and A
    r/N of that extra; x is not read.
    """
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g_row = g_ptr + rows.to(tl.int64)[:, None] * stride_gm
    w_col = w_ptr + ks.to(tl.int64)[None, :] * stride_wk
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        gv = tl.load(g_row + ns.to(tl.int64)[None, :] * stride_gn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        wv = tl.load(w_col + ns.to(tl.int64)[:, None] * stride_wn, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(gv, wv, acc, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        low = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    else:
        low = acc
    dh_row = dh_ptr + rows.to(tl.int64)[:, None] * stride_dm
    a_col = a_ptr + ks.to(tl.int64)[None, :] * stride_ak
    for r0 in range(0, TR, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < TR
        dv = tl.load(dh_row + rr[None, :] * stride_dr, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        av = tl.load(a_col + rr[:, None] * stride_am, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        low = tl.dot(dv, av, low, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = keep_tile_mma(seed, rows, pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K)  # acc layout
        acc = acc + tl.where(keep, low, 0.0)
    else:
        acc = low
    dx_offs = rows.to(tl.int64)[:, None] * stride_xm + ks.to(tl.int64)[None, :] * stride_xk
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


def _smem(m, e):
    return gemm_smem(m, e, red="BLOCK_N", out="BLOCK_K")


_KERNEL = tuned(
    _lora_bwd_dx_kernel,
    {"sm90": DX_CONFIGS_SM90, "sm80": DX_CONFIGS_SM80, "interpret": DX_CONFIGS_INTERPRET},
    key=["M_KEY", "N", "K", "TR", "HAS_DROPOUT", "DOT_PREC"],
    smem=_smem,
)


def lora_bwd_dx(g, weight, dh, lora_A, dropout_p: float, seed) -> torch.Tensor:
    """``dx = g W + keep ∘ (dh A)`` (dh already carries s/(1-p)); g (M, N), W (N, K) → dx (M, K). One launch."""
    M, N = g.shape
    K = weight.shape[1]
    TR = lora_A.shape[0]
    dx = torch.empty(M, K, dtype=g.dtype, device=g.device)
    if M == 0 or K == 0:
        return dx
    seed_t, threshold, _, has_drop = dropout_args(dropout_p, seed, g)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    _KERNEL(g.device)[grid](
        g, weight, dh, lora_A, dx, seed_t,
        M, N, K, TR, next_pow2(M),
        g.stride(0), g.stride(1), weight.stride(0), weight.stride(1), dh.stride(0), dh.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        threshold,
        HAS_DROPOUT=has_drop, DOT_PREC=dot_precision(g.dtype), BLOCK_R=min(128, next_pow2(TR)),
    )
    return dx
