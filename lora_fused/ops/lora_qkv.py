"""The fused-qkv form of the LoRA op: per-projection adapters on the targeted slices of one qkv linear.

    y = x Wᵀ + b;   y[:, slice_t] += s · (dropout(x) A_tᵀ) B_tᵀ   for each targeted t in {q, k, v}

One dropout mask on ``x`` is shared by all targets, and one GEMM computes all down projections
(``h = dropout(x) A_catᵀ``). Untargeted slices are the plain base: no zero-padded adapter exists for them.
It runs on the same registered op as :func:`~lora_fused.ops.lora_linear` (``lora_fused::lora_linear`` with
``lora_slices`` naming the targeted column ranges).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from .._errors import LoRAShapeError
from ..spec import QKV_NAMES, normalize_splits, normalize_targets, qkv_lora_slices  # noqa: F401  (re-exported)
from .lora_linear import lora_apply


def lora_qkv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    targets: Union[str, Sequence[str]] = "qkv",
    splits: Optional[Sequence[int]] = None,
) -> Tensor:
    """qkv projection with adapters on the targeted projections.

    Args:
        x: ``(..., K)``.  weight: ``(N, K)`` with ``N = q_out + k_out + v_out``.  bias: ``(N,)`` or None.
        lora_A: ``(T·r, K)``: the targets' A matrices stacked in q, k, v order (T = number of targets).
        lora_B: ``(Σ n_t, r)``: the targets' B matrices stacked in the same order.
        scaling, dropout_p, training: as in :func:`~lora_fused.ops.lora_linear`.
        targets: non-empty subset of ``"qkv"``.  splits: ``(q_out, k_out, v_out)``, default equal thirds.
    Returns:
        ``(..., N)``.
    """
    targets = normalize_targets(targets)
    splits = normalize_splits(splits, weight.shape[0])
    slices = qkv_lora_slices(splits, targets)
    n_lora = sum(slices[1::2])
    if lora_B.dim() != 2 or lora_B.shape[0] != n_lora or lora_A.shape[0] != len(targets) * lora_B.shape[1]:
        raise LoRAShapeError(
            f"lora_qkv: for targets {''.join(targets)!r} and splits {splits}, expected lora_A "
            f"({len(targets)}·r, K) and lora_B ({n_lora}, r); got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    return lora_apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, slices, "lora_qkv")
