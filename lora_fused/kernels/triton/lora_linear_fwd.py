"""Forward kernel 2: the base GEMM ``x Wᵀ`` with ``s·h_t B_tᵀ`` and the bias in the same accumulator/epilogue."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, next_pow2, tuned


def _gemm_configs(rows):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in rows
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Shared with the dx kernel (same GEMM shape class).
# Kept short: every config is a compile per (dtype, flags), and the GPU check has a time budget. The first
# entry (used when autotuning is off) fits fp32 operands in shared memory too.
GEMM_CONFIGS_SM90 = _gemm_configs([
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 2),
])
GEMM_CONFIGS_SM80 = _gemm_configs([
    (128, 128, 32, 4, 4), (128, 256, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 2),
])
GEMM_CONFIGS_INTERPRET = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2})]


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program with GROUP_M-row swizzling for L2 reuse of the N-side operand."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _add_target(acc, h_ptr, b_ptr, t, off, n, b_off, n_start, rows, cols, M, R, stride_hm, stride_hr, stride_bn, stride_br,
                DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc += h[:, t·r:(t+1)·r] · B[b_off + (cols - off), :]ᵀ for the columns of this tile inside target t's slice
    [off, off+n); columns outside it load zeros, so a tile straddling a q/k/v boundary is handled exactly."""
    if (off < n_start + BLOCK_N) & (off + n > n_start):
        rk = tl.arange(0, BLOCK_R)
        r_ok = rk < R
        hv = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + (t * R + rk)[None, :] * stride_hr,
                     mask=(rows < M)[:, None] & r_ok[None, :], other=0.0)
        in_t = (cols >= off) & (cols < off + n)
        b_rows = b_off + cols - off
        bv = tl.load(b_ptr + b_rows.to(tl.int64)[None, :] * stride_bn + rk[:, None] * stride_br,
                     mask=in_t[None, :] & r_ok[:, None], other=0.0)
        acc = tl.dot(hv, bv, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    off0, n0, boff0, off1, n1, boff1, off2, n2, boff2,
    NUM_T: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x Wᵀ + b + s · Σ_t [cols in slice t] h_t B_tᵀ

    Shapes: x (M, K), W (N, K), b (N,), h (M, T·r) from kernel 1, B (ΣN_t, r), y (M, N); slices
    (off_t, n_t, b_off_t) for T ≤ 3 targets (T = 1, (0, N, 0) for a plain LoRALinear). One fp32 accumulator:
    it starts as s·h_t B_tᵀ (an r-deep MMA per target intersecting the tile, zero-padded outside the slice),
    then the K loop adds x Wᵀ, then the epilogue adds b and writes y once (never read back).
    Global-memory passes: as the plain GEMM: x once per N-tile column, W once per M-tile row (L2 swizzled
    with GROUP_M); h and B r/K of that extra. No g.
    """
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _add_target(acc, h_ptr, b_ptr, 0, off0, n0, boff0, pid_n * BLOCK_N, rows, cols, M, R, stride_hm, stride_hr,
                      stride_bn, stride_br, DOT_PREC, BLOCK_N, BLOCK_R)
    if NUM_T > 1:
        acc = _add_target(acc, h_ptr, b_ptr, 1, off1, n1, boff1, pid_n * BLOCK_N, rows, cols, M, R, stride_hm, stride_hr,
                          stride_bn, stride_br, DOT_PREC, BLOCK_N, BLOCK_R)
    if NUM_T > 2:
        acc = _add_target(acc, h_ptr, b_ptr, 2, off2, n2, boff2, pid_n * BLOCK_N, rows, cols, M, R, stride_hm, stride_hr,
                          stride_bn, stride_br, DOT_PREC, BLOCK_N, BLOCK_R)
    acc = acc * scaling
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_col = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xv = tl.load(x_row + ks.to(tl.int64)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wv = tl.load(w_col + ks.to(tl.int64)[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(xv, wv, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    y_offs = rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def gemm_smem(m, e, red="BLOCK_K", out="BLOCK_N"):
    """Pipelined operand tiles of the main loop plus the (unpipelined) low-rank tiles, in bytes."""
    loop = m["num_stages"] * (m["BLOCK_M"] * m[red] + m[red] * m[out])
    return (loop + m["BLOCK_M"] * m["BLOCK_R"] + m["BLOCK_R"] * m[out]) * e


_KERNEL = tuned(
    _lora_linear_fwd_kernel,
    {"sm90": GEMM_CONFIGS_SM90, "sm80": GEMM_CONFIGS_SM80, "interpret": GEMM_CONFIGS_INTERPRET},
    key=["M_KEY", "N", "K", "R", "NUM_T", "HAS_BIAS", "DOT_PREC"],
    smem=gemm_smem,
)


def slice_args(lora_slices, N: int):
    """``(T, [off0, n0, boff0, off1, n1, boff1, off2, n2, boff2])`` from the flat ``[off_0, n_0, …]`` list (a
    tuple, cached per layout)."""
    return _slice_args(tuple(lora_slices), N)


@functools.lru_cache(maxsize=1024)
def _slice_args(lora_slices: tuple, N: int):
    T = len(lora_slices) // 2
    if not 1 <= T <= 3 or len(lora_slices) != 2 * T:
        raise ValueError(f"lora_slices must describe 1 to 3 targets, got {list(lora_slices)}")
    out, b_off = [], 0
    for t in range(T):
        off, n = int(lora_slices[2 * t]), int(lora_slices[2 * t + 1])
        if off < 0 or n < 0 or off + n > N:
            raise ValueError(f"lora_slices {list(lora_slices)} fall outside the {N} output columns")
        out += [off, n, b_off]
        b_off += n
    return T, tuple(out + [0, 0, b_off] * (3 - T))


def lora_linear_fwd(x, weight, bias, h, lora_B, scaling: float, lora_slices) -> torch.Tensor:
    """``y = x Wᵀ + b + s·h_t B_tᵀ`` per target slice, one launch; x (M, K), h (M, T·r) → y (M, N)."""
    M, K = x.shape
    N = weight.shape[0]
    T, sl = slice_args(lora_slices, N)
    R = lora_B.shape[1]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _KERNEL(x.device)[grid](
        x, weight, bias if bias is not None else x, h, lora_B, y,
        M, N, K, R, next_pow2(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        float(scaling), *sl,
        NUM_T=T, HAS_BIAS=bias is not None, DOT_PREC=dot_precision(x.dtype), BLOCK_R=next_pow2(R),
    )
    return y
