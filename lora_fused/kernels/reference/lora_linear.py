"""Pure-PyTorch forward and backward of the (sliced) LoRA linear; the ``"torch"`` backend and the reference.

Notation (``docs/design.md``): ``x`` (M, K), ``W`` (N, K), ``b`` (N,), ``s`` the scaling, ``p`` the dropout
rate, ``m`` the keep mask regenerated from ``seed``, ``c = 1/(1-p)`` (1 without dropout), ``x̂ = c·m∘x``.

Adapters of ``T`` targets are packed: ``A`` is ``(T·r, K)`` (target ``t`` owns rows ``t·r … (t+1)·r``),
``B`` is ``(ΣN_t, r)`` (targets' rows concatenated in order), and ``lora_slices`` is the flat list
``[off_0, n_0, off_1, n_1, …]`` giving the output columns ``off_t … off_t+n_t`` that target ``t`` updates.
A plain ``LoRALinear`` is ``T = 1`` with ``lora_slices = [0, N]``.

Forward:   h = x̂ Aᵀ (M, T·r);   y = x Wᵀ + b;   y[:, slice_t] += s · h_t B_tᵀ
Backward:  u_t = g_t B_t (so dh = s·u);  dB_t = s · g_tᵀ h_t;  dA = s·c · uᵀ (m∘x);
           dx = g W + s·c · m∘(u A);  dW = gᵀ x;  db = Σ_rows g      (each only when asked for)

Scalars ride on the GEMMs (``alpha``/``beta``) rather than on extra passes, and ``x`` is masked at most once
per direction (on the CPU the mask is made as a 0/1 multiplier in ``x``'s dtype, elsewhere as a boolean mask;
either is applied by one multiply), never stored: the op saves ``x`` only for dA or dW, ``h`` only for dB, the seed for the mask.
``x`` may be None when neither dA nor dW is needed, ``h`` None when dB is not.

Several targets (or one on part of the outputs) are applied in one of three ways, all the same math:
small problems (``M·N·T·r <= SMALL``, where host time dominates) scatter ``B`` into a zero-padded ``(T·r, N)``
matrix and use one GEMM; targets of equal width at evenly spaced offsets (q and v of a fused qkv, or all three)
run as one batch (``baddbmm``/``bmm`` on strided views of ``y`` and ``g``); other layouts loop over the targets.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .dropout import cpu_keep_multiplier, dropout_keep_mask, hashed_keep_mask

Seed = Union[int, torch.Tensor, None]


def iter_slices(lora_slices: Sequence[int], r: int):
    """Yield ``(a_rows, b_rows, out_cols)`` slice objects for each target of a packed adapter."""
    b_off = 0
    for t in range(len(lora_slices) // 2):
        off, n = lora_slices[2 * t], lora_slices[2 * t + 1]
        yield slice(t * r, (t + 1) * r), slice(b_off, b_off + n), slice(off, off + n)
        b_off += n


SMALL = 1 << 16  # M·N·T·r at or below which the padded-B form is used (its extra zero products cost less than calls)

_scratch = threading.local()
_pad_index: dict = {}  # (slices, r, N, device) -> positions of B's elements in the flat (T·r, N) padded matrix


def _layout(lora_slices: Sequence[int], n_out: int, rows: int, r: int):
    """How targets other than one over all outputs (``lora_slices == [0, n_out]``) are applied: ``("padded",)``,
    ``("batched", T, n, step, off_0)`` for ``T`` targets of width ``n`` at offsets ``off_0 + t·step``
    (``step >= n``), or ``("loop",)``."""
    T = len(lora_slices) // 2
    off0, n = lora_slices[0], lora_slices[1]
    if rows * n_out * T * r <= SMALL:
        return ("padded",)
    step = lora_slices[2] - off0 if T > 1 else n
    if step < n:
        return ("loop",)
    for t in range(1, T):
        if lora_slices[2 * t + 1] != n or lora_slices[2 * t] != off0 + t * step:
            return ("loop",)
    return "batched", T, n, step, off0


def _padded_Bt(lora_B: torch.Tensor, lora_slices: Sequence[int], n_out: int):
    """``(B_padᵀ, index)``: ``B_padᵀ`` (T·r, N) is zero but for ``B_tᵀ`` at rows ``t·r … (t+1)·r`` and columns
    ``off_t … off_t+n_t``, so ``y += s · h B_padᵀ`` applies every target with one GEMM; ``index`` (shaped like
    ``B``) holds each element's flat position in ``B_padᵀ`` (``put_`` / ``take``)."""
    r = lora_B.shape[1]
    key = (tuple(lora_slices), r, n_out, lora_B.device)
    index = _pad_index.get(key)
    if index is None:
        rows = []
        for t, (_, b_rows, cols) in enumerate(iter_slices(lora_slices, r)):
            for i in range(b_rows.stop - b_rows.start):
                rows.append([(t * r + j) * n_out + cols.start + i for j in range(r)])
        index = _pad_index[key] = torch.tensor(rows, dtype=torch.int64, device=lora_B.device).view(-1, r)
    shape = (len(lora_slices) // 2 * r, n_out)
    if lora_B.is_cpu and not torch.is_grad_enabled():
        # CPU ops run in call order, so one zero-padded buffer per thread and layout can be refilled in place (only
        # B's positions are written, the zeros stay): a call less per use. It never leaves this module's GEMMs.
        scratch = _scratch.__dict__.setdefault("pads", {})
        buf = scratch.get((key, lora_B.dtype))
        if buf is None:
            with torch.inference_mode(False):
                buf = scratch[(key, lora_B.dtype)] = torch.zeros(shape, dtype=lora_B.dtype, device="cpu")
        return buf.put_(index, lora_B), index
    return lora_B.new_zeros(shape).put_(index, lora_B), index


def _columns(t: torch.Tensor, T: int, n: int, step: int, off0: int) -> torch.Tensor:
    """The (T, M, n) view of the targeted columns ``off0 + τ·step … + n`` (τ < T) of a 2-D ``t``."""
    s0, s1 = t.stride()
    return t.as_strided((T, t.shape[0], n), (step * s1, s0, s1), t.storage_offset() + off0 * s1)


def keep_mask(seed: Seed, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The torch backend's boolean keep mask: :func:`dropout_keep_mask` for an integer seed (CPU),
    :func:`hashed_keep_mask` for a seed tensor (other devices, no host sync)."""
    if isinstance(seed, torch.Tensor):
        return hashed_keep_mask(seed, rows, cols, p, device)
    return dropout_keep_mask(seed, rows, cols, p, device)


_zeros: dict = {}  # dtype -> a 0-dim CPU zero of that dtype (see lora_linear_forward_ref)


def _zero(dtype: torch.dtype) -> torch.Tensor:
    zero = _zeros.get(dtype)
    if zero is None:
        with torch.inference_mode(False):
            zero = _zeros[dtype] = torch.zeros((), dtype=dtype, device="cpu")  # whatever the default device
    return zero


def lora_linear_forward_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Seed,
    lora_slices: Sequence[int],
):
    """Return ``(y, h)``: ``y`` (M, N) the layer output and ``h = x̂ Aᵀ`` (M, T·r) for backward.

    Args:
        x: (M, K) input.  weight: (N, K).  bias: (N,) or None.
        lora_A: (T·r, K).  lora_B: (ΣN_t, r).  scaling: s.  dropout_p: p (0 = no dropout).
        seed: dropout seed, an integer or an int64 one-element tensor (ignored when p == 0).
        lora_slices: ``[off_0, n_0, …]`` (see module doc).
    """
    if dropout_p > 0.0:  # x̂ = m∘x / (1-p)
        if seed.__class__ is int and x.is_cpu:
            # one addcmul into a cached 0-dim zero applies mask and scale (a call less than two multiplies),
            # written over the mask, which is this call's own (fresh, or the thread's scratch)
            dtype = x.dtype
            zero = _zeros.get(dtype)
            if zero is None:
                zero = _zero(dtype)
            keep = cpu_keep_multiplier(seed, x.shape, dropout_p, dtype)
            h = F.linear(torch.addcmul(zero, keep, x, value=1.0 / (1.0 - dropout_p), out=keep), lora_A)
        else:
            # the boolean mask multiplies x in one pass (no conversion to x's dtype); 1/(1-p) goes on the small h
            h = F.linear(x * keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device), lora_A)
            h.mul_(1.0 / (1.0 - dropout_p))
    else:
        h = F.linear(x, lora_A)
    y = F.linear(x, weight, bias)
    if len(lora_slices) == 2 and lora_slices[0] == 0 and lora_slices[1] == y.shape[1]:  # one target, all outputs
        return y.addmm_(h, lora_B.t(), alpha=scaling), h
    r = lora_B.shape[1]
    layout = _layout(lora_slices, y.shape[1], y.shape[0], r)
    if layout[0] == "padded":
        y.addmm_(h, _padded_Bt(lora_B, lora_slices, y.shape[1])[0], alpha=scaling)
    elif layout[0] == "batched":
        _, T, n, step, off0 = layout
        h3 = h.view(h.shape[0], T, r).transpose(0, 1)  # h is fresh and contiguous
        _columns(y, T, n, step, off0).baddbmm_(h3, lora_B.reshape(T, n, r).transpose(1, 2), alpha=scaling)
    else:
        for a_rows, b_rows, cols in iter_slices(lora_slices, r):
            y[:, cols].addmm_(h[:, a_rows], lora_B[b_rows].t(), alpha=scaling)
    return y, h


def lora_linear_backward_ref(
    grad_y: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    h: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: Seed,
    lora_slices: Sequence[int],
    needs: Sequence[bool],
):
    """Gradients ``(dx, dW, db, dA, dB)``; an entry is ``None`` where ``needs`` (same order) is False.

    Args:
        grad_y: (M, N) upstream gradient ``g``.  x: (M, K) the saved input, or None when neither dA nor dW
        is needed.  h: (M, T·r) saved ``x̂ Aᵀ``, or None when dB is not needed.
        Other arguments as in :func:`lora_linear_forward_ref`; the mask is regenerated from ``seed``.
    """
    need_dx, need_dw, need_db, need_da, need_dlb = needs
    g = grad_y
    N = g.shape[1]
    need_u = need_dx or need_da
    u = dB = None  # u = g B per target: (M, T·r)
    if len(lora_slices) == 2 and lora_slices[0] == 0 and lora_slices[1] == N:  # one target over all outputs
        if need_u:
            u = torch.mm(g, lora_B)
        if need_dlb:
            # beta=0: the first argument only gives the output's shape; its values are ignored.
            dB = torch.addmm(lora_B, g.t(), h, beta=0, alpha=scaling)
    elif need_u or need_dlb:
        u, dB = _sliced_u_and_dB(g, lora_B, h, scaling, lora_slices, lora_B.shape[1], need_u, need_dlb)
    dx = dW = db = dA = None
    if need_u:
        c = scaling
        keep = None
        if dropout_p > 0.0:
            if seed.__class__ is int and g.is_cpu:
                size = x.shape if x is not None else (g.shape[0], weight.shape[1])
                keep = cpu_keep_multiplier(seed, size, dropout_p, g.dtype)
            else:  # a boolean mask: multiplied in directly (one pass each, no conversion to g's dtype)
                keep = keep_mask(seed, g.shape[0], weight.shape[1], dropout_p, g.device)
            c = scaling / (1.0 - dropout_p)
        if need_dx:
            dx = torch.mm(u, lora_A)
            if keep is not None:
                dx.mul_(keep)
            dx.addmm_(g, weight, beta=c)  # c · m∘(u A) + g W
        if need_da:  # after dx: a float multiplier becomes m∘x in place, a boolean one makes a new tensor
            mx = x if keep is None else (x * keep if keep.dtype == torch.bool else keep.mul_(x))
            dA = torch.addmm(lora_A, u.t(), mx, beta=0, alpha=c)
    if need_dw:
        dW = torch.mm(g.t(), x)
    if need_db:
        db = g.sum(0)
    return dx, dW, db, dA, dB


def _sliced_u_and_dB(g, lora_B, h, scaling, lora_slices, r, need_u, need_dlb):
    """``(u, dB)`` of several targets, or of one on part of the outputs (None where not needed)."""
    M, N = g.shape
    layout = _layout(lora_slices, N, M, r)
    u = dB = None
    if layout[0] == "padded":
        padded, index = _padded_Bt(lora_B, lora_slices, N)
        if need_u:
            u = torch.mm(g, padded.t())
        if need_dlb:
            dB = torch.addmm(padded, h.t(), g, beta=0, alpha=scaling).take(index)
    elif layout[0] == "batched":
        _, T, n, step, off0 = layout
        g3 = _columns(g, T, n, step, off0)
        if need_u:
            u = torch.bmm(g3, lora_B.reshape(T, n, r)).transpose(0, 1).reshape(M, T * r)
        if need_dlb:
            h3 = h.reshape(M, T, r).transpose(0, 1)
            dB = torch.baddbmm(lora_B.reshape(T, n, r), g3.transpose(1, 2), h3, beta=0, alpha=scaling).view(-1, r)
    else:
        if need_u:
            u = torch.cat([g[:, cols] @ lora_B[b_rows] for _, b_rows, cols in iter_slices(lora_slices, r)], dim=1)
        if need_dlb:
            dB = torch.cat(
                [g[:, cols].t() @ h[:, a_rows] for a_rows, _, cols in iter_slices(lora_slices, r)], dim=0
            ).mul_(scaling)
    return u, dB
