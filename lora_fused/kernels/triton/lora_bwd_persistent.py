"""The backward in one persistent TMA kernel (sm_90+): ``dx = g W + keep∘(dh' A)`` where the dx tiles that stream
g also produce ``dh' = s/(1-p)·g B_exp`` and ``dB = s·gᵀh``, and every dx tile adds its share of
``dA = dh'ᵀ (keep∘x)`` from the mask it already computed: no separate pass over g or x."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import (OLD_TRITON_SMEM, _arch_key, cdiv, device_smem_limit, dot_precision, dropout_args,
                      fitting_configs, keep_bits, layout_barrier, lora_b_tile, next_pow2, producer_first_tile,
                      scratch_allocator, sm_count, tuned, unpack_keep, unpack_keep_mma)
from .lora_linear_fwd import slice_args


def _configs(rows):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8, "EPI_SPLIT": sp}, num_warps=w,
                      num_stages=s)
        for bm, bk, bn, w, s, sp in rows
    ]


# dx is (M, K) with an N-deep reduction: its own list (in the forward's the third block is the reduction).
# (BLOCK_M, BLOCK_K = output width, BLOCK_N = reduction depth, warps, stages, EPI_SPLIT = column subtiles of the
# prologue/epilogue). Only configs that compile without register spills on sm_90 under Triton 3.6 and 3.8 are
# listed (the AOT test enforces it). 128×256 spills in both (600–900 B with the epilogue in 2 or 4 subtiles: the
# 128-register accumulator of 8 warps without warp specialization leaves too few for the fused dh'/dB/dA/mask
# work); 128×128 in 4 subtiles spills under 3.6, 64×256 in deterministic mode under 3.8. 64×64 with a 32-deep
# reduction and 4 warps is left out: forced alone, it failed the ragged bf16 gradient test on an H100 under
# Triton 3.6 (the same config is exact under the interpreter), while the two below passed.
DX_TMA_CONFIGS_SM90 = _configs([
    (128, 128, 64, 8, 4, 2), (64, 128, 64, 8, 4, 1),
])
# Under the interpreter: the epilogue in 2 subtiles, so the tests run the split/join paths.
DX_TMA_CONFIGS_INTERPRET = _configs([(16, 32, 16, 4, 1, 2)])


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
def _dx_low_rank(x_desc, a_ptr, da_ptr, seed, dhv, rows, m0, k0, pid_m, K, TR, stride_am, threshold,
                 HAS_DROPOUT: tl.constexpr, DO_DA: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_KS: tl.constexpr, BLOCK_R: tl.constexpr):
    """keep∘(dh' A[:, k0:k0+BLOCK_KS]) (fp32, the accumulator's layout) and, with DO_DA, this subtile's share of
    dA[:, k0:] = dh'ᵀ (keep∘x[rows, k0:]). The subtile's keep bits are generated once (blocked layout, 8 per
    Philox call) and serve both: unpacked in place for the x tile, moved as bytes to the accumulator's layout."""
    rr = tl.arange(0, BLOCK_R)
    ks = k0 + tl.arange(0, BLOCK_KS)
    if HAS_DROPOUT:
        bits = layout_barrier(keep_bits(seed, rows, k0, threshold, BLOCK_M, BLOCK_KS))
    if DO_DA:
        xv = x_desc.load([m0, k0])
        if HAS_DROPOUT:
            xv = tl.where(unpack_keep(bits, BLOCK_M, BLOCK_KS), xv, tl.zeros_like(xv))
        part = tl.dot(tl.trans(dhv), xv, input_precision=DOT_PREC)
        offs = rr.to(tl.int64)[:, None] * K + ks[None, :]
        da_mask = (rr < TR)[:, None] & (ks < K)[None, :]
        if DETERMINISTIC:
            tl.store(da_ptr + pid_m.to(tl.int64) * TR * K + offs, part, mask=da_mask)
        else:
            tl.atomic_add(da_ptr + offs, part, mask=da_mask, sem="relaxed")
    av = tl.load(a_ptr + rr.to(tl.int64)[:, None] * stride_am + ks[None, :],
                 mask=(rr < TR)[:, None] & (ks < K)[None, :], other=0.0)
    low = tl.dot(dhv, av, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        low = tl.where(unpack_keep_mma(bits, BLOCK_M, BLOCK_KS), low, 0.0)
    return low


@triton.jit
def _split_cols(acc, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The left and right column halves of a [BLOCK_M, BLOCK_K] register tile (no data movement)."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_K // 2)), (0, 2, 1)))


@triton.jit
def _join_cols(lo, hi, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] from its left and right column halves (the inverse of ``_split_cols``)."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_M, BLOCK_K))


@triton.jit
def _dx_prologue(x_desc, a_ptr, da_ptr, seed, dhv, rows, m0, k0, pid_m, K, TR, stride_am, threshold,
                 HAS_DROPOUT: tl.constexpr, DO_DA: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EPI_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr):
    """keep∘(dh' A[:, k0:k0+BLOCK_K]) and the tile's dA share, built from EPI_SPLIT (1 or 2) column subtiles
    (one subtile's x, mask and low-rank term live at a time)."""
    BKS: tl.constexpr = BLOCK_K // EPI_SPLIT
    acc = _dx_low_rank(x_desc, a_ptr, da_ptr, seed, dhv, rows, m0, k0, pid_m, K, TR, stride_am, threshold,
                       HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BKS, BLOCK_R)
    if EPI_SPLIT == 2:
        hi = _dx_low_rank(x_desc, a_ptr, da_ptr, seed, dhv, rows, m0, k0 + BKS, pid_m, K, TR, stride_am, threshold,
                          HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BKS, BLOCK_R)
        acc = _join_cols(acc, hi, BLOCK_M, BLOCK_K)
    return acc


@triton.jit
def _dx_epilogue(dx_desc, x_desc, a_ptr, da_ptr, seed, dhv, acc, add_low, rows, m0, k0, pid_m, K, TR, stride_am,
                 threshold, HAS_DROPOUT: tl.constexpr, DO_DA: tl.constexpr, DETERMINISTIC: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Stores the dx subtile ``acc`` (columns k0 … k0+BLOCK_KS) by TMA, after adding keep∘(dh' A) and this
    subtile's dA share when ``add_low`` (the tile's dh' came from its own N loop)."""
    if add_low:
        acc += _dx_low_rank(x_desc, a_ptr, da_ptr, seed, dhv, rows, m0, k0, pid_m, K, TR, stride_am, threshold,
                            HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_KS, BLOCK_R)
    dx_desc.store([m0, k0], acc.to(dx_desc.dtype))


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
    GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr,
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
    BLOCK_KS: tl.constexpr = BLOCK_K // EPI_SPLIT  # epilogue subtile width (the low-rank term, dA, the store)
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[stride_gm, 1], block_shape=[BLOCK_M, BLOCK_N])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    dx_desc = tl.make_tensor_descriptor(dx_ptr, shape=[M, K], strides=[stride_dxm, 1],
                                        block_shape=[BLOCK_M, BLOCK_KS])
    x_desc = dx_desc
    if DO_DA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_KS])
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
        dh_mask = (rows < M)[:, None] & (rr < TR)[None, :]
        dh_offs = rows.to(tl.int64)[:, None] * stride_dhm + rr[None, :]
        flag = tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire")
        producer = pid_k == 0
        ready = (flag != 0) & (pid_k != 0)
        dacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if ready:  # prologue: the accumulator starts as keep∘(dh' A), its dA share from the same bits
            dhv = tl.load(dh_ptr + dh_offs, mask=dh_mask, other=0.0, cache_modifier=".cg")
            acc = _dx_prologue(x_desc, a_ptr, da_ptr, seed, dhv, rows, m0, k0, pid_m, K, TR, stride_am, threshold,
                               HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_K, EPI_SPLIT, BLOCK_R)
        else:
            dhv = tl.zeros((BLOCK_M, BLOCK_R), dtype=dtype)
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc, dacc = _dx_n_loop(g_desc, w_desc, b_ptr, h_ptr, db_ptr, acc, dacc, rows, m0, k0, pid_m, M, N, R, TR, NB,
                               stride_bn, stride_br, stride_hm, scaling, off0, n0, boff0, off1, n1, boff1, off2, n2,
                               boff2, not ready, producer, DO_DB, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_R)
        if not ready:  # dh' came from this tile's N loop: the epilogue adds keep∘(dh' A)
            dhv = (dacc * dh_scale).to(dtype)
            if producer:
                tl.store(dh_ptr + dh_offs, dhv, mask=dh_mask)
                tl.debug_barrier()  # every thread's dh' stores precede the release below
                tl.atomic_xchg(flag_ptr + pid_m, 1, sem="release")
        # column subtiles: the epilogue holds one subtile's low-rank term (and mask) at a time
        if EPI_SPLIT == 1:
            _dx_epilogue(dx_desc, x_desc, a_ptr, da_ptr, seed, dhv, acc, not ready, rows, m0, k0, pid_m, K, TR,
                         stride_am, threshold, HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_KS, BLOCK_R)
        else:
            lo, hi = _split_cols(acc, BLOCK_M, BLOCK_K)
            _dx_epilogue(dx_desc, x_desc, a_ptr, da_ptr, seed, dhv, lo, not ready, rows, m0, k0, pid_m, K, TR,
                         stride_am, threshold, HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_KS, BLOCK_R)
            _dx_epilogue(dx_desc, x_desc, a_ptr, da_ptr, seed, dhv, hi, not ready, rows, m0, k0 + BLOCK_KS, pid_m, K,
                         TR, stride_am, threshold, HAS_DROPOUT, DO_DA, DETERMINISTIC, DOT_PREC, BLOCK_M, BLOCK_KS,
                         BLOCK_R)


# Widest low-rank vector (BLOCK_R) with which 128-row dx tiles compile without register spills on sm_90 (their
# accumulator takes 64 registers per thread for 128×128, the fused dh'/dB/dA/mask state the rest; measured by the
# AOT check under Triton 3.6 and 3.8: T·r = 32, the ViT qkv case, spills).
WIDE_TILE_MAX_R = 16


def bwd_tma_smem(m, e):
    """Shared memory of a config: pipelined g, W and B_exp tiles and the low-rank operands (the x subtiles for dA,
    the dx store buffer and the mask's layout change reuse the pipeline's buffers after the N loop). An upper
    bound of what Triton allocates, checked against the compiled kernels by the AOT test; the autotuner prunes
    with it. A 128-row config with BLOCK_R > WIDE_TILE_MAX_R gets infinity: it does not fit the register file."""
    bm, bk, bn, br = m["BLOCK_M"], m["BLOCK_K"], m["BLOCK_N"], m["BLOCK_R"]
    if bm >= 128 and br > WIDE_TILE_MAX_R:
        return math.inf
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


def bwd_fits(elem: int, tr: int, device: torch.device) -> bool:
    """Whether some sm_90 dx config fits the device's shared memory for operands of ``elem`` bytes and T·r = ``tr``
    (when none does, e.g. fp32 with T·r = 128, the caller takes the pointer kernels). Always True under the
    interpreter, whose one small config fits anything."""
    if _arch_key(device) == "interpret":
        return True
    return _fits(elem, next_pow2(tr), device_smem_limit(device))


@functools.lru_cache(maxsize=None)
def _fits(elem: int, block_r: int, limit: int) -> bool:
    return bool(fitting_configs(DX_TMA_CONFIGS_SM90, bwd_tma_smem, limit, elem, {"BLOCK_R": block_r}))


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
    parts = cdiv(M, 16)  # ≥ cdiv(M, BLOCK_M) for every config: partials and flags are sized for any
    f32 = dict(dtype=torch.float32, device=dev)
    if deterministic:
        flags = torch.zeros(parts, dtype=torch.int32, device=dev)
        # every config's row blocks are a whole number of 16-row blocks: the launch fills the first cdiv(M, BM)
        da = torch.empty(parts, TR, K, **f32) if need_da else None
        db = torch.empty(parts, NB, R, **f32) if need_db else None
    else:
        # flags, dA and dB accumulators zeroed by one fill (each call on a GPU costs host time): one fp32 buffer,
        # each part starting on a 16-byte boundary (flags padded to 4 words; K is a multiple of 4 under TMA)
        nf = cdiv(parts, 4) * 4
        na, nb = (TR * K if need_da else 0), (NB * R if need_db else 0)
        buf = torch.zeros(nf + na + nb, **f32)
        flags = buf.view(torch.int32)  # the kernel reads its first cdiv(M, BLOCK_M) ≤ nf words
        da = buf.as_strided((TR, K), (K, 1), nf) if need_da else None
        db = buf.as_strided((NB, R), (R, 1), nf + na) if need_db else None
    programs = sm_count(dev)
    used = {}

    def grid(meta):
        used["BLOCK_M"] = meta["BLOCK_M"]
        return (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"])),)

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
        n = cdiv(M, used.get("BLOCK_M", 16))
        da = da[:n].sum(0) if da is not None else None
        db = db[:n].sum(0) if db is not None else None
    return dx, da, db
