"""``LoRAQKV``: the fused qkv projection with adapters on a subset of q, k, v (SAM-style ``_LoRA_qkv``)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..ops.lora_qkv import QKV_NAMES, normalize_splits, normalize_targets, qkv_lora_slices
from .base import LoRABase


class LoRAQKV(LoRABase):
    """A drop-in for ``qkv = nn.Linear(dim, q_out + k_out + v_out)`` with per-projection adapters.

    For each target ``t`` in ``targets``: ``y[..., slice_t] += scaling · (dropout(x) A_tᵀ) B_tᵀ``, with
    ``A_t`` (r, K) and ``B_t`` (n_t, r). Untargeted projections are the plain base. One dropout mask on
    ``x`` is shared by all targets, and one GEMM computes every down projection.

    Args: as :class:`LoRALinear`, plus ``targets`` (non-empty subset of ``"qkv"``, a string or a sequence)
    and ``splits`` (``(q_out, k_out, v_out)`` summing to ``out_features``; default equal thirds, GQA otherwise).

    Storage: ``lora_A`` (T·r, K) and ``lora_B`` (Σ n_t, r) stack the targets in q, k, v order;
    :meth:`lora_A_for` / :meth:`lora_B_for` return views into them (writes reach the module).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        targets: Union[str, Sequence[str]] = "qkv",
        splits: Optional[Sequence[int]] = None,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        targets_t = normalize_targets(targets)
        splits_t = normalize_splits(splits, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_qkv(targets_t, splits_t, r, lora_alpha, lora_dropout, use_rslora)

    def _setup_qkv(self, targets, splits, r, lora_alpha, lora_dropout, use_rslora) -> None:
        self.targets: Tuple[str, ...] = targets
        self.splits: Tuple[int, int, int] = splits
        self._slices = qkv_lora_slices(splits, targets)
        self._setup_lora(r, lora_alpha, lora_dropout, use_rslora, len(targets), sum(self._slices[1::2]))

    @classmethod
    def from_linear(
        cls,
        qkv_linear: nn.Linear,
        *,
        targets: Union[str, Sequence[str]] = "qkv",
        splits: Optional[Sequence[int]] = None,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> "LoRAQKV":
        """Wrap a fused qkv ``nn.Linear``, sharing and freezing its weight and bias."""
        targets_t = normalize_targets(targets)
        splits_t = normalize_splits(splits, qkv_linear.out_features)
        obj = cls._shell_from_linear(qkv_linear)
        obj._setup_qkv(targets_t, splits_t, r, lora_alpha, lora_dropout, use_rslora)
        return obj

    def lora_slices(self) -> List[int]:
        return list(self._slices)

    def _target_index(self, t: str) -> int:
        if t not in QKV_NAMES:
            raise ValueError(f"unknown projection {t!r}; expected one of 'q', 'k', 'v'")
        if t not in self.targets:
            raise KeyError(f"{self._describe()} has no adapter on {t!r}; its targets are {''.join(self.targets)!r}")
        return self.targets.index(t)

    def lora_A_for(self, t: str) -> torch.Tensor:
        """``A_t`` (r, in_features): a view into ``lora_A``."""
        i = self._target_index(t)
        return self.lora_A[i * self.r : (i + 1) * self.r]

    def lora_B_for(self, t: str) -> torch.Tensor:
        """``B_t`` (n_t, r): a view into ``lora_B``."""
        i = self._target_index(t)
        start = sum(self._slices[1 : 2 * i : 2])
        return self.lora_B[start : start + self._slices[2 * i + 1]]

    def forward_split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)``: the output split into ``splits`` along the last dimension."""
        return tuple(self.forward(x).split(list(self.splits), dim=-1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", targets={''.join(self.targets)!r}, splits={self.splits}"
