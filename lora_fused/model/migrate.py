"""Migration from the hand-written ``_LoRA_qkv`` wrapper of SAM fine-tuning code (SAMed and its descendants).

That wrapper replaces an attention's fused ``qkv`` Linear by a module holding the original Linear as ``qkv`` and
four bias-free Linears ``linear_a_q`` (r, K), ``linear_b_q`` (n_q, r), ``linear_a_v`` (r, K), ``linear_b_v``
(n_v, r), and computes

    y = qkv(x);  y[..., :n_q] += linear_b_q(linear_a_q(x));  y[..., N-n_v:] += linear_b_v(linear_a_v(x))

i.e. LoRA on q and v with scaling 1 and no dropout. That is exactly ``LoRAQKV(targets="qv")`` with
``lora_alpha = r`` and splits ``(n_q, N - n_q - n_v, n_v)``; :func:`migrate_lora_qkv` converts either form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from ..modules import LoRAQKV
from ._common import set_submodule

_PARTS = ("linear_a_q", "linear_b_q", "linear_a_v", "linear_b_v")


def _is_lora_qkv_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "qkv", None), nn.Linear) and all(
        isinstance(getattr(module, p, None), nn.Linear) for p in _PARTS
    )


def _build(name: str, qkv: nn.Linear, a_q: torch.Tensor, b_q: torch.Tensor, a_v: torch.Tensor,
           b_v: torch.Tensor) -> LoRAQKV:
    """A ``LoRAQKV(targets="qv")`` sharing ``qkv``'s weight and bias, holding the given adapter tensors."""
    N, K = qkv.weight.shape
    r = a_q.shape[0]
    shapes = {"linear_a_q": (a_q, (r, K)), "linear_a_v": (a_v, (r, K)),
              "linear_b_q": (b_q, (b_q.shape[0], r)), "linear_b_v": (b_v, (b_v.shape[0], r))}
    for part, (t, want) in shapes.items():
        if t.dim() != 2 or tuple(t.shape) != want:
            raise ValueError(
                f"migrate_lora_qkv: {name}.{part} has shape {tuple(t.shape)}, expected {want} "
                f"(qkv is {N}x{K}, rank {r} from linear_a_q)"
            )
    n_q, n_v = b_q.shape[0], b_v.shape[0]
    if n_q + n_v > N:
        raise ValueError(f"migrate_lora_qkv: {name}: q and v outputs ({n_q} + {n_v}) exceed the qkv output {N}")
    new = LoRAQKV.from_linear(qkv, targets="qv", splits=(n_q, N - n_q - n_v, n_v), r=r, lora_alpha=r)
    with torch.no_grad():
        for t, (A, B) in {"q": (a_q, b_q), "v": (a_v, b_v)}.items():
            new.lora_A_for(t).copy_(A)
            new.lora_B_for(t).copy_(B)
    return new


def _migrate_model(model: nn.Module) -> List[str]:
    found = [(n, m) for n, m in model.named_modules() if n and _is_lora_qkv_wrapper(m)]
    if not found:
        raise ValueError(
            "migrate_lora_qkv: the model has no _LoRA_qkv-style module (one with a Linear 'qkv' and Linears "
            + ", ".join(repr(p) for p in _PARTS) + ")"
        )
    flags = [(p, p.requires_grad) for _, m in found for p in m.qkv.parameters()]
    built = []
    try:
        for name, m in found:
            parts = [getattr(m, p).weight.detach() for p in _PARTS]
            new = _build(name, m.qkv, parts[0], parts[1], parts[2], parts[3])
            new.train(m.training)
            new.lora_A.requires_grad_(m.linear_a_q.weight.requires_grad or m.linear_a_v.weight.requires_grad)
            new.lora_B.requires_grad_(m.linear_b_q.weight.requires_grad or m.linear_b_v.weight.requires_grad)
            built.append((name, new))
    except Exception:
        for p, flag in flags:  # LoRAQKV.from_linear froze the shared qkv weights
            p.requires_grad_(flag)
        raise
    for name, new in built:  # only once every module converted: an error leaves the model as it was
        set_submodule(model, name, new)
    return [name for name, _ in built]


def _migrate_state_dict(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    suffix = ".linear_a_q.weight"
    prefixes = [k[: -len(suffix)] for k in state_dict if isinstance(k, str) and k.endswith(suffix)]
    if not prefixes:
        raise ValueError("migrate_lora_qkv: the state dict has no '<path>.linear_a_q.weight' key (_LoRA_qkv layout)")
    converted: Dict[str, Tuple[str, Dict[str, torch.Tensor]]] = {}
    consumed = set()
    for pre in prefixes:
        keys = {p: f"{pre}.{p}.weight" for p in _PARTS}
        keys["weight"] = f"{pre}.qkv.weight"
        missing = [k for k in keys.values() if k not in state_dict]
        if missing:
            raise ValueError(f"migrate_lora_qkv: {pre}: missing {', '.join(missing)}")
        bias_key = f"{pre}.qkv.bias"
        weight = state_dict[keys["weight"]]
        bias = state_dict.get(bias_key)
        qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        qkv.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            qkv.bias = nn.Parameter(bias.detach(), requires_grad=False)
        new = _build(pre, qkv, *(state_dict[keys[p]] for p in _PARTS))
        converted[pre] = {k: v.detach() for k, v in new.state_dict(prefix=pre + ".").items()}
        consumed.update(keys.values())
        consumed.add(bias_key)
    out: Dict[str, torch.Tensor] = {}
    emitted = set()
    for key, value in state_dict.items():  # keep the original order; each converted module where it was
        if key in consumed:
            pre = next(p for p in prefixes if isinstance(key, str) and key.startswith(p + "."))
            if pre not in emitted:
                out.update(converted[pre])
                emitted.add(pre)
            continue
        out[key] = value
    return out


def migrate_lora_qkv(model_or_state_dict):
    """Convert SAM fine-tuning's ``_LoRA_qkv`` adapters to ``LoRAQKV(targets="qv")``; outputs are unchanged.

    * A model (``nn.Module``): every submodule with a Linear ``qkv`` and Linears ``linear_a_q``, ``linear_b_q``,
      ``linear_a_v``, ``linear_b_v`` is replaced, in place, by a ``LoRAQKV`` sharing the ``qkv`` weight and bias,
      ``r`` from ``linear_a_q``, ``lora_alpha = r`` (scaling 1), no dropout, the adapters' values copied and their
      ``requires_grad`` kept. Returns the replaced modules' names. A wrapper that also keeps the adapter Linears
      in lists (SAMed's ``LoRA_Sam.w_As`` / ``w_Bs``) still holds the old ones: migrate the SAM model inside it.
    * A state dict (a mapping, e.g. from ``torch.load(path, weights_only=True)``): the keys
      ``<path>.qkv.weight`` / ``.qkv.bias`` / ``.linear_{a,b}_{q,v}.weight`` of each wrapper become the keys of a
      ``LoRAQKV`` at ``<path>`` (``<path>.weight``, ``.bias``, ``.lora_A``, ``.lora_B``); other keys are kept as
      they are. Returns the new state dict. It loads into the model after
      ``inject_lora(model, ["qkv"], qkv_targets="qv", r=r, lora_alpha=r)``.

    Raises ``ValueError`` naming the module when no wrapper is found, a key is missing or shapes disagree (the
    model is then left as it was). ``TypeError`` for anything else than a module or a mapping.
    """
    if isinstance(model_or_state_dict, nn.Module):
        return _migrate_model(model_or_state_dict)
    if isinstance(model_or_state_dict, Mapping):
        return _migrate_state_dict(model_or_state_dict)
    raise TypeError(f"migrate_lora_qkv expects an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")
