"""``AdapterSpec``: the one description of an adapter's layout (shapes, output slices, scaling, JSON form).

An adapter over a linear ``y = x Wᵀ + b`` (``W``: ``(N, K)``) adds, for each of its ``T`` targets ``t``,

    y[..., off_t : off_t + n_t] += s · (dropout(x) A_tᵀ) B_tᵀ,    s = lora_alpha / r   (lora_alpha / √r with rsLoRA)

with ``A_t`` ``(r, K)`` and ``B_t`` ``(n_t, r)``. The targets are stored packed: ``lora_A`` ``(T·r, K)`` stacks the
``A_t`` and ``lora_B`` ``(Σ n_t, r)`` stacks the ``B_t``, in target order. A plain adapter (``LoRALinear``) is
``T = 1`` over all ``N`` outputs; a fused-qkv adapter (``LoRAQKV``) has one target per adapted projection
(``q``, ``k``, ``v`` in that order) over that projection's output columns (``splits = (q_out, k_out, v_out)``).
The flat ``lora_slices = [off_0, n_0, off_1, n_1, …]`` is what the op and every backend receive.

Modules, checkpoints (both formats), ``lora_state_dict`` and the functional ``lora_qkv`` derive the layout from
here and nowhere else.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

QKV_NAMES = ("q", "k", "v")
KINDS = ("LoRALinear", "LoRAQKV")


# -- argument normalisation -----------------------------------------------------------------------------------------
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


def qkv_lora_slices(splits: Sequence[int], targets: Sequence[str]) -> List[int]:
    """Flat ``[off_0, n_0, off_1, n_1, …]`` output columns of each target, in ``targets`` order."""
    offsets = (0, splits[0], splits[0] + splits[1])
    out: List[int] = []
    for t in targets:
        i = QKV_NAMES.index(t)
        out += [offsets[i], int(splits[i])]
    return out


def check_lora_hparams(r, lora_alpha, lora_dropout) -> None:
    """Raise ``ValueError`` for ``r < 1``, an alpha that is not a finite number, or a dropout outside [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise ValueError(f"lora_alpha must be a number, got {lora_alpha!r}")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be finite, got {lora_alpha!r} (the adapter output would be NaN/inf)")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """``torch.float32`` → ``"float32"`` (None stays None)."""
    return None if dtype is None else str(dtype).replace("torch.", "")


def parse_dtype(value) -> Optional[torch.dtype]:
    """A floating ``torch.dtype`` from a dtype or its name (``"float32"``, ``"torch.bfloat16"``); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = getattr(torch, value.replace("torch.", ""), None)
    else:
        dtype = None
    if value is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"adapter_dtype must be a floating torch.dtype (e.g. torch.float32), got {value!r}")
    return dtype


# -- the spec ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's layout and hyper-parameters (immutable; validated on construction).

    Fields: ``in_features`` (K), ``out_features`` (N) of the base linear; ``r``; ``lora_alpha``; ``lora_dropout``
    (p of the LoRA branch); ``use_rslora``; ``targets`` (None: one adapter over all outputs, a ``LoRALinear``;
    else the adapted projections of a fused qkv, a ``LoRAQKV``, with ``splits``); ``lora_fa`` (``A`` frozen at
    its initialisation, only ``B`` trains); ``adapter_dtype`` (the parameters' dtype; None: the base's).

    Derived (plain attributes): ``kind``, ``scaling``, ``slices`` (the flat ``lora_slices`` of the op),
    ``a_shape`` ``(T·r, K)``, ``b_shape`` ``(Σ n_t, r)``.
    """

    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    targets: Optional[Tuple[str, ...]] = None
    splits: Optional[Tuple[int, int, int]] = None
    lora_fa: bool = False
    adapter_dtype: Optional[torch.dtype] = None
    # derived, set in __post_init__ (not part of equality)
    kind: str = field(init=False, compare=False, repr=False)
    scaling: float = field(init=False, compare=False, repr=False)
    slices: Tuple[int, ...] = field(init=False, compare=False, repr=False)
    a_shape: Tuple[int, int] = field(init=False, compare=False, repr=False)
    b_shape: Tuple[int, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_lora_hparams(self.r, self.lora_alpha, self.lora_dropout)
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        set_ = object.__setattr__  # frozen: derived fields are written once, here
        set_(self, "r", int(self.r))
        set_(self, "lora_dropout", float(self.lora_dropout))
        set_(self, "use_rslora", bool(self.use_rslora))
        set_(self, "lora_fa", bool(self.lora_fa))
        set_(self, "adapter_dtype", parse_dtype(self.adapter_dtype))
        if self.targets is None:
            if self.splits is not None:
                raise ValueError("splits describe a fused qkv: they need targets")
            slices = (0, int(self.out_features))
            set_(self, "kind", "LoRALinear")
        else:
            set_(self, "targets", normalize_targets(self.targets))
            set_(self, "splits", normalize_splits(self.splits, self.out_features))
            slices = tuple(qkv_lora_slices(self.splits, self.targets))
            set_(self, "kind", "LoRAQKV")
        set_(self, "slices", slices)
        set_(self, "scaling", self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r))
        set_(self, "a_shape", (self.n_targets * self.r, int(self.in_features)))
        set_(self, "b_shape", (sum(slices[1::2]), self.r))

    # -- layout ------------------------------------------------------------------------------------------------
    @property
    def n_targets(self) -> int:
        return 1 if self.targets is None else len(self.targets)

    @property
    def target_names(self) -> Tuple[str, ...]:
        """``targets`` of a qkv adapter; ``("all",)`` for a plain one."""
        return self.targets if self.targets is not None else ("all",)

    def blocks(self) -> Iterator[Tuple[str, slice, slice, slice]]:
        """``(target, rows of lora_A, rows of lora_B, output columns)`` of every target, in storage order."""
        b_off = 0
        for i, name in enumerate(self.target_names):
            off, n = self.slices[2 * i], self.slices[2 * i + 1]
            yield name, slice(i * self.r, (i + 1) * self.r), slice(b_off, b_off + n), slice(off, off + n)
            b_off += n

    def block(self, target: str) -> Tuple[slice, slice, slice]:
        """``(rows of lora_A, rows of lora_B, output columns)`` of one qkv target."""
        if self.targets is None:
            raise ValueError("a plain (LoRALinear) adapter has no per-projection targets")
        if target not in QKV_NAMES:
            raise ValueError(f"unknown projection {target!r}; expected one of 'q', 'k', 'v'")
        for name, a_rows, b_rows, cols in self.blocks():
            if name == target:
                return a_rows, b_rows, cols
        raise KeyError(f"the adapter has no target {target!r}; its targets are {''.join(self.targets)!r}")

    def delta_weight(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """``scaling · B_t A_t`` placed in each target's output rows: a float32 ``(N, K)`` tensor."""
        A, B = lora_A.detach().float(), lora_B.detach().float()
        delta = torch.zeros(self.out_features, self.in_features, device=A.device, dtype=torch.float32)
        for _, a_rows, b_rows, cols in self.blocks():
            delta[cols] = B[b_rows] @ A[a_rows]
        return delta.mul_(self.scaling)

    # -- PEFT's form: one rank-T·r adapter over the whole linear ------------------------------------------------
    def peft_rank_alpha(self) -> Tuple[int, float]:
        """``(r, lora_alpha)`` of the equivalent PEFT adapter (rank ``T·r``, alpha scaled to keep the scaling)."""
        t = self.n_targets
        alpha = self.lora_alpha if t == 1 else self.lora_alpha * (math.sqrt(t) if self.use_rslora else t)
        return t * self.r, alpha

    def to_peft_B(self, lora_B: torch.Tensor) -> torch.Tensor:
        """PEFT's ``B`` ``(N, T·r)``: each ``B_t`` on its output rows and its rank block, zeros elsewhere."""
        if self.targets is None:
            return lora_B
        out = lora_B.new_zeros(self.out_features, self.n_targets * self.r)
        for _, a_rows, b_rows, cols in self.blocks():
            out[cols, a_rows] = lora_B[b_rows]
        return out

    def from_peft_B(self, B: torch.Tensor) -> Optional[torch.Tensor]:
        """The packed ``lora_B`` from PEFT's block form, or None when ``B`` does not have this layout (wrong shape
        or non-zero entries outside the target blocks)."""
        if tuple(B.shape) != (self.out_features, self.n_targets * self.r):
            return None
        if self.targets is None:
            return B
        mask = torch.zeros_like(B, dtype=torch.bool)
        parts = []
        for _, a_rows, _, cols in self.blocks():
            mask[cols, a_rows] = True
            parts.append(B[cols, a_rows])
        if bool((B[~mask] != 0).any()):
            return None
        return torch.cat(parts, 0)

    # -- comparison and JSON -------------------------------------------------------------------------------------
    def differences(self, other: "AdapterSpec", fields=("kind", "r", "lora_alpha", "use_rslora", "targets",
                                                        "splits", "lora_fa", "in_features", "out_features"),
                    labels: Tuple[str, str] = ("", "")) -> List[str]:
        """``["r: <label_0> 8, <label_1> 4", …]`` for every field of ``fields`` where ``self`` and ``other``
        differ."""
        out = []
        for name in fields:
            a, b = getattr(self, name), getattr(other, name)
            if name == "targets":
                a, b = ("".join(a) if a else a), ("".join(b) if b else b)
            if a != b:
                out.append(f"{name}: {labels[0]} {a!r}, {labels[1]} {b!r}".replace(":  ", ": ").replace(",  ", ", "))
        return out

    def with_(self, **changes) -> "AdapterSpec":
        return replace(self, **changes)

    def to_json(self) -> dict:
        """A JSON-serialisable dict (the form stored in checkpoints)."""
        alpha = self.lora_alpha
        alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        return {
            "kind": self.kind,
            "r": self.r,
            "lora_alpha": alpha,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "targets": "".join(self.targets) if self.targets is not None else None,
            "splits": list(self.splits) if self.splits is not None else None,
            "in_features": int(self.in_features),
            "out_features": int(self.out_features),
            "lora_fa": self.lora_fa,
            "adapter_dtype": dtype_name(self.adapter_dtype),
        }

    @classmethod
    def from_json(cls, entry, where: str = "adapter config") -> "AdapterSpec":
        """Parse :meth:`to_json`'s dict (older checkpoints without ``lora_fa`` / ``adapter_dtype`` included);
        ``ValueError`` naming the bad field otherwise."""
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: malformed adapter entry {entry!r}")
        required = {"kind": str, "r": int, "lora_alpha": (int, float), "lora_dropout": (int, float),
                    "use_rslora": bool, "in_features": int, "out_features": int}
        optional = {"lora_fa": bool, "adapter_dtype": (str, type(None))}
        for name, types in list(required.items()) + list(optional.items()):
            if name not in entry and name in optional:
                continue
            value = entry.get(name)
            if not isinstance(value, types) or (types is not bool and isinstance(value, bool)):
                raise ValueError(f"{where}: bad or missing {name!r}: {value!r}")
        if entry["kind"] not in KINDS:
            raise ValueError(f"{where}: unknown kind {entry['kind']!r}")
        targets, splits = entry.get("targets"), entry.get("splits")
        if entry["kind"] == "LoRAQKV":
            if not (isinstance(targets, str) and targets):
                raise ValueError(f"{where}: bad targets {targets!r}")
            if not (isinstance(splits, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in splits)):
                raise ValueError(f"{where}: bad splits {splits!r}")
        else:
            targets = splits = None
        try:
            return cls(
                in_features=entry["in_features"], out_features=entry["out_features"], r=entry["r"],
                lora_alpha=entry["lora_alpha"], lora_dropout=entry["lora_dropout"], use_rslora=entry["use_rslora"],
                targets=targets, splits=splits, lora_fa=entry.get("lora_fa", False),
                adapter_dtype=entry.get("adapter_dtype"),
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    # -- warnings for values that are legal but almost certainly unintended ----------------------------------------
    def warn_unusual(self, where: str) -> None:
        """Warn for ``lora_alpha == 0`` (the adapter contributes nothing and nothing trains) and for ``r`` above
        ``min(in_features, n_t)`` (the extra rank cannot add expressiveness)."""
        if self.lora_alpha == 0:
            warnings.warn(f"{where}: lora_alpha=0 makes the scaling 0: the adapter adds nothing and its gradients "
                          "are zero", UserWarning, stacklevel=3)
        limit = min([self.in_features] + list(self.slices[1::2]))
        if self.r > limit:
            warnings.warn(f"{where}: r={self.r} exceeds min(in_features, out_features)={limit}; a rank above that "
                          "adds parameters but no expressiveness", UserWarning, stacklevel=3)
