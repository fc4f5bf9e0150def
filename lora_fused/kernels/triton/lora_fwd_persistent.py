"""The forward in one persistent TMA kernel (sm_90+): ``y = x Wᵀ + b + s·h B_expᵀ`` with ``h = x̂ Aᵀ`` computed
from the x tiles the GEMM already streams, so the down projection costs no pass over x of its own."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (OLD_TRITON_SMEM, cdiv, dot_precision, dropout_args, keep_tile, lora_b_tile, next_pow2,
                      producer_first_tile, scratch_allocator, sm_count, tuned)
from .lora_linear_fwd import slice_args


def _configs(rows):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in rows
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): 128×256×64 with 3 stages and 8 warps is the Hopper GEMM
# shape class (two consumer warpgroups of 64×256 wgmma); the smaller ones serve small N/K and fp32 operands.
# Every entry compiles without spills on sm_90 (the AOT test enforces it; 128×128 with 4 warps spills).
FWD_TMA_CONFIGS_SM90 = _configs([
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 3),
])
FWD_TMA_CONFIGS_INTERPRET = _configs([(16, 32, 16, 4, 1)])


@triton.jit
def _fwd_k_loop(x_desc, w_desc, a_desc, acc, hacc, seed, rows, m0, n0, K, threshold,
                WITH_H: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[m0:, :] W[n0:, :]ᵀ over K; with WITH_H also hacc += keep∘x · Aᵀ from the same x tiles (the keep
    mask once per element, in the layout of the loaded tile)."""
    for k in range(0, K, BLOCK_K):
        xv = x_desc.load([m0, k])
        acc = tl.dot(xv, tl.trans(w_desc.load([n0, k])), acc, input_precision=DOT_PREC)
        if WITH_H:
            if HAS_DROPOUT:
                keep = keep_tile(seed, rows, k, threshold, BLOCK_M, BLOCK_K)
                xv = tl.where(keep, xv, tl.zeros_like(xv))
            hacc = tl.dot(xv, tl.trans(a_desc.load([0, k])), hacc, input_precision=DOT_PREC)
    return acc, hacc


@triton.jit
def _lora_fwd_persistent_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, h_ptr, seed_ptr, flag_ptr,
    M, N, K, R, TR, M_KEY,
    stride_xm, stride_wn, stride_am, stride_bn, stride_br, stride_ym, stride_hm,
    scaling, inv_scaling, threshold, drop_scale,
    off0, n0, boff0, off1, n1, boff1, off2, n2, boff2,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = x Wᵀ + b + s · h B_expᵀ,   h = (1/(1-p)) · (keep∘x) Aᵀ  (written for backward)

    Shapes: x (M, K), W (N, K), b (N,), A (T·r, K), B (ΣN_t, r), y (M, N), h (M, T·r) in x's dtype; slices
    (off_t, n_t, boff_t) for T ≤ 3 targets; flags (cdiv(M, BLOCK_M),) int32 zeroed. Grid: #SMs programs, each
    walking work items (``producer_first_tile``). Operands through device-side TMA descriptors; y stored by TMA.
    * producer (m, 0): its K loop also accumulates h (mask regenerated once per x element), writes h, releases
      flag m; its epilogue adds s·h B_expᵀ;
    * consumer (m, n ≥ 1) whose flag is set: the accumulator starts as s·h B_expᵀ (h read back, M·T·r elements),
      then the plain K loop;
    * consumer whose flag is not yet set: recomputes h like a producer (no write, no wait).
    Global-memory passes: as the plain persistent GEMM (x once per N-tile column, W per M-tile row with GROUP_M
    L2 reuse); h written once and read r/K of x; no separate pass over x for h.
    """
    dtype = y_ptr.dtype.element_ty
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[TR, K], strides=[stride_am, 1], block_shape=[BLOCK_R, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1], block_shape=[BLOCK_M, BLOCK_N])
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = producer_first_tile(tile, num_m, num_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        c0 = pid_n * BLOCK_N
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = c0 + tl.arange(0, BLOCK_N)
        h_mask = (rows < M)[:, None] & (rr < TR)[None, :]
        h_offs = rows.to(tl.int64)[:, None] * stride_hm + rr[None, :]
        bt, _brow, _j, _in = lora_b_tile(b_ptr, stride_bn, stride_br, cols, R, TR, off0, n0, boff0, off1, n1, boff1,
                                  off2, n2, boff2, BLOCK_R)
        flag = tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire")
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if (flag != 0) & (pid_n != 0):
            hv = tl.load(h_ptr + h_offs, mask=h_mask, other=0.0, cache_modifier=".cg")
            acc = tl.dot(hv, tl.trans(bt), acc, input_precision=DOT_PREC) * scaling
            acc, _unused = _fwd_k_loop(x_desc, w_desc, a_desc, acc, acc, seed, rows, m0, c0, K, threshold,
                                 False, HAS_DROPOUT, DOT_PREC, BLOCK_M, BLOCK_K)
        else:
            hacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc, hacc = _fwd_k_loop(x_desc, w_desc, a_desc, acc, hacc, seed, rows, m0, c0, K, threshold,
                                    True, HAS_DROPOUT, DOT_PREC, BLOCK_M, BLOCK_K)
            hv = (hacc * drop_scale).to(dtype)
            if pid_n == 0:
                tl.store(h_ptr + h_offs, hv, mask=h_mask)
                tl.debug_barrier()  # every thread's h stores precede the release below
                tl.atomic_xchg(flag_ptr + pid_m, 1, sem="release")
            if scaling != 0.0:
                acc = tl.dot(hv, tl.trans(bt), acc * inv_scaling, input_precision=DOT_PREC) * scaling
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
            acc = acc + bias.to(tl.float32)[None, :]
        y_desc.store([m0, c0], acc.to(dtype))


def fwd_tma_smem(m, e):
    """Shared memory of a config: pipelined x, W and A tiles, the h and B_exp tiles, and the staging of the masked
    x tile (Triton ≥ 3.7) or the y tile's TMA store buffer, which Triton 3.6 does not overlap with the pipeline.
    An upper bound of what Triton allocates, checked against the compiled kernels by the AOT test (within 4 KiB
    of the real usage at the 128×256×64 / 3-stage config under both versions); the autotuner prunes with it."""
    bm, bn, bk, br = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"], m["BLOCK_R"]
    loop = m["num_stages"] * (bm * bk + bn * bk + br * bk) * e
    staging = bm * bn * e if OLD_TRITON_SMEM else bm * bk * e
    return loop + staging + (bm + bn) * br * e


_KERNEL = tuned(
    _lora_fwd_persistent_kernel,
    {"sm90": FWD_TMA_CONFIGS_SM90, "interpret": FWD_TMA_CONFIGS_INTERPRET},
    key=["M_KEY", "N", "K", "TR", "HAS_BIAS", "HAS_DROPOUT", "DOT_PREC"],
    reset_to_zero=["flag_ptr"],
    smem=fwd_tma_smem,
)


def lora_fwd_persistent(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed, lora_slices):
    """``(y, h)``: x (M, K), weight (N, K), bias (N,)|None, lora_A (T·r, K), lora_B (ΣN_t, r) → y (M, N),
    h (M, T·r). One launch (plus the zeroed flags); the caller checked ``tma_ok`` and T·r ≤ 128."""
    M, K = x.shape
    N = weight.shape[0]
    _, sl = slice_args(lora_slices, N)
    R = lora_B.shape[1]
    TR = lora_A.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    h = torch.empty(M, TR, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, h.zero_()
    seed_t, threshold, scale, has_drop = dropout_args(dropout_p, seed, x)
    flags = torch.zeros(cdiv(M, 16), dtype=torch.int32, device=x.device)  # ≥ cdiv(M, BLOCK_M) entries
    programs = sm_count(x.device)
    grid = lambda meta: (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    s = float(scaling)
    with scratch_allocator():
        _KERNEL(x.device)[grid](
            x, weight, bias if bias is not None else x, lora_A, lora_B, y, h, seed_t, flags,
            M, N, K, R, TR, next_pow2(M),
            x.stride(0), weight.stride(0), lora_A.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0),
            h.stride(0), s, 1.0 / s if s != 0.0 else 0.0, threshold, scale, *sl,
            HAS_BIAS=bias is not None, HAS_DROPOUT=has_drop, DOT_PREC=dot_precision(x.dtype),
            BLOCK_R=next_pow2(TR),
        )
    return y, h
