"""``LoRALinear``: a drop-in ``nn.Linear`` with a frozen base and one low-rank adapter."""

from __future__ import annotations

import torch.nn as nn

from .base import LoRABase


class LoRALinear(LoRABase):
    """``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``, a subclass of ``nn.Linear``.

    Args:
        in_features (K), out_features (N), bias: as ``nn.Linear``.
        r: adapter rank (>= 1).  lora_alpha: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout rate p of the LoRA branch, in [0, 1); active in training mode only.
        device, dtype: as ``nn.Linear``.

    Attributes: ``weight`` (N, K) and ``bias`` (N,) frozen; ``lora_A`` (r, K); ``lora_B`` (N, r); ``r``,
    ``lora_alpha``, ``scaling``, ``lora_dropout``, ``use_rslora``, ``merged``.
    Input ``(..., K)`` → output ``(..., N)``. Backward stores ``x`` and the (M, r) ``dropout(x) Aᵀ`` only.
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
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_lora(r, lora_alpha, lora_dropout, use_rslora, n_targets=1, n_lora_out=out_features)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False
    ) -> "LoRALinear":
        """Wrap ``linear``, sharing (not copying) and freezing its weight and bias; adapters on its device/dtype."""
        obj = cls._shell_from_linear(linear)
        obj._setup_lora(r, lora_alpha, lora_dropout, use_rslora, n_targets=1, n_lora_out=linear.out_features)
        return obj
