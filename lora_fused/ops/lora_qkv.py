"""The fused-qkv form of the LoRA op: per-projection adapters on the targeted slices of one qkv linear.

    y = x Wᵀ + b;   y[:, slice_t] += s · (dropout(x) A_tᵀ) B_tᵀ   for each targeted t in {q, k, v}

One dropout mask on ``x`` is shared by all targets, and one GEMM computes all down projections
(``h = dropout(x) A_catᵀ``). Untargeted slices are the plain base: no zero-padded adapter exists for them.
It runs on the same registered op as :func:`~lora_fused.ops.lora_linear` (``lora_fused::lora_linear`` with
``lora_slices`` naming the targeted column ranges).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from .._errors import LoRAShapeError
from .lora_linear import lora_apply

QKV_NAMES = ("q", "k", "v")


def normalize_targets(targets: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``"qv"`` / ``["v", "q"]`` → ``("q", "v")`` (canonical q, k, v order). Raises ``ValueError`` for an
    empty, unknown or repeated target."""
    if isinstance(targets, str):
        items = list(targets)
    else:
        try:
            items = list(targets)
        except TypeError:
            raise ValueError(f"targets must be a string like 'qv' or a sequence of 'q'/'k'/'v', got {targets!r}")
    if not items:
        raise ValueError("targets must name at least one of 'q', 'k', 'v'; got an empty value")
    bad = [t for t in items if t not in QKV_NAMES]
    if bad:
        raise ValueError(f"unknown qkv target(s) {bad!r}; targets must be a non-empty subset of 'q', 'k', 'v'")
    if len(set(items)) != len(items):
        raise ValueError(f"targets {targets!r} repeat a projection")
    return tuple(t for t in QKV_NAMES if t in items)


def normalize_splits(splits: Optional[Sequence[int]], out_features: int) -> Tuple[int, int, int]:
    """``(q_out, k_out, v_out)``; default three equal parts. Raises ``ValueError`` when they do not sum
    to ``out_features`` or are not three positive integers."""
    if splits is None:
        if out_features % 3:
            raise ValueError(
                f"out_features={out_features} is not divisible by 3; pass splits=(q_out, k_out, v_out)"
            )
        return (out_features // 3,) * 3
    splits = tuple(int(s) for s in splits)
    if len(splits) != 3 or any(s <= 0 for s in splits):
        raise ValueError(f"splits must be three positive sizes (q_out, k_out, v_out), got {splits}")
    if sum(splits) != out_features:
        raise ValueError(f"splits {splits} sum to {sum(splits)}, not out_features={out_features}")
    return splits


def qkv_lora_slices(splits: Sequence[int], targets: Sequence[str]) -> list:
    """Flat ``[off_0, n_0, off_1, n_1, …]`` output columns of each target, in ``targets`` order."""
    offsets = {"q": 0, "k": splits[0], "v": splits[0] + splits[1]}
    sizes = dict(zip(QKV_NAMES, splits))
    out = []
    for t in targets:
        out += [offsets[t], sizes[t]]
    return out


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
