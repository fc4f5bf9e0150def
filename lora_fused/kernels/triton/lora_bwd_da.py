"""Backward kernel 3: ``dA = dhᵀ dropout(x)``, the dropped input formed tile by tile from x and the seed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, dropout_args, interpreted_on, keep_tile, next_pow2, sm_count, tuned

# (BLOCK_M, BLOCK_K, num_warps, num_stages). The M reduction is split across programs (see ``lora_bwd_da``).
DA_CONFIGS_SM90 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 128, 4, 4), (128, 128, 8, 3), (64, 64, 4, 2)]
]
DA_CONFIGS_SM80 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 2)]
]
DA_CONFIGS_INTERPRET = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32})]


@triton.jit
def _lora_bwd_da_kernel(
    x_ptr, dh_ptr, da_ptr, seed_ptr,
    M, K, TR, M_KEY,
    stride_xm, stride_xk, stride_dm, stride_dr,
    threshold,
    HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dA[j, k] += Σ_{m in this split} dh'[m, j] · keep[m, k] · x[m, k]       (dh' = s/(1-p) · g B)

    Shapes: x (M, K), dh' (M, T·r), dA (T·r, K) fp32, zero-initialised. Grid: (cdiv(K, BLOCK_K),
    cdiv(T·r, BLOCK_R), SPLIT); split s reduces M-tiles s, s+SPLIT, … and adds its partial with a relaxed
    atomic (SPLIT adds per element), or (DETERMINISTIC) stores it as partial s of (SPLIT, T·r, K) for a
    fixed-order sum. The dropped x is formed in registers.
    Global-memory passes: x once per R-block (once when T·r ≤ 128), dh' once per K-tile (small, L2-resident);
    g and W are not touched.
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok = ks < K
    r_ok = rr < TR
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for mt in range(pid_s, tl.cdiv(M, BLOCK_M), n_split):
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        r64 = rows.to(tl.int64)[:, None]
        xv = tl.load(x_ptr + r64 * stride_xm + ks.to(tl.int64)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        if HAS_DROPOUT:
            keep = keep_tile(seed, rows, pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K)
            xv = tl.where(keep, xv, tl.zeros_like(xv))
        dv = tl.load(dh_ptr + r64 * stride_dm + rr[None, :] * stride_dr, mask=row_ok[:, None] & r_ok[None, :],
                     other=0.0)
        acc = tl.dot(tl.trans(dv), xv, acc, input_precision=DOT_PREC)
    offs = rr.to(tl.int64)[:, None] * K + ks[None, :]
    if DETERMINISTIC:  # this split's partial, summed in a fixed order afterwards
        offs += pid_s.to(tl.int64) * TR * K
        tl.store(da_ptr + offs, acc, mask=r_ok[:, None] & k_ok[None, :])
    else:  # relaxed: no fence per add
        tl.atomic_add(da_ptr + offs, acc, mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")


def _smem(m, e):
    return m["num_stages"] * (m["BLOCK_M"] * m["BLOCK_K"] + m["BLOCK_M"] * m["BLOCK_R"]) * e


_KERNEL = tuned(
    _lora_bwd_da_kernel,
    {"sm90": DA_CONFIGS_SM90, "sm80": DA_CONFIGS_SM80, "interpret": DA_CONFIGS_INTERPRET},
    key=["M_KEY", "K", "TR", "HAS_DROPOUT", "DETERMINISTIC", "DOT_PREC"],
    reset_to_zero=["da_ptr"],
    smem=_smem,
)


def _num_splits(M: int, K: int, block_m: int, block_k: int, n_r: int, device: torch.device) -> int:
    """Split the M reduction so the grid fills the GPU (≈ 4 programs per SM) with ≥ 4 M-tiles per split.
    In the interpreter: up to 4 programs with ≥ 1 M-tile each, so the tests exercise the split path."""
    m_tiles = cdiv(M, block_m)
    base = cdiv(K, block_k) * n_r
    if interpreted_on(device):
        return max(1, min(m_tiles, cdiv(4, base)))
    target = 4 * sm_count(device)
    return max(1, min(cdiv(m_tiles, 4), cdiv(target, base)))


# Upper bound of the splits (the partial buffer of the deterministic path is allocated before the config is known).
def _max_splits(M: int, K: int, n_r: int, device: torch.device) -> int:
    configs = _KERNEL.configs["interpret" if interpreted_on(device) else "sm90"]
    return max(_num_splits(M, K, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], n_r, device)
               for c in configs + DA_CONFIGS_SM80)


def lora_bwd_da(x, dh, dropout_p: float, seed, deterministic: bool = False) -> torch.Tensor:
    """``dA = dh'ᵀ (keep ∘ x)`` as fp32 (T·r, K); x (M, K), dh' (M, T·r) already scaled by s/(1-p).
    With ``deterministic``, per-split partials and a fixed-order sum instead of float atomics."""
    M, K = x.shape
    TR = dh.shape[1]
    if M == 0 or K == 0 or TR == 0:
        return torch.zeros(TR, K, dtype=torch.float32, device=x.device)
    seed_t, threshold, _, has_drop = dropout_args(dropout_p, seed, x)
    block_r = min(128, next_pow2(TR))
    n_r = cdiv(TR, block_r)
    if deterministic:
        da = torch.zeros(_max_splits(M, K, n_r, x.device), TR, K, dtype=torch.float32, device=x.device)
    else:
        da = torch.zeros(TR, K, dtype=torch.float32, device=x.device)
    grid = lambda meta: (  # noqa: E731
        cdiv(K, meta["BLOCK_K"]), n_r, _num_splits(M, K, meta["BLOCK_M"], meta["BLOCK_K"], n_r, x.device)
    )
    _KERNEL(x.device)[grid](
        x, dh, da, seed_t, M, K, TR, next_pow2(M),
        x.stride(0), x.stride(1), dh.stride(0), dh.stride(1),
        threshold,
        HAS_DROPOUT=has_drop, DETERMINISTIC=deterministic, DOT_PREC=dot_precision(x.dtype), BLOCK_R=block_r,
    )
    return da.sum(0) if deterministic else da
