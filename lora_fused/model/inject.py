"""``inject_lora``: replace the targeted ``nn.Linear`` modules of a model by ``LoRALinear`` / ``LoRAQKV``."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch.nn as nn

from ..modules import LoRABase, LoRALinear, LoRAQKV
from ..modules.base import check_lora_hparams
from ..ops.lora_qkv import normalize_splits, normalize_targets
from ._common import TargetSpec, make_matcher, name_in_list, pattern_value, set_submodule, shorten_names
from .check import warn_bypassing_parents
from .trainable import mark_only_lora_as_trainable


def inject_lora(
    model: nn.Module,
    target_modules: TargetSpec,
    *,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    qkv_targets: Optional[Union[str, Sequence[str]]] = None,
    exclude_modules: Optional[TargetSpec] = None,
    rank_pattern: Optional[Dict[str, int]] = None,
    alpha_pattern: Optional[Dict[str, float]] = None,
    freeze: bool = True,
    qkv_splits: Optional[Sequence[int]] = None,
) -> List[str]:
    """Replace the ``nn.Linear`` modules of ``model`` selected by ``target_modules`` by fused LoRA modules, in place.

    Args:
        target_modules: a ``str`` is a regular expression matched in full against each qualified module name
            (``r"blocks\\.(0|1|2)\\..*qkv"``); a list of strings matches a name equal to an item or ending with
            ``"." + item`` (PEFT's rule: ``["query", "value"]``); a callable ``(name, module) -> bool``
            (e.g. stage prefixes: ``lambda n, m: isinstance(m, nn.Linear) and n.startswith(("stages.2.", "stages.3."))``).
        r, lora_alpha, lora_dropout, use_rslora: adapter hyper-parameters (see :class:`~lora_fused.LoRALinear`).
        qkv_targets: e.g. ``"qv"``: matched modules whose last name component is ``qkv`` become
            :class:`~lora_fused.LoRAQKV` with adapters on those projections only; all other matches ``LoRALinear``.
        exclude_modules: same forms as ``target_modules``; matching modules are never replaced.
        rank_pattern / alpha_pattern: ``{pattern: value}`` overriding ``r`` / ``lora_alpha`` for the modules a
            pattern matches by the list rule (the first matching pattern in dict order wins, as in PEFT).
        freeze: call :func:`mark_only_lora_as_trainable` on ``model`` afterwards (only adapters train).
        qkv_splits: ``(q_out, k_out, v_out)`` of the fused qkv modules (grouped-query attention); default thirds.

    Returns:
        The qualified names of the replaced modules, in model order.

    Raises:
        TypeError: a matched module is not an ``nn.Linear`` (the message names it), or is the ``out_proj`` of an
            ``nn.MultiheadAttention`` (which reads the weight directly, so an adapter would be ignored).
        ValueError: nothing matched (the message lists the ``nn.Linear`` names that exist); a matched module
            already carries an adapter; bad hyper-parameters, targets or splits.

    Nothing is changed when an error is raised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_lora expects an nn.Module, got {type(model).__name__}")
    matches = make_matcher(target_modules, "target_modules")
    excluded = make_matcher(exclude_modules, "exclude_modules") if exclude_modules is not None else None
    qkv_t = normalize_targets(qkv_targets) if qkv_targets is not None else None
    for patterns, what in ((rank_pattern, "rank_pattern"), (alpha_pattern, "alpha_pattern")):
        if patterns is not None and not isinstance(patterns, dict):
            raise TypeError(f"{what} must be a dict {{pattern: value}}, got {type(patterns).__name__}")
    check_lora_hparams(r, lora_alpha, lora_dropout)

    parents = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            parents.setdefault(id(child), (parent, child_name))

    chosen = []  # (name, module, config)
    not_linear, already = [], []
    for name, module in model.named_modules():
        if not name or not matches(name, module):
            continue
        if excluded is not None and excluded(name, module):
            continue
        if isinstance(module, LoRABase):
            already.append(name)
            continue
        if not isinstance(module, nn.Linear):
            not_linear.append(f"{name} ({type(module).__name__})")
            continue
        parent = parents.get(id(module), (None, None))[0]
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(
                f"inject_lora: {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight directly "
                "instead of calling it; an adapter there would be ignored. Target another module."
            )
        chosen.append((name, module))

    if not_linear:
        raise TypeError(
            "inject_lora: only nn.Linear modules can be replaced, but the targets matched "
            + ", ".join(not_linear) + "; narrow target_modules (e.g. a full regex, or a callable checking isinstance)"
        )
    if already:
        raise ValueError(
            f"inject_lora: {', '.join(already)} already carr{'ies' if len(already) == 1 else 'y'} a LoRA adapter; "
            "injecting twice is not supported (merge_lora or load a fresh model first)"
        )
    if not chosen:
        linears = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and not isinstance(m, LoRABase)]
        raise ValueError(
            f"inject_lora: target_modules={_describe_spec(target_modules)} matched no module. "
            f"The nn.Linear modules of this model are: {shorten_names(linears)}"
        )
    warn_bypassing_parents(model, [name for name, _ in chosen])

    new_modules = []
    used_rank, used_alpha = set(), set()
    for name, linear in chosen:
        r_m = pattern_value(rank_pattern, name, r)
        a_m = pattern_value(alpha_pattern, name, lora_alpha)
        if rank_pattern:
            used_rank.update(k for k in rank_pattern if name_in_list(name, [k]))
        if alpha_pattern:
            used_alpha.update(k for k in alpha_pattern if name_in_list(name, [k]))
        try:
            check_lora_hparams(r_m, a_m, lora_dropout)
            if qkv_t is not None and name.rpartition(".")[2] == "qkv":
                splits = normalize_splits(qkv_splits, linear.out_features)
                new = LoRAQKV.from_linear(
                    linear, targets=qkv_t, splits=splits, r=r_m, lora_alpha=a_m,
                    lora_dropout=lora_dropout, use_rslora=use_rslora,
                )
            else:
                new = LoRALinear.from_linear(
                    linear, r=r_m, lora_alpha=a_m, lora_dropout=lora_dropout, use_rslora=use_rslora
                )
        except ValueError as exc:
            raise ValueError(f"inject_lora: cannot inject into {name!r}: {exc}") from None
        new_modules.append((name, new))

    for what, patterns, used in (("rank_pattern", rank_pattern, used_rank), ("alpha_pattern", alpha_pattern, used_alpha)):
        unused = [k for k in (patterns or {}) if k not in used]
        if unused:
            warnings.warn(f"inject_lora: {what} entries {unused} matched none of the injected modules", stacklevel=2)

    for name, new in new_modules:
        set_submodule(model, name, new)
    if freeze:
        mark_only_lora_as_trainable(model)
    return [name for name, _ in new_modules]


def _describe_spec(spec) -> str:
    if isinstance(spec, str) or isinstance(spec, (list, tuple)):
        return repr(spec)
    return getattr(spec, "__name__", type(spec).__name__)
