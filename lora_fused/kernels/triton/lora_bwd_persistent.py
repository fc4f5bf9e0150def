"""The backward in one persistent TMA kernel (sm_90+): ``dx = g W + keep∘(dh' A)`` where the dx tiles that stream
g also produce ``dh' = s/(1-p)·g B_exp`` and ``dB = s·gᵀh``, and every dx tile adds its share of
``dA = dh'ᵀ (keep∘x)`` from the mask it already computed: no separate pass over g or x."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (OLD_TRITON_SMEM, dot_precision, dropout_args, keep_tile, lora_b_tile, next_pow2, producer_first_tile,
                      scratch_allocator, sm_count, tuned)
from .lora_linear_fwd import slice_args


def _configs(rows):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bk, bn, w, s in rows
    ]


# dx is (M, K) with an N-deep reduction: its own list (in the forward's the third block is the reduction).
# (BLOCK_M, BLOCK_K = output width, BLOCK_N = reduction depth, warps, stages). Only configs that compile without
# register spills on sm_90 are listed (the AOT test enforces it): 128-row output tiles (128×128, 128×256) spill
# because the keep mask is rematerialized in the accumulator's layout (docs/triton.md); 64×64×64 with 4 warps
# spills under Triton 3.6.
DX_TMA_CONFIGS_SM90 = _configs([
    (64, 128, 64, 8, 4), (64, 64, 32, 4, 3),
])
DX_TMA_CONFIGS_INTERPRET = _configs([(16, 32, 16, 4, 1)])


@triton.jit
def _dx_n_loop(g_desc, w_desc, b_ptr, h_ptr, db_ptr, acc, dacc, rows, m0, k0, pid_m, M, N, R, TR, NB,
               stride_bn, stride_br, stride_hm, scaling,
               off0, n0, boff0, off1, n1, boff1, off2, n2, boff2,
               with_dh, with_db, DO_DB: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc += g[m0:, :] W[:, k0:] over N; ``with_dh``: dacc += g B_exp from the same g tiles; ``with_db`` (and
    DO_DB): this row block's dB = s·g_chunkᵀ h per N chunk, stored as partial ``pid_m`` (DETERMINISTIC) or added
    with relaxed atomics. One loop (one software pipeline) for every kind of tile; the flags are runtime values."""
    rr = tl.arange(0, BLOCK_R)
    if DO_DB:
        hv = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + rr[None, :],
                     mask=(rows < M)[:, None] & (rr < TR)[None, :] & with_db, other=0.0)
    for n in range(0, N, BLOCK_N):
        gv = g_desc.load([m0, n])
        acc = tl.dot(gv, w_desc.load([n, k0]), acc, input_precision=DOT_PREC)
        if with_dh:
            ns = n + tl.arange(0, BLOCK_N)
            bt, brow, j, inside = lora_b_tile(b_ptr, stride_bn, stride_br, ns, R, TR, off0, n0, boff0, off1, n1,
                                              boff1, off2, n2, boff2, BLOCK_R)
            dacc = tl.dot(gv, bt, dacc, input_precision=DOT_PREC)
            if DO_DB & with_db:
                part = tl.dot(tl.trans(gv), hv, input_precision=DOT_PREC) * scaling
                offs = brow.to(tl.int64) * R + j[None, :]
                if DETERMINISTIC:
                    tl.store(db_ptr + pid_m.to(tl.int64) * NB * R + offs, part, mask=inside)
                else:
                    tl.atomic_add(db_ptr + offs, part, mask=inside, sem="relaxed")
    return acc, dacc


@triton.jit
def _dx_low_rank(x_desc, a_ptr, da_ptr, seed, dhv, acc, rows, ks, m0, k0, pid_m, K, TR, stride_am, threshold,
                 PROLOGUE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DO_DA: tl.constexpr, DETERMINISTIC: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + keep∘(dh' A[:, ks]) and, with DO_DA, this tile's dA[:, ks] share dh'ᵀ (keep∘x[rows, ks]): the keep
    mask of the tile is generated once (in the layout of its tile) and serves both."""
    rr = tl.arange(0, BLOCK_R)
    if HAS_DROPOUT:
        keep = keep_tile(seed, rows, k0, threshold, BLOCK_M, BLOCK_K)
    if DO_DA:
        xv = x_desc.load([m0, k0])
        if HAS_DROPOUT:
            xv = tl.where(keep, xv, tl.zeros_like(xv))
        part = tl.dot(tl.trans(dhv), xv, input_precision=DOT_PREC)
        offs = rr.to(tl.int64)[:, None] * K + ks[None, :]
        da_mask = (rr < TR)[:, None] & (ks < K)[None, :]
        if DETERMINISTIC:
            tl.store(da_ptr + pid_m.to(tl.int64) * TR * K + offs, part, mask=da_mask)
        else:
            tl.atomic_add(da_ptr + offs, part, mask=da_mask, sem="relaxed")
    av = tl.load(a_ptr + rr.to(tl.int64)[:, None] * stride_am + ks[None, :],
                 mask=(rr < TR)[:, None] & (ks < K)[None, :], other=0.0)
    if PROLOGUE:  # acc is zero: the low-rank MMA accumulates in place, the mask zeroes the dropped elements
        acc = tl.dot(dhv, av, acc, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            acc = tl.where(keep, acc, 0.0)
    else:
        low = tl.dot(dhv, av, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            low = tl.where(keep, low, 0.0)
        acc = acc + low
    return acc


@triton.jit
def _lora_bwd_persistent_kernel(
    g_ptr, w_ptr, a_ptr, b_ptr, h_ptr, x_ptr, dx_ptr, dh_ptr, db_ptr, da_ptr, seed_ptr, flag_ptr,
    M, N, K, R, TR, NB, M_KEY,
    stride_gm, stride_wn, stride_am, stride_bn, stride_br, stride_hm, stride_xm, stride_dxm, stride_dhm,
    scaling, dh_scale, threshold,
    off0, n0, boff0, off1, n1, boff1, off2, n2, boff2,
    HAS_DROPOUT: tl.constexpr, DO_DA: tl.constexpr, DO_DB: tl.constexpr, DETERMINISTIC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx = g W + keep∘(dh' A),  dh' = s/(1-p)·g B_exp,  dB = s·gᵀ h (per target),  dA = dh'ᵀ (keep∘x)

    Shapes: g (M, N), W (N, K), A (T·r, K), B (ΣN_t = NB, r), h (M, T·r), x (M, K), dx (M, K), dh' (M, T·r)
    scratch in g's dtype; dB fp32 (NB, r) or partials (cdiv(M, BLOCK_M), NB, r); dA fp32 (T·r, K) or partials
    (cdiv(M, BLOCK_M), T·r, K); flags (≥ cdiv(M, BLOCK_M),) int32 zeroed. Grid: #SMs programs over dx tiles
    (``producer_first_tile``), operands through device-side TMA descriptors, dx stored by TMA.
    * producer (m, 0): its N loop also accumulates dh' (and dB's row-block share); writes dh', releases flag m;
      epilogue adds keep∘(dh' A) (and its dA share);
    * consumer (m, k ≥ 1) whose flag is set: reads dh' back; the accumulator starts as keep∘(dh' A) (mask
      generated once per element of the tile; its dA share from the same mask), then the plain N loop;
    * consumer whose flag is not set: recomputes dh' in its N loop (no write, no wait), epilogue as a producer.
    Global-memory passes: as the plain persistent dx GEMM, plus x once (one tile per dx tile, for dA); no
    separate pass over g for dh/dB, none over x beyond that one.
    """
    dtype = dx_ptr.dtype.element_ty
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[stride_gm, 1], block_shape=[BLOCK_M, BLOCK_N])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    dx_desc = tl.make_tensor_descriptor(dx_ptr, shape=[M, K], strides=[stride_dxm, 1],
                                        block_shape=[BLOCK_M, BLOCK_K])
    x_desc = dx_desc
    if DO_DA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), num_m * num_k, tl.num_programs(0)):
        pid_m, pid_k = producer_first_tile(tile, num_m, num_k, GROUP_M)
        m0 = pid_m * BLOCK_M
        k0 = pid_k * BLOCK_K
        rows = m0 + tl.arange(0, BLOCK_M)
        ks = k0 + tl.arange(0, BLOCK_K)
        dh_mask = (rows < M)[:, None] & (rr < TR)[None, :]
        dh_offs = rows.to(tl.int64)[:, None] * stride_dhm + rr[None, :]
        flag = tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire")
        producer = pid_k == 0
        ready = (flag != 0) & (pid_k != 0)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        dacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if ready:
            dhv = tl.load(dh_ptr + dh_offs, mask=dh_mask, other=0.0, cache_modifier=".cg")
            acc = _dx_low_rank(x_desc, a_ptr, da_ptr, seed, dhv, acc, rows, ks, m0, k0, pid_m, K, TR, stride_am,
                               threshold, True, HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_R)
        acc, dacc = _dx_n_loop(g_desc, w_desc, b_ptr, h_ptr, db_ptr, acc, dacc, rows, m0, k0, pid_m, M, N, R, TR, NB,
                               stride_bn, stride_br, stride_hm, scaling, off0, n0, boff0, off1, n1, boff1, off2, n2,
                               boff2, not ready, producer, DO_DB, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_R)
        if not ready:
            dhv = (dacc * dh_scale).to(dtype)
            if producer:
                tl.store(dh_ptr + dh_offs, dhv, mask=dh_mask)
                tl.debug_barrier()  # every thread's dh' stores precede the release below
                tl.atomic_xchg(flag_ptr + pid_m, 1, sem="release")
            acc = _dx_low_rank(x_desc, a_ptr, da_ptr, seed, dhv, acc, rows, ks, m0, k0, pid_m, K, TR, stride_am,
                               threshold, False, HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_R)
        dx_desc.store([m0, k0], acc.to(dtype))


def bwd_tma_smem(m, e):
    """Shared memory of a config: pipelined g, W and B_exp tiles and the low-rank operands (the x tile for dA and
    the mask's layout change reuse the pipeline's buffers after the N loop). An upper bound of what Triton
    allocates, checked against the compiled kernels by the AOT test; the autotuner prunes with it."""
    bm, bk, bn, br = m["BLOCK_M"], m["BLOCK_K"], m["BLOCK_N"], m["BLOCK_R"]
    loop = m["num_stages"] * (bm * bn + bn * bk + bn * br) * e
    old = bm * bk * e if OLD_TRITON_SMEM else 0
    return loop + old + (br * bk + 2 * bm * br) * e + 4096


_KERNEL = tuned(
    _lora_bwd_persistent_kernel,
    {"sm90": DX_TMA_CONFIGS_SM90, "interpret": DX_TMA_CONFIGS_INTERPRET},
    key=["M_KEY", "N", "K", "TR", "HAS_DROPOUT", "DO_DA", "DO_DB", "DETERMINISTIC", "DOT_PREC"],
    reset_to_zero=["flag_ptr", "db_ptr", "da_ptr"],
    smem=bwd_tma_smem,
)


def lora_bwd_persistent(g, weight, lora_A, lora_B, h, x, scaling: float, dropout_p: float, seed, lora_slices,
                        need_da: bool, need_db: bool, deterministic: bool):
    """``(dx, dA fp32 | None, dB fp32 | None)`` for g (M, N), weight (N, K), lora_A (T·r, K), lora_B (ΣN_t, r),
    h (M, T·r) (None unless need_db), x (M, K) (None unless need_da). One launch, plus the zeroed flags and, when
    ``deterministic``, one fixed-order sum over the per-row-block partials of dA and dB (no float atomics)."""
    M, N = g.shape
    K = weight.shape[1]
    _, sl = slice_args(lora_slices, N)
    R = lora_B.shape[1]
    TR = lora_A.shape[0]
    NB = lora_B.shape[0]
    dev = g.device
    dx = torch.empty(M, K, dtype=g.dtype, device=dev)
    dh = torch.empty(M, TR, dtype=g.dtype, device=dev)
    seed_t, threshold, drop_scale, has_drop = dropout_args(dropout_p, seed, g)
    parts = triton.cdiv(M, 16)  # ≥ cdiv(M, BLOCK_M) for every config: partials and flags are sized for any
    flags = torch.zeros(parts, dtype=torch.int32, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    if deterministic:
        # every config's row blocks are a whole number of 16-row blocks: the launch fills the first cdiv(M, BM)
        da = torch.empty(parts, TR, K, **f32) if need_da else None
        db = torch.empty(parts, NB, R, **f32) if need_db else None
    else:
        da = torch.zeros(TR, K, **f32) if need_da else None
        db = torch.zeros(NB, R, **f32) if need_db else None
    programs = sm_count(dev)
    used = {}

    def grid(meta):
        used["BLOCK_M"] = meta["BLOCK_M"]
        return (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"])),)

    with scratch_allocator():
        _KERNEL(dev)[grid](
            g, weight, lora_A, lora_B, h if h is not None else g, x if x is not None else g, dx, dh,
            db if db is not None else flags, da if da is not None else flags, seed_t, flags,
            M, N, K, R, TR, NB, next_pow2(M),
            g.stride(0), weight.stride(0), lora_A.stride(0), lora_B.stride(0), lora_B.stride(1),
            h.stride(0) if h is not None else 0, x.stride(0) if x is not None else 0, dx.stride(0), dh.stride(0),
            float(scaling), float(scaling) * drop_scale, threshold, *sl,
            HAS_DROPOUT=has_drop, DO_DA=need_da, DO_DB=need_db, DETERMINISTIC=deterministic,
            DOT_PREC=dot_precision(g.dtype), BLOCK_R=next_pow2(TR),
        )
    if deterministic:
        n = triton.cdiv(M, used.get("BLOCK_M", 16))
        da = da[:n].sum(0) if da is not None else None
        db = db[:n].sum(0) if db is not None else None
    return dx, da, db
