"""Pure-PyTorch forward and backward of the (sliced) LoRA linear; the ``"torch"`` backend and the reference.

Notation (``shared/design/KERNELS.md``): ``x`` (M, K), ``W`` (N, K), ``b`` (N,), ``s`` the scaling, ``p`` the
dropout rate, ``m`` the keep mask regenerated from ``seed``, ``x̂ = m∘x/(1-p)``.

Adapters of ``T`` targets are packed: ``A`` is ``(T·r, K)`` (target ``t`` owns rows ``t·r … (t+1)·r``),
``B`` is ``(ΣN_t, r)`` (targets' rows concatenated in order), and ``lora_slices`` is the flat list
``[off_0, n_0, off_1, n_1, …]`` giving the output columns ``off_t … off_t+n_t`` that target ``t`` updates.
A plain ``LoRALinear`` is ``T = 1`` with ``lora_slices = [0, N]``.

Forward:   h = x̂ Aᵀ (M, T·r);   y = x Wᵀ + b;   y[:, slice_t] += s · h_t B_tᵀ
Backward:  dh_t = s · g_t B_t;  dB_t = s · g_tᵀ h_t;  dA = dhᵀ x̂;  dx = g W + m∘(dh A)/(1-p);
           dW = gᵀ x;  db = Σ_rows g      (dW, db only when asked for)

Every ``1/(1-p)`` is applied to the small M×r tensors, so each direction touches ``x`` with one masked
copy at most and never stores it. Saved for backward by the op: ``x``, ``h``, the seed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .dropout import dropout_keep_mask, dropout_scale


def iter_slices(lora_slices: Sequence[int], r: int):
    """Yield ``(a_rows, b_rows, out_cols)`` slice objects for each target of a packed adapter."""
    b_off = 0
    for t in range(len(lora_slices) // 2):
        off, n = lora_slices[2 * t], lora_slices[2 * t + 1]
        yield slice(t * r, (t + 1) * r), slice(b_off, b_off + n), slice(off, off + n)
        b_off += n


def _is_full(lora_slices: Sequence[int], n_out: int) -> bool:
    return len(lora_slices) == 2 and lora_slices[0] == 0 and lora_slices[1] == n_out


def _drop_mask(seed: Optional[int], x: torch.Tensor, p: float) -> Optional[torch.Tensor]:
    if p <= 0.0:
        return None
    return ~dropout_keep_mask(seed, x.shape[0], x.shape[1], p, x.device)


def lora_linear_forward_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[int],
    lora_slices: Sequence[int],
):
    """Return ``(y, h)``: ``y`` (M, N) the layer output and ``h = x̂ Aᵀ`` (M, T·r) for backward.

    Args:
        x: (M, K) input.  weight: (N, K).  bias: (N,) or None.
        lora_A: (T·r, K).  lora_B: (ΣN_t, r).  scaling: s.  dropout_p: p (0 = no dropout).
        seed: dropout seed (ignored when p == 0).  lora_slices: ``[off_0, n_0, …]`` (see module doc).
    """
    drop = _drop_mask(seed, x, dropout_p)
    x_kept = x if drop is None else x.masked_fill(drop, 0)
    h = x_kept @ lora_A.t()
    if drop is not None:
        h.mul_(dropout_scale(dropout_p))
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    r = lora_B.shape[1]
    if _is_full(lora_slices, y.shape[1]):
        y.addmm_(h, lora_B.t(), alpha=scaling)
    else:
        for a_rows, b_rows, cols in iter_slices(lora_slices, r):
            y[:, cols].addmm_(h[:, a_rows], lora_B[b_rows].t(), alpha=scaling)
    return y, h


def lora_linear_backward_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[int],
    lora_slices: Sequence[int],
    needs: Sequence[bool],
):
    """Gradients ``(dx, dW, db, dA, dB)``; an entry is ``None`` where ``needs`` (same order) is False.

    Args:
        grad_y: (M, N) upstream gradient ``g``.  x: (M, K) the saved input.  h: (M, T·r) saved ``x̂ Aᵀ``.
        Other arguments as in :func:`lora_linear_forward_ref`; the mask is regenerated from ``seed``.
    """
    need_dx, need_dw, need_db, need_da, need_db_lora = needs
    g = grad_y
    r = lora_B.shape[1]
    full = _is_full(lora_slices, g.shape[1])
    dh = dB = dA = dx = dW = db = None
    if need_dx or need_da:
        if full:
            dh = (g @ lora_B).mul_(scaling)
        else:
            dh = g.new_empty(g.shape[0], lora_A.shape[0])
            for a_rows, b_rows, cols in iter_slices(lora_slices, r):
                dh[:, a_rows] = g[:, cols] @ lora_B[b_rows]
            dh.mul_(scaling)
    if need_db_lora:
        if full:
            dB = (g.t() @ h).mul_(scaling)
        else:
            dB = torch.empty_like(lora_B)
            for a_rows, b_rows, cols in iter_slices(lora_slices, r):
                dB[b_rows] = g[:, cols].t() @ h[:, a_rows]
            dB.mul_(scaling)
    drop = _drop_mask(seed, x, dropout_p) if (need_dx or need_da) else None
    dh_scaled = dh if (dh is None or drop is None) else dh * dropout_scale(dropout_p)
    if need_da:
        x_kept = x if drop is None else x.masked_fill(drop, 0)
        dA = dh_scaled.t() @ x_kept
    if need_dx:
        # The (masked) low-rank term first, then the big GEMM accumulates onto it in place (beta=1).
        dx = dh_scaled @ lora_A
        if drop is not None:
            dx.masked_fill_(drop, 0)
        dx.addmm_(g, weight)
    if need_dw:
        dW = g.t() @ x
    if need_db:
        db = g.sum(0)
    return dx, dW, db, dA, dB
