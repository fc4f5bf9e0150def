"""``LoRALinear``: a drop-in ``nn.Linear`` with a frozen base and low-rank adapters (one active)."""

from __future__ import annotations

import torch.nn as nn

from ..spec import AdapterSpec
from .base import DEFAULT_ADAPTER, LoRABase


class LoRALinear(LoRABase):
    """``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``, a subclass of ``nn.Linear``.

    Args:
        in_features (K), out_features (N), bias: as ``nn.Linear``.
        r: adapter rank (>= 1).  lora_alpha: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``);
            a finite number.
        lora_dropout: dropout rate p of the LoRA branch, in [0, 1); active in training mode only.
        lora_fa: LoRA-FA: ``A`` stays frozen at its initialisation and only ``B`` trains (then the op does not
            keep ``x`` for backward).
        adapter_dtype: dtype of ``lora_A``/``lora_B`` (e.g. ``torch.float32`` on a bf16 base; the op computes in
            the input's dtype and gradients reach the parameters in theirs). None: the base's dtype.
        adapter_name: name of this first adapter (more with :meth:`add_adapter`).
        device, dtype: as ``nn.Linear``.

    Attributes: ``weight`` (N, K) and ``bias`` (N,) frozen; of the active adapter: ``lora_A`` (r, K), ``lora_B``
    (N, r), ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout``, ``use_rslora``, ``lora_fa``; ``merged``,
    ``active_adapter``, ``adapter_names``. Input ``(..., K)`` → output ``(..., N)``.
    Backward keeps ``x`` (only when ``A`` trains) and the (M, r) ``dropout(x) Aᵀ``.
    """

    kind = "LoRALinear"
    accepts = ("LoRALinear",)  # adapter layouts it holds (a LoRAQKV holds both)

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
        lora_fa: bool = False,
        adapter_dtype=None,
        adapter_name: str = DEFAULT_ADAPTER,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.freeze_base()
        self._init_adapters()
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         lora_fa=lora_fa, adapter_dtype=adapter_dtype)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
        use_rslora: bool = False, lora_fa: bool = False, adapter_dtype=None, adapter_name: str = DEFAULT_ADAPTER,
    ) -> "LoRALinear":
        """Wrap ``linear``, sharing (not copying) and freezing its weight and bias; adapters on its device/dtype
        (or ``adapter_dtype``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        spec = AdapterSpec(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora,
                           lora_fa=lora_fa, adapter_dtype=adapter_dtype)
        obj = cls.from_linear_spec(linear, spec, adapter_name)
        spec.warn_unusual(obj._describe())
        obj.freeze_base()
        return obj

