"""Shared machinery of :class:`LoRALinear` and :class:`LoRAQKV`: adapters, init, merge/unmerge, to_linear."""

from __future__ import annotations

import math
import numbers
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.lora_linear import lora_apply


def check_lora_hparams(r, lora_alpha, lora_dropout) -> None:
    """Raise ``ValueError`` for ``r < 1``, a non-numeric alpha or a dropout outside [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise ValueError(f"lora_alpha must be a number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


class LoRABase(nn.Linear):
    """An ``nn.Linear`` with a frozen base and packed low-rank adapters (see subclasses).

    ``lora_A`` is ``(T·r, in_features)`` and ``lora_B`` ``(Σ n_t, r)`` for ``T`` targets, each target ``t``
    adding ``scaling · (dropout(x) A_tᵀ) B_tᵀ`` to its output columns (:meth:`lora_slices`).
    """

    # -- construction --------------------------------------------------------------------------------------
    def _setup_lora(self, r, lora_alpha, lora_dropout, use_rslora, n_targets: int, n_lora_out: int) -> None:
        check_lora_hparams(r, lora_alpha, lora_dropout)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(n_targets * self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(n_lora_out, self.r, **factory))
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def _shell_from_linear(cls, linear: nn.Linear):
        """An instance sharing ``linear``'s weight and bias Parameters, without running ``nn.Linear.__init__``
        (which would allocate and initialise a weight only to throw it away)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRABase):
            raise ValueError(f"{cls.__name__}.from_linear: the module is already a {type(linear).__name__}")
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.in_features, obj.out_features = linear.in_features, linear.out_features
        obj.weight = linear.weight
        obj.bias = linear.bias
        obj.train(linear.training)
        return obj

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: each ``A_t`` kaiming-uniform (a=√5), every ``B`` zero (the layer starts as the base)."""
        with torch.no_grad():
            for block in self.lora_A.split(self.r, dim=0):
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            self.lora_B.zero_()

    # -- math ------------------------------------------------------------------------------------------------
    def lora_slices(self) -> List[int]:
        """Flat ``[off_0, n_0, …]``: the output columns each target's adapter adds to."""
        return [0, self.out_features]

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B Aᵀ`` placed in the targeted rows, as a float32 ``(out_features, in_features)`` tensor."""
        A, B = self.lora_A.detach().float(), self.lora_B.detach().float()
        delta = torch.zeros(self.out_features, self.in_features, device=A.device, dtype=torch.float32)
        b_off = 0
        slices = self.lora_slices()
        for t in range(len(slices) // 2):
            off, n = slices[2 * t], slices[2 * t + 1]
            delta[off : off + n] = B[b_off : b_off + n] @ A[t * self.r : (t + 1) * self.r]
            b_off += n
        return delta.mul_(self.scaling)

    def _describe(self) -> str:
        return f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_apply(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_dropout,
            self.training, self.lora_slices(), self._describe,
        )

    # -- merge -----------------------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold ``scaling · B A`` into ``weight`` (float32 arithmetic, cast back); forward is then the plain linear."""
        if self.merged:
            raise RuntimeError(f"{self._describe()} is already merged")
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (float32 arithmetic)."""
        if not self.merged:
            raise RuntimeError(f"{self._describe()} is not merged; nothing to unmerge")
        with torch.no_grad():
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A new, independent ``nn.Linear`` holding the merged weight; this module is left unchanged."""
        with torch.no_grad():
            weight = self.weight.float() if self.merged else self.weight.float() + self.delta_weight()
            linear = nn.Linear(
                self.in_features, self.out_features, bias=self.bias is not None,
                device=self.weight.device, dtype=self.weight.dtype,
            )
            linear.weight.copy_(weight.to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"
        )
        if self.use_rslora:
            text += ", use_rslora=True"
        if self.merged:
            text += ", merged=True"
        return text
