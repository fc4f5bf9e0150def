"""Backward kernel 1: ``dh = s·g B`` and ``dB = s·gᵀ h`` per target slice, from one read of ``g``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, next_pow2, tuned
from .lora_linear_fwd import slice_args

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M sets the grid (M / BLOCK_M programs: 64 rows fill an H100's
# 132 SMs from M = 8448) and how many partials add into dB.
DHDB_CONFIGS_SM90 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (32, 64, 4, 2)]
]
DHDB_CONFIGS_SM80 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 2)]
]
DHDB_CONFIGS_INTERPRET = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32})]


@triton.jit
def _one_target(g_ptr, b_ptr, h_ptr, dh_ptr, db_ptr, t, off, n, b_off, rows, M, R, NB,
                stride_gm, stride_gn, stride_bn, stride_br, stride_hm, stride_hr, stride_dm, stride_dr,
                scaling, dh_scale, DO_DH: tl.constexpr, DO_DB: tl.constexpr, DETERMINISTIC: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    rk = tl.arange(0, BLOCK_R)
    r_ok = rk < R
    row_ok = rows < M
    hr_offs = rows.to(tl.int64)[:, None] * stride_hm + (t * R + rk)[None, :] * stride_hr
    if DO_DB:
        hv = tl.load(h_ptr + hr_offs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    g_row = g_ptr + rows.to(tl.int64)[:, None] * stride_gm
    for n0 in range(0, n, BLOCK_N):
        cn = n0 + tl.arange(0, BLOCK_N)
        n_ok = cn < n
        gv = tl.load(g_row + (off + cn).to(tl.int64)[None, :] * stride_gn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        b_offs = (b_off + cn).to(tl.int64)[:, None] * stride_bn + rk[None, :] * stride_br
        if DO_DH:
            bv = tl.load(b_ptr + b_offs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            dh = tl.dot(gv, bv, dh, input_precision=DOT_PREC)
        if DO_DB:
            part = tl.dot(tl.trans(gv), hv, input_precision=DOT_PREC)
            db_offs = (b_off + cn).to(tl.int64)[:, None] * R + rk[None, :]
            if DETERMINISTIC:  # this program's partial, summed in a fixed order afterwards
                db_offs += tl.program_id(0).to(tl.int64) * NB * R
                tl.store(db_ptr + db_offs, part * scaling, mask=n_ok[:, None] & r_ok[None, :])
            else:  # relaxed: no fence per add (acq_rel would fence every one)
                tl.atomic_add(db_ptr + db_offs, part * scaling, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    if DO_DH:
        dh_offs = rows.to(tl.int64)[:, None] * stride_dm + (t * R + rk)[None, :] * stride_dr
        tl.store(dh_ptr + dh_offs, (dh * dh_scale).to(dh_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_bwd_dh_db_kernel(
    g_ptr, b_ptr, h_ptr, dh_ptr, db_ptr,
    M, R, NB, M_KEY, N_KEY,
    stride_gm, stride_gn, stride_bn, stride_br, stride_hm, stride_hr, stride_dm, stride_dr,
    scaling, dh_scale,
    off0, n0, boff0, off1, n1, boff1, off2, n2, boff2,
    NUM_T: tl.constexpr, DO_DH: tl.constexpr, DO_DB: tl.constexpr, DETERMINISTIC: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dh_t = (s/(1-p)) · g[:, slice_t] B_t     dB_t += s · g[:, slice_t]ᵀ h_t      (t < T ≤ 3)

    Shapes: g (M, N), B (ΣN_t, r), h (M, T·r) saved by the forward, dh (M, T·r) in g's dtype (pre-scaled by
    1/(1-p) for the dx and dA kernels), dB (ΣN_t, r) fp32, zero-initialised. Grid: (cdiv(M, BLOCK_M),).
    Each program owns BLOCK_M rows: it walks the columns of every targeted slice once, feeding each g tile to
    both MMAs; dh is complete in registers, dB partials are atomically added (M/BLOCK_M adds per element).
    Global-memory passes: g once over the targeted columns only (untargeted q/k/v slices are never read),
    h once, B once per program (L2); x and W are not touched.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    _one_target(g_ptr, b_ptr, h_ptr, dh_ptr, db_ptr, 0, off0, n0, boff0, rows, M, R, NB, stride_gm, stride_gn,
                stride_bn, stride_br, stride_hm, stride_hr, stride_dm, stride_dr, scaling, dh_scale,
                DO_DH, DO_DB, DETERMINISTIC, DOT_PREC, BLOCK_N, BLOCK_R, BLOCK_M)
    if NUM_T > 1:
        _one_target(g_ptr, b_ptr, h_ptr, dh_ptr, db_ptr, 1, off1, n1, boff1, rows, M, R, NB, stride_gm, stride_gn,
                    stride_bn, stride_br, stride_hm, stride_hr, stride_dm, stride_dr, scaling, dh_scale,
                    DO_DH, DO_DB, DETERMINISTIC, DOT_PREC, BLOCK_N, BLOCK_R, BLOCK_M)
    if NUM_T > 2:
        _one_target(g_ptr, b_ptr, h_ptr, dh_ptr, db_ptr, 2, off2, n2, boff2, rows, M, R, NB, stride_gm, stride_gn,
                    stride_bn, stride_br, stride_hm, stride_hr, stride_dm, stride_dr, scaling, dh_scale,
                    DO_DH, DO_DB, DETERMINISTIC, DOT_PREC, BLOCK_N, BLOCK_R, BLOCK_M)


def _smem(m, e):
    return (m["num_stages"] * (m["BLOCK_M"] * m["BLOCK_N"] + m["BLOCK_N"] * m["BLOCK_R"]) + m["BLOCK_M"] * m["BLOCK_R"]) * e


_KERNEL = tuned(
    _lora_bwd_dh_db_kernel,
    {"sm90": DHDB_CONFIGS_SM90, "sm80": DHDB_CONFIGS_SM80, "interpret": DHDB_CONFIGS_INTERPRET},
    key=["M_KEY", "N_KEY", "R", "NUM_T", "DO_DH", "DO_DB", "DETERMINISTIC", "DOT_PREC"],
    reset_to_zero=["db_ptr"],
    smem=_smem,
)


def lora_bwd_dh_db(g, lora_B, h, scaling: float, dh_scale: float, lora_slices, need_dh: bool, need_db: bool,
                   deterministic: bool = False):
    """``(dh, dB)``: dh (M, T·r) in g's dtype scaled by ``s·dh_scale`` (or None), dB (ΣN_t, r) fp32 (or None).
    One launch (plus, when ``deterministic``, a fixed-order sum of the per-program dB partials). ``h`` (M, T·r)
    may be None when dB is not needed."""
    M, N = g.shape
    T, sl = slice_args(lora_slices, N)
    R = lora_B.shape[1]
    NB = lora_B.shape[0]
    dh = torch.empty(M, T * R, dtype=g.dtype, device=g.device) if need_dh else None
    det = deterministic and need_db
    if det:  # one partial per program; every config's BLOCK_M is a multiple of 16
        db = torch.empty(cdiv(M, 16), NB, R, dtype=torch.float32, device=g.device)
    else:
        db = torch.zeros(lora_B.shape, dtype=torch.float32, device=g.device) if need_db else None
    if M == 0 or not (need_dh or need_db):
        return dh, (db.sum(0) if det else db)
    used = {}

    def grid(meta):
        used["BLOCK_M"] = meta["BLOCK_M"]
        return (cdiv(M, meta["BLOCK_M"]),)

    dh_arg = dh if dh is not None else g
    h_arg = h if h is not None else g
    _KERNEL(g.device)[grid](
        g, lora_B, h_arg, dh_arg, db if db is not None else torch.zeros(1, dtype=torch.float32, device=g.device),
        M, R, NB, next_pow2(M), N,
        g.stride(0), g.stride(1), lora_B.stride(0), lora_B.stride(1), h_arg.stride(0), h_arg.stride(1),
        dh_arg.stride(0), dh_arg.stride(1),
        float(scaling), float(scaling) * float(dh_scale), *sl,
        NUM_T=T, DO_DH=need_dh, DO_DB=need_db, DETERMINISTIC=det, DOT_PREC=dot_precision(g.dtype),
        BLOCK_R=next_pow2(R),
    )
    if det:
        db = db[:cdiv(M, used.get("BLOCK_M", 16))].sum(0)
    return dh, db
