"""The methods the suite compares, each built around one shared frozen base layer.

* ``floor``: the frozen ``nn.Linear`` alone (forward; forward+backward with the gradient to ``x`` only).
  Any LoRA layer costs at least this.
* ``plain``: LoRA as people write it in plain PyTorch, ``base(x) + s * B(A(dropout(x)))`` with
  ``nn.Linear``/``nn.Dropout`` (for qkv: SAM's ``_LoRA_qkv`` pattern, adding the q and v updates into the
  fused qkv output).
* ``peft``: Hugging Face PEFT's LoRA layer (``get_peft_model`` + ``LoraConfig``), when ``peft`` imports. For
  q/v adapters PEFT cannot target slices of a fused qkv (peft PR #1705 was closed), so it runs on three
  separate q, k, v linears holding the same weights, with adapters on q and v.
* ``lora_fused``: ``LoRALinear.from_linear`` / ``LoRAQKV.from_linear(targets="qv")``, once per backend.
* ``lora_fused_fa``: the same in LoRA-FA mode (``lora_fa=True``: ``lora_A`` frozen at its initialisation, ``B``
  trains), once per backend, in training mode only (the eval forward is the same as ``lora_fused``).
* ``lora_fused_2adapters``: ``lora_fused`` holding a second, inactive adapter of rank ``r/2`` (named adapters:
  the kernels compute the active one only, so time and saved bytes should equal ``lora_fused``'s), once per
  backend.

All adapters of one comparison hold the same random values (``B`` is not zero, so the numerical check is
meaningful and nothing is timed on zeros).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn


@dataclass
class Method:
    method: str  # floor | plain | peft | lora_fused | lora_fused_fa | lora_fused_2adapters
    backend: str  # "" except for lora_fused
    p: float
    module: nn.Module
    backend_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""
    trainable: List[torch.Tensor] = field(default_factory=list)

    @property
    def label(self) -> str:
        name = f"{self.method}[{self.backend}]" if self.backend else self.method
        return name if self.method == "floor" else f"{name} p={self.p:g}"

    def __post_init__(self):
        self.trainable = [t for t in self.module.parameters() if t.requires_grad]

    def frozen_tensors(self) -> List[torch.Tensor]:
        return list(self.module.parameters()) + list(self.module.buffers())


# ----------------------------------------------------------------------------------------------- modules
class PlainLoRA(nn.Module):
    """``base(x) + s * B(A(dropout(x)))``: the LoRA layer most people write by hand."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, p: float):
        super().__init__()
        self.base = base
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        self.dropout = nn.Dropout(p)
        self.scaling = lora_alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


class PlainLoRAQKV(nn.Module):
    """SAM's ``_LoRA_qkv`` pattern (adapters on q and v of a fused qkv), with scaling and one shared dropout."""

    def __init__(self, qkv: nn.Linear, splits: Sequence[int], r: int, lora_alpha: float, p: float):
        super().__init__()
        self.qkv = qkv
        self.splits = tuple(splits)
        kw = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        self.linear_a_q = nn.Linear(qkv.in_features, r, bias=False, **kw)
        self.linear_b_q = nn.Linear(r, self.splits[0], bias=False, **kw)
        self.linear_a_v = nn.Linear(qkv.in_features, r, bias=False, **kw)
        self.linear_b_v = nn.Linear(r, self.splits[2], bias=False, **kw)
        self.dropout = nn.Dropout(p)
        self.scaling = lora_alpha / r

    def forward(self, x):
        qkv = self.qkv(x)
        xd = self.dropout(x)
        new_q = self.linear_b_q(self.linear_a_q(xd))
        new_v = self.linear_b_v(self.linear_a_v(xd))
        qkv[..., : self.splits[0]] += self.scaling * new_q
        qkv[..., -self.splits[2]:] += self.scaling * new_v
        return qkv


class SplitQKV(nn.Module):
    """Three separate frozen q, k, v linears holding the rows of a fused qkv weight; returns ``(q, k, v)``."""

    def __init__(self, qkv: nn.Linear, splits: Sequence[int]):
        super().__init__()
        kw = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        has_bias = qkv.bias is not None
        for name, rows in zip("qkv", _row_slices(splits)):
            lin = nn.Linear(qkv.in_features, rows.stop - rows.start, bias=has_bias, **kw)
            with torch.no_grad():
                lin.weight.copy_(qkv.weight[rows])
                if has_bias:
                    lin.bias.copy_(qkv.bias[rows])
            lin.requires_grad_(False)
            setattr(self, name, lin)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _row_slices(splits: Sequence[int]) -> List[slice]:
    out, off = [], 0
    for n in splits:
        out.append(slice(off, off + n))
        off += n
    return out


# ----------------------------------------------------------------------------------------------- builders
def _adapter_values(K: int, out_dims: Sequence[int], r: int, device, dtype, seed: int):
    """``[(A_t (r, K), B_t (n_t, r))]`` with nonzero B (uniform ±1/√r), the same for every method."""
    gen = torch.Generator().manual_seed(seed + 1)
    vals = []
    for n in out_dims:
        A = (torch.rand(r, K, generator=gen) * 2 - 1) / math.sqrt(K)
        B = (torch.rand(n, r, generator=gen) * 2 - 1) / math.sqrt(r)
        vals.append((A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)))
    return vals


def make_base(K: int, N: int, device, dtype, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    base = nn.Linear(K, N, bias=True, device=device, dtype=dtype)
    base.requires_grad_(False)
    return base


def _peft_lora(model: nn.Module, targets: List[str], r: int, lora_alpha: float, p: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=p, target_modules=targets, bias="none")
    return get_peft_model(model, cfg).base_model.model


def _fused_ctx(backend: str):
    import lora_fused

    return lambda: lora_fused.use_backend(backend)


FUSED_NOTES = {
    "lora_fused_fa": "LoRA-FA (lora_fa=True): A frozen",
    "lora_fused_2adapters": "a second, inactive adapter of rank r/2 held",
}


def fused_kinds(lora_fa: bool, two_adapters: bool) -> List[str]:
    """The lora_fused methods built per backend: ``lora_fused``, then ``lora_fused_fa`` (with ``lora_fa``) and
    ``lora_fused_2adapters`` (with ``two_adapters``)."""
    return ["lora_fused"] + ["lora_fused_fa"] * bool(lora_fa) + ["lora_fused_2adapters"] * bool(two_adapters)


def _fused_methods(make: Callable[..., nn.Module], load: Callable[[nn.Module], None], backend: str, p: float,
                   kinds: Sequence[str], r: int, lora_alpha: float) -> List[Method]:
    """One :class:`Method` per kind of :func:`fused_kinds`: ``make(lora_fa=...)`` builds the module, ``load``
    copies the shared adapter values into it; ``lora_fused_2adapters`` then adds an inactive adapter ``"other"``
    of another rank, ``r/2`` (2 for r=1), whose parameters do not train."""
    out = []
    for kind in kinds:
        module = make(lora_fa=kind == "lora_fused_fa")
        load(module)
        if kind == "lora_fused_2adapters":
            extra = {"targets": "qv"} if module.spec.targets is not None else {}
            module.add_adapter("other", r=r // 2 if r > 1 else 2, lora_alpha=lora_alpha, lora_dropout=p, **extra)
        out.append(Method(kind, backend, p, module, _fused_ctx(backend), note=FUSED_NOTES.get(kind, "")))
    return out


def linear_methods(
    base: nn.Linear, r: int, lora_alpha: float, ps: Sequence[float], backends: Sequence[str], with_peft: bool,
    seed: int = 0, lora_fa: bool = True, two_adapters: bool = True,
) -> List[Method]:
    """floor, then for each p: plain, peft (if ``with_peft``), then per backend lora_fused, lora_fused_fa (if
    ``lora_fa``) and lora_fused_2adapters (if ``two_adapters``)."""
    import lora_fused

    dev, dt = base.weight.device, base.weight.dtype
    ((A0, B0),) = _adapter_values(base.in_features, [base.out_features], r, dev, dt, seed)
    methods = [Method("floor", "", 0.0, base)]
    for p in ps:
        plain = PlainLoRA(base, r, lora_alpha, p)
        with torch.no_grad():
            plain.lora_A.weight.copy_(A0)
            plain.lora_B.weight.copy_(B0)
        methods.append(Method("plain", "", p, plain))
        if with_peft:
            layer = _peft_lora(_Holder(base), ["proj"], r, lora_alpha, p).proj
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(A0)
                layer.lora_B["default"].weight.copy_(B0)
            methods.append(Method("peft", "", p, layer))
        def make(lora_fa, p=p):
            return lora_fused.LoRALinear.from_linear(base, r=r, lora_alpha=lora_alpha, lora_dropout=p, lora_fa=lora_fa)

        def load(fused):
            with torch.no_grad():
                fused.lora_A.copy_(A0)
                fused.lora_B.copy_(B0)

        for b in backends:
            methods += _fused_methods(make, load, b, p, fused_kinds(lora_fa, two_adapters), r, lora_alpha)
    return methods


def qkv_methods(
    base: nn.Linear, r: int, lora_alpha: float, ps: Sequence[float], backends: Sequence[str], with_peft: bool,
    seed: int = 0, lora_fa: bool = True, two_adapters: bool = True,
) -> List[Method]:
    """Adapters on q and v of a fused qkv: floor, then for each p: plain (SAM), peft (split q/k/v), then per backend
    lora_fused, lora_fused_fa (if ``lora_fa``) and lora_fused_2adapters (if ``two_adapters``)."""
    import lora_fused

    N = base.out_features
    if N % 3:
        raise ValueError(f"qkv needs out_features divisible by 3, got {N}")
    splits = (N // 3,) * 3
    dev, dt = base.weight.device, base.weight.dtype
    (Aq, Bq), (Av, Bv) = _adapter_values(base.in_features, [splits[0], splits[2]], r, dev, dt, seed)
    methods = [Method("floor", "", 0.0, base)]
    split = None
    for p in ps:
        plain = PlainLoRAQKV(base, splits, r, lora_alpha, p)
        with torch.no_grad():
            plain.linear_a_q.weight.copy_(Aq)
            plain.linear_b_q.weight.copy_(Bq)
            plain.linear_a_v.weight.copy_(Av)
            plain.linear_b_v.weight.copy_(Bv)
        methods.append(Method("plain", "", p, plain))
        if with_peft:
            split = SplitQKV(base, splits)
            model = _peft_lora(split, ["q", "v"], r, lora_alpha, p)
            with torch.no_grad():
                model.q.lora_A["default"].weight.copy_(Aq)
                model.q.lora_B["default"].weight.copy_(Bq)
                model.v.lora_A["default"].weight.copy_(Av)
                model.v.lora_B["default"].weight.copy_(Bv)
            methods.append(Method("peft", "", p, model, note="separate q/k/v linears (PEFT cannot target q/v of a fused qkv)"))
        def make(lora_fa, p=p):
            return lora_fused.LoRAQKV.from_linear(base, targets="qv", r=r, lora_alpha=lora_alpha, lora_dropout=p,
                                                  lora_fa=lora_fa)

        def load(fused):
            with torch.no_grad():
                fused.lora_A_for("q").copy_(Aq)
                fused.lora_B_for("q").copy_(Bq)
                fused.lora_A_for("v").copy_(Av)
                fused.lora_B_for("v").copy_(Bv)

        for b in backends:
            methods += _fused_methods(make, load, b, p, fused_kinds(lora_fa, two_adapters), r, lora_alpha)
    return methods


OPS = {
    # op name -> (builder, description)
    "linear": (linear_methods, "LoRALinear vs nn.Linear-based LoRA and PEFT"),
    "qkv": (qkv_methods, 'LoRAQKV(targets="qv") vs SAM-style plain LoRA and PEFT on q and v of separate linears'),
}


def as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grads_for(outs: Tuple[torch.Tensor, ...], g: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Contiguous pieces of the upstream gradient ``g`` (M, N) matching the outputs' widths."""
    if len(outs) == 1:
        return (g,)
    return tuple(c.contiguous() for c in g.split([o.shape[-1] for o in outs], dim=-1))
