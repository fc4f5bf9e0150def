"""Adapters that a model's forward never uses: found at injection (parents known to read a Linear's weight
directly) and by running the model once (:func:`check_adapters`).

A LoRA module only computes when its parent *calls* it. Some parents read the wrapped Linear's ``weight`` and do
the matrix product themselves, so the adapter is skipped without an error:

* ``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` (always);
* ``nn.TransformerEncoderLayer`` in eval mode takes PyTorch's fused fast path
  (``torch._transformer_encoder_layer_fwd``), which reads ``linear1.weight`` and ``linear2.weight``;
* attention classes that compute ``F.linear(x, self.qkv.weight, bias)`` to add a separately stored bias (timm's
  BEiT, EVA and Swin V2 do when ``qkv_bias=True``).

``inject_lora`` refuses the first (elsewhere) and warns for the others through :func:`warn_bypassing_parents`;
:func:`check_adapters` runs a forward and a backward and names every adapter that took no part, whatever the cause.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree

from ._common import lora_modules, shorten_names, unwrap

# Reading the weight only for its metadata (dtype, device, shape) is not a bypass.
_METADATA = r"(?:dtype|device|shape|size|ndim|dim|requires_grad|is_cuda|numel|data_ptr)\b"
# Calls that multiply by a weight themselves instead of calling the module.
_PRODUCT_CALL = re.compile(
    r"(?:\bF|\bfunctional|\btorch)\s*\.\s*(?:linear|mm|matmul|addmm|bmm|baddbmm|einsum)\s*\("
)


def _call_text(src: str, open_paren: int) -> str:
    """The text between the parenthesis at ``open_paren`` and its match (the end of ``src`` if unbalanced)."""
    depth = 0
    for i in range(open_paren, len(src)):
        if src[i] == "(":
            depth += 1
        elif src[i] == ")":
            depth -= 1
            if depth == 0:
                return src[open_paren + 1 : i]
    return src[open_paren + 1 :]


@functools.lru_cache(maxsize=None)
def _source_reads_weight(cls: type, child: str) -> Optional[str]:
    """The first statement of ``cls``'s own source (not torch's classes) that multiplies by ``self.<child>.weight``
    directly (``F.linear(x, self.qkv.weight, …)``, ``x @ self.qkv.weight.t()``), else None."""
    weight = re.compile(rf"self\s*\.\s*{re.escape(child)}\s*\.\s*weight\b(?!\s*\.\s*{_METADATA})")
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.split(".")[0] == "torch":
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in _PRODUCT_CALL.finditer(src):
            args = _call_text(src, m.end() - 1)
            if weight.search(args):
                return " ".join((m.group(0) + args + ")").split())
        m = re.search(rf"@\s*{weight.pattern}", src)
        if m:
            return " ".join(m.group(0).split())
    return None


def bypass_reason(parent: Optional[nn.Module], child: str) -> Optional[Tuple[str, bool]]:
    """Why ``parent`` may skip an adapter placed on its submodule ``child``: ``(reason, always)``, ``always`` True
    when no call path uses the submodule, False when some paths do (e.g. only eval mode bypasses). None when the
    parent is not known to read the submodule's weight directly."""
    if parent is None:
        return None
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return ("nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward", True)
    if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
        return (
            "nn.TransformerEncoderLayer in eval mode takes PyTorch's fast path, which reads linear1.weight and "
            "linear2.weight directly (evaluate with torch.backends.mha.set_fastpath_enabled(False), or merge_lora "
            "the model for inference)",
            False,
        )
    text = _source_reads_weight(type(parent), child)
    if text is None:
        return None
    hint = ""
    if child == "qkv" and hasattr(parent, "qkv_bias_separate"):
        # timm's attention takes the F.linear branch only with separate q/k/v biases and qkv_bias_separate off.
        if getattr(parent, "q_bias", None) is None or parent.qkv_bias_separate:
            return None
        hint = " (timm: setting qkv_bias_separate = True on it makes it call qkv(x) and add the bias)"
    return (f"{type(parent).__name__} computes `{text}` instead of calling self.{child}(...){hint}", False)


def _parents(model: nn.Module) -> Dict[int, Tuple[str, nn.Module, str]]:
    """``id(child) -> (parent name, parent, attribute name)`` for every submodule of ``model``."""
    out: Dict[int, Tuple[str, nn.Module, str]] = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            out.setdefault(id(child), (parent_name, parent, child_name))
    return out


def warn_bypassing_parents(model: nn.Module, names: Sequence[str], stacklevel: int = 3) -> None:
    """One ``UserWarning`` naming every module of ``names`` whose parent is known to read its weight directly
    (see the module docstring), so an adapter placed there would be skipped on some or all call paths."""
    parents = _parents(model)
    found: Dict[str, List[str]] = {}
    for name in names:
        _, parent, child = parents.get(id(model.get_submodule(name)), ("", None, ""))
        why = bypass_reason(parent, child)
        if why is not None:
            found.setdefault(why[0], []).append(name)
    if found:
        warnings.warn(
            "inject_lora: these adapters will be skipped where their parent reads the weight directly instead of "
            "calling the module; check with lora_fused.check_adapters(model, *example_inputs):\n"
            + _by_cause(found),
            UserWarning,
            stacklevel=stacklevel,
        )


def _by_cause(found: Dict[str, List[str]]) -> str:
    """``{cause: [module names]}`` as indented lines, the names grouped (``blocks.*.attn.qkv (x12)``)."""
    return "\n".join(f"  {shorten_names(names, limit=4)}: {cause}" for cause, names in found.items())


# ----------------------------------------------------------------------------------------------- run-time check
@dataclass
class AdapterUse:
    """How one LoRA module took part in one checked forward (and backward)."""

    name: str
    mode: str  # "train" or "eval"
    calls: int  # how often its forward ran
    reached: Optional[bool]  # a gradient reached its trainable adapter parameters (None: none trains / not checked)
    hint: str = ""  # a known cause when it took no part

    @property
    def took_part(self) -> bool:
        return self.calls > 0 and self.reached is not False

    @property
    def status(self) -> str:
        if self.calls == 0:
            return "not called"
        if self.reached is False:
            return "no gradient"
        return "ok"


@dataclass
class AdapterCheck:
    """The result of :func:`check_adapters`: one :class:`AdapterUse` per (module, mode). ``str()`` is a table."""

    modes: Tuple[str, ...]
    results: List[AdapterUse] = field(default_factory=list)

    @property
    def unused(self) -> List[str]:
        """Names of the modules that took no part in at least one checked mode, in model order."""
        names: List[str] = []
        for u in self.results:
            if not u.took_part and u.name not in names:
                names.append(u.name)
        return names

    @property
    def ok(self) -> bool:
        return not self.unused

    def __str__(self) -> str:
        names = list(dict.fromkeys(u.name for u in self.results))
        by = {(u.name, u.mode): u for u in self.results}
        rows = [("module",) + self.modes]
        for n in names:
            rows.append((n,) + tuple(by[(n, m)].status if (n, m) in by else "-" for m in self.modes))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [f"adapter check ({', '.join(self.modes)}): {len(names)} LoRA modules, "
                 f"{len(self.unused)} took no part", fmt(rows[0]), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows[1:]]
        causes: Dict[str, List[str]] = {}
        for u in self.results:
            if not u.took_part and u.hint and u.name not in causes.get(u.hint, []):
                causes.setdefault(u.hint, []).append(u.name)
        if causes:
            lines += ["", "known causes:", _by_cause(causes)]
        if not names:
            lines.append("(no LoRA modules)")
        return "\n".join(lines)


def _adapter_params(module: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.split(".")[0].startswith("lora_") and p.requires_grad]


def _scalar(out) -> Optional[torch.Tensor]:
    """The sum of every floating-point tensor in ``out`` (nested tuples, lists, dicts, model-output objects) that
    depends on something requiring grad; None when none does."""
    leaves = _pytree.tree_leaves(out)
    if len(leaves) == 1 and not isinstance(leaves[0], torch.Tensor) and hasattr(leaves[0], "values"):
        leaves = _pytree.tree_leaves(list(leaves[0].values()))
    terms = [t.float().sum() for t in leaves
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    return torch.stack(terms).sum() if terms else None


@contextlib.contextmanager
def _counting_calls(modules: Sequence[Tuple[str, nn.Module]], counts: Dict[str, int]):
    """Counts each module's forward calls by wrapping its ``forward`` on the instance. Forward hooks are not used:
    a hook would itself switch PyTorch's fused fast paths off and hide the bypass being looked for."""
    saved = []
    for name, module in modules:
        saved.append((module, module.__dict__.get("forward")))
        inner = module.forward

        def counted(*args, _inner=inner, _name=name, **kwargs):
            counts[_name] += 1
            return _inner(*args, **kwargs)

        module.forward = counted
    try:
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def check_adapters(
    model: nn.Module,
    *example_inputs,
    modes: Sequence[str] = ("train", "eval"),
    backward: bool = True,
    strict: bool = False,
    **example_kwargs,
) -> AdapterCheck:
    """Run ``model(*example_inputs, **example_kwargs)`` once per mode and name every LoRA module that took no part.

    A module took no part when its forward never ran ("not called": its parent read the weight directly, or the
    code path skipped it) or, with ``backward``, when no gradient reached its trainable adapter parameters
    ("no gradient": its output does not reach the model's outputs). The backward differentiates the sum of all
    floating-point outputs with ``torch.autograd.grad``, so no ``.grad`` field is touched.

    Args:
        model: a model with lora_fused adapters (a ``torch.compile`` or (Distributed)DataParallel wrapper is
            looked through; names are those of the wrapped model).
        example_inputs, example_kwargs: one small batch, as the model's forward takes it.
        modes: ``"train"`` and/or ``"eval"``; each is checked (the eval fast path of
            ``nn.TransformerEncoderLayer`` only shows in eval).
        backward: also check that gradients reach the adapters.
        strict: raise ``RuntimeError`` naming the modules that took no part.

    The model is left as it was: training flags, buffers (e.g. BatchNorm statistics) and the RNG state are
    restored; outputs are discarded. Returns an :class:`AdapterCheck` (``print()`` it; ``.unused``, ``.ok``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_adapters expects an nn.Module, got {type(model).__name__}")
    modes = tuple(modes)
    bad = [m for m in modes if m not in ("train", "eval")]
    if bad or not modes:
        raise ValueError(f"check_adapters: modes must be a non-empty subset of ('train', 'eval'), got {modes!r}")
    inner = unwrap(model)
    mods = list(lora_modules(inner))
    parents = _parents(inner)
    hints = {}
    for name, module in mods:
        _, parent, child = parents.get(id(module), ("", None, ""))
        why = bypass_reason(parent, child)
        hints[name] = why[0] if why else ""

    flags = [(m, m.training) for m in inner.modules()]
    buffers = [(b, b.detach().clone()) for b in inner.buffers()]
    cuda = sorted({p.device.index or 0 for p in inner.parameters() if p.device.type == "cuda"})
    result = AdapterCheck(modes=modes)
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            for mode in modes:
                inner.train(mode == "train")
                counts = {name: 0 for name, _ in mods}
                with _counting_calls(mods, counts):
                    out = inner(*example_inputs, **example_kwargs)
                reached: Dict[str, Optional[bool]] = {name: None for name, _ in mods}
                if backward:
                    params = {name: _adapter_params(m) for name, m in mods}
                    flat = [p for name, _ in mods for p in params[name]]
                    loss = _scalar(out) if flat else None
                    if flat:
                        grads = torch.autograd.grad(loss, flat, allow_unused=True) if loss is not None else [None] * len(flat)
                        i = 0
                        for name, _ in mods:
                            n = len(params[name])
                            if n:
                                reached[name] = any(g is not None for g in grads[i : i + n])
                            i += n
                    del loss
                del out
                for name, _ in mods:
                    result.results.append(AdapterUse(name, mode, counts[name], reached[name], hints[name]))
    finally:
        for m, was_training in flags:
            m.training = was_training
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
    if strict and not result.ok:
        raise RuntimeError(f"check_adapters: these LoRA modules took no part:\n{result}")
    return result
