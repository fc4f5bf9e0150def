"""``LoRAQKV``: the fused qkv projection with adapters on a subset of q, k, v (SAM-style ``_LoRA_qkv``)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..spec import AdapterSpec, normalize_splits
from .base import DEFAULT_ADAPTER, LoRABase


class LoRAQKV(LoRABase):
    """A drop-in for ``qkv = nn.Linear(dim, q_out + k_out + v_out)`` with per-projection adapters.

    For each target ``t`` of the active adapter: ``y[..., slice_t] += scaling · (dropout(x) A_tᵀ) B_tᵀ``, with
    ``A_t`` (r, K) and ``B_t`` (n_t, r). Untargeted projections are the plain base. One dropout mask on
    ``x`` is shared by all targets, and one GEMM computes every down projection.

    Args: as :class:`LoRALinear`, plus ``targets`` (non-empty subset of ``"qkv"``, a string or a sequence; each
    named adapter has its own) and ``splits`` (``(q_out, k_out, v_out)`` summing to ``out_features``, a property
    of the base; default equal thirds, GQA otherwise).

    Storage: ``lora_A`` (T·r, K) and ``lora_B`` (Σ n_t, r) stack the targets in q, k, v order;
    :meth:`lora_A_for` / :meth:`lora_B_for` return views into them (writes reach the module).
    A named adapter may also be a plain one over all outputs (``targets`` is then None), so one fused module can
    serve a task adapting q and v and another adapting the whole projection.
    """

    kind = "LoRAQKV"
    accepts = ("LoRAQKV", "LoRALinear")  # per-projection adapters, and plain ones over all of q, k, v

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
        lora_fa: bool = False,
        adapter_dtype=None,
        adapter_name: str = DEFAULT_ADAPTER,
        device=None,
        dtype=None,
    ) -> None:
        splits_t = normalize_splits(splits, out_features)
        spec = AdapterSpec(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, targets, splits_t,
                           lora_fa=lora_fa, adapter_dtype=adapter_dtype)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.freeze_base()
        self.splits: Tuple[int, int, int] = splits_t
        self._init_adapters()
        self.active_adapter = adapter_name
        self.add_adapter_spec(adapter_name, spec)

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
        lora_fa: bool = False,
        adapter_dtype=None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> "LoRAQKV":
        """Wrap a fused qkv ``nn.Linear``, sharing and freezing its weight and bias."""
        if not isinstance(qkv_linear, nn.Linear):
            raise TypeError(f"LoRAQKV.from_linear expects an nn.Linear, got {type(qkv_linear).__name__}")
        splits_t = normalize_splits(splits, qkv_linear.out_features)
        spec = AdapterSpec(qkv_linear.in_features, qkv_linear.out_features, r, lora_alpha, lora_dropout, use_rslora,
                           targets, splits_t, lora_fa=lora_fa, adapter_dtype=adapter_dtype)
        obj = cls.from_linear_spec(qkv_linear, spec, adapter_name)
        spec.warn_unusual(obj._describe())
        obj.freeze_base()
        return obj

    @classmethod
    def from_lora_module(cls, module: LoRABase, splits: Sequence[int]) -> "LoRAQKV":
        """A ``LoRAQKV`` taking over ``module``'s base (shared weight and bias), adapters (the same
        :class:`LoRAAdapter` objects, in a new dict), active adapter and train/eval mode, with ``splits``: how a
        ``LoRALinear`` becomes able to hold a per-projection adapter. ``module`` itself is not changed."""
        obj = cls._shell_from_linear(module.base_linear(unmerge=False))
        obj.splits = normalize_splits(splits, module.out_features)
        obj._init_adapters()
        obj.lora_adapters = nn.ModuleDict(module.lora_adapters.items())
        obj.active_adapter = module.active_adapter
        obj.merged_adapter = module.merged_adapter
        obj.adapters_disabled = module.adapters_disabled
        return obj

    def make_spec(self, *, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, lora_fa=False, adapter_dtype=None,
                  targets: Union[str, Sequence[str]] = "qkv") -> AdapterSpec:
        return AdapterSpec(self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora, targets,
                           self.splits, lora_fa=lora_fa, adapter_dtype=adapter_dtype)

    def check_spec(self, spec: AdapterSpec) -> None:
        super().check_spec(spec)
        if spec.targets is not None and spec.splits != self.splits:
            raise ValueError(f"{self._describe()} has splits {self.splits}; the adapter's are {spec.splits}")

    @property
    def targets(self) -> Optional[Tuple[str, ...]]:
        """The projections the active adapter adapts, in q, k, v order (None for a plain adapter over all
        outputs)."""
        return self.spec.targets

    def lora_A_for(self, t: str) -> torch.Tensor:
        """``A_t`` (r, in_features) of the active adapter: a view into ``lora_A``."""
        a_rows, _, _ = self._block(t)
        return self.lora_A[a_rows]

    def lora_B_for(self, t: str) -> torch.Tensor:
        """``B_t`` (n_t, r) of the active adapter: a view into ``lora_B``."""
        _, b_rows, _ = self._block(t)
        return self.lora_B[b_rows]

    def _block(self, t: str):
        try:
            return self.spec.block(t)
        except KeyError:
            raise KeyError(f"{self._describe()} has no adapter on {t!r}; its targets are "
                           f"{''.join(self.targets)!r}") from None
        except ValueError as exc:
            raise ValueError(f"{self._describe()}, adapter {self.active_adapter!r}: {exc}") from None

    def forward_split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)``: the output split into ``splits`` along the last dimension."""
        return tuple(self.forward(x).split(list(self.splits), dim=-1))

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.has_active_adapter():
            text += f", targets={''.join(self.targets) if self.targets else None!r}"
        return text + f", splits={self.splits}"
