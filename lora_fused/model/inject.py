"""``inject_lora`` / ``add_adapter``: give the targeted ``nn.Linear`` modules of a model an adapter (plain linears
become ``LoRALinear`` / ``LoRAQKV``; LoRA modules get one more named adapter)."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch.nn as nn

from ..config import LoraConfig
from ..modules import LoRAAdapter, LoRABase, LoRALinear, LoRAQKV
from ..modules.base import DEFAULT_ADAPTER, check_adapter_name
from ..spec import AdapterSpec, normalize_splits
from ._common import (TargetSpec, clean_name, make_matcher, name_in_list, pattern_key, refuse_peft_model,
                      shorten_names, unwrap)
from .plan import Plan, model_active_adapter, plan_saved_modules, set_trainable_for_active
from .check import bypass_reason, warn_bypassing_parents
from .trainable import mark_only_lora_as_trainable


class _Default:
    """A keyword default of :func:`inject_lora` that was not passed (so it can be told apart from a config)."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def inject_lora(
    model: nn.Module,
    target_modules: Union[TargetSpec, LoraConfig],
    *,
    r: int = _Default(8),
    lora_alpha: float = _Default(8),
    lora_dropout: float = _Default(0.0),
    use_rslora: bool = _Default(False),
    qkv_targets: Optional[Union[str, Sequence[str], Dict[str, str]]] = _Default(None),
    exclude_modules: Optional[TargetSpec] = _Default(None),
    rank_pattern: Optional[Dict[str, int]] = _Default(None),
    alpha_pattern: Optional[Dict[str, float]] = _Default(None),
    freeze: bool = True,
    qkv_splits: Optional[Sequence[int]] = _Default(None),
    bias: str = _Default("none"),
    modules_to_save: Optional[Sequence[str]] = _Default(None),
    adapter_dtype=_Default(None),
    lora_fa: bool = _Default(False),
    adapter_name: Optional[str] = None,
) -> List[str]:
    """Give the ``nn.Linear`` modules of ``model`` selected by ``target_modules`` a fused LoRA adapter, in place.

    Args:
        target_modules: a :class:`~lora_fused.LoraConfig` holding every option below, or: a ``str``, a regular
            expression matched in full against each qualified module name (``r"blocks\\.(0|1|2)\\..*qkv"``); a
            list of strings, matching a name equal to an item or ending with ``"." + item`` (PEFT's rule:
            ``["query", "value"]``); a callable ``(name, module) -> bool`` (e.g. stage prefixes:
            ``lambda n, m: isinstance(m, nn.Linear) and n.startswith(("stages.2.", "stages.3."))``).
        r, lora_alpha, lora_dropout, use_rslora: adapter hyper-parameters (see :class:`~lora_fused.LoRALinear`).
        qkv_targets: ``"qv"``: matched modules whose last name component is ``qkv`` become
            :class:`~lora_fused.LoRAQKV` with adapters on those projections only; or a mapping
            ``{pattern: "qv"}`` naming any fused module (keys follow the ``rank_pattern`` rule). All other
            matches become ``LoRALinear``. A ``qkv_targets`` that applies to no injected module is an error.
        exclude_modules: same forms as ``target_modules``; matching modules are never replaced.
        rank_pattern / alpha_pattern: ``{pattern: value}`` overriding ``r`` / ``lora_alpha``; a key matches a
            module whose name equals it, ends with ``"." + key`` or matches it as a regular expression anchored at
            a name-component boundary (PEFT's rule; the first matching key in dict order wins).
        freeze: make only the active adapter (and ``modules_to_save``, and biases per ``bias``) trainable.
        qkv_splits: ``(q_out, k_out, v_out)`` of the fused qkv modules (grouped-query attention); default thirds.
        bias: ``"none"`` | ``"all"`` | ``"lora_only"``: which biases train with ``freeze`` (PEFT's meaning).
        modules_to_save: modules (heads, decoders; list rule) that train fully and are saved with the adapter.
        adapter_dtype: dtype of the adapter parameters (e.g. ``torch.float32`` on a bf16 model).
        lora_fa: LoRA-FA: ``A`` frozen at its initialisation, only ``B`` trains.
        adapter_name: the adapter to add; default: the model's active adapter, or ``"default"``.

    Returns:
        The qualified names of the modules that received the adapter, in model order.

    Raises:
        TypeError: a matched module is not an ``nn.Linear`` (the message names it), or is the ``out_proj`` of an
            ``nn.MultiheadAttention`` (which reads the weight directly, so an adapter would be ignored); options
            given both in a ``LoraConfig`` and as keywords.
        ValueError: nothing matched (the message lists the ``nn.Linear`` names that exist); a matched module
            already carries this adapter; bad hyper-parameters, targets, splits or ``qkv_targets``.

    Nothing is changed when an error is raised.
    """
    options = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   qkv_targets=qkv_targets, exclude_modules=exclude_modules, rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern, qkv_splits=qkv_splits, bias=bias, modules_to_save=modules_to_save,
                   adapter_dtype=adapter_dtype, lora_fa=lora_fa)
    given = {k: v for k, v in options.items() if not isinstance(v, _Default)}
    if isinstance(target_modules, LoraConfig):
        if given:
            raise TypeError(f"inject_lora: pass the options either in the LoraConfig or as keywords, not both "
                            f"(got {sorted(given)})")
        config = target_modules
    else:
        config = LoraConfig(target_modules=target_modules, **given)
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_lora expects an nn.Module, got {type(model).__name__}")
    if adapter_name is None:
        adapter_name = model_active_adapter(model) or DEFAULT_ADAPTER
    plan, names = plan_adapter(model, config, adapter_name, "inject_lora", freeze=freeze)
    plan.apply()
    return names


def add_adapter(model: nn.Module, name: str, config: Union[LoraConfig, dict, None] = None, **options) -> List[str]:
    """Add adapter ``name`` (its own targets, rank, alpha, dropout, …: a :class:`~lora_fused.LoraConfig`, a
    dict of its fields, or keywords) to ``model``, leaving the existing adapters untouched. Plain linears it targets
    become LoRA modules; LoRA modules it targets get one more adapter. It is not activated (unless it is the model's
    first adapter, which is injected as by :func:`inject_lora`); :func:`set_adapter` switches to it.
    Merged modules that receive it are unmerged first (with a warning).

    Returns the names of the modules that received it. Raises as :func:`inject_lora` (also when a targeted module
    already has an adapter ``name``); nothing is changed when it raises."""
    check_adapter_name(name)
    if isinstance(config, dict):
        config = LoraConfig.from_dict(config)
    if config is None:
        config = LoraConfig(**options)
    elif options:
        raise TypeError(f"add_adapter: pass the options either in the config or as keywords, not both "
                        f"(got {sorted(options)})")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_adapter expects a lora_fused.LoraConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_adapter expects an nn.Module, got {type(model).__name__}")
    plan, names = plan_adapter(model, config, name, "add_adapter", freeze=model_active_adapter(model) is None)
    plan.apply()
    return names


def plan_adapter(model: nn.Module, config: LoraConfig, adapter_name: str, where: str, freeze: bool):
    """The :class:`Plan` adding adapter ``adapter_name`` per ``config``, and the names of the modules it reaches."""
    check_adapter_name(adapter_name)
    refuse_peft_model(model, where, "add_adapter")
    if config.target_modules is None:
        raise ValueError(f"{where}: the config names no target_modules")
    root = unwrap(model)
    matches = make_matcher(config.target_modules, "target_modules")
    excluded = make_matcher(config.exclude_modules, "exclude_modules") if config.exclude_modules is not None else None
    previous_active = model_active_adapter(root)
    # a model's first adapter is active; a further one is not (the modules keep computing the active adapter)
    active = adapter_name if previous_active is None else previous_active

    parents = {}
    for parent_name, parent in root.named_modules():
        for child_name, child in parent.named_children():
            parents.setdefault(id(child), (parent, child_name))

    chosen = []  # (actual name, module)
    not_linear, already, inside = [], [], []
    for name, module in root.named_modules():
        if not name:
            continue
        if any(name.startswith(prefix) for prefix in inside):
            continue  # the adapters and base of a LoRA module are not targets themselves
        if isinstance(module, LoRABase):
            inside.append(name + ".")
        key = clean_name(name)
        if not matches(key, module):
            continue
        if excluded is not None and excluded(key, module):
            continue
        if isinstance(module, LoRABase) and adapter_name in module.lora_adapters:
            already.append(key)
            continue
        if not isinstance(module, nn.Linear):
            not_linear.append(f"{key} ({type(module).__name__})")
            continue
        bypass = bypass_reason(*parents.get(id(module), (None, "")))
        if bypass is not None and bypass[1]:  # no call path uses the module: refuse rather than warn
            raise TypeError(
                f"{where}: {key!r} would never compute its adapter: {bypass[0]} instead of calling it. "
                "Target another module."
            )
        chosen.append((name, module))

    if not_linear:
        raise TypeError(
            f"{where}: only nn.Linear modules can be replaced, but the targets matched "
            + ", ".join(not_linear) + "; narrow target_modules (e.g. a full regex, or a callable checking isinstance)"
        )
    if already:
        raise ValueError(
            f"{where}: {', '.join(already)} already carr{'ies' if len(already) == 1 else 'y'} the adapter "
            f"{adapter_name!r}; injecting it twice is not supported (merge_lora or load a fresh model first)"
        )
    if not chosen:
        linears = [clean_name(n) for n, m in root.named_modules()
                   if n and isinstance(m, nn.Linear) and not isinstance(m, LoRABase)]
        raise ValueError(
            f"{where}: target_modules={_describe_spec(config.target_modules)} matched no module. "
            f"The nn.Linear modules of this model are: {shorten_names(linears)}"
        )
    warn_bypassing_parents(root, [name for name, _ in chosen])

    plan = Plan(root)
    names, used = [], {"rank_pattern": set(), "alpha_pattern": set(), "qkv_targets": set()}
    for name, linear in chosen:
        key = clean_name(name)
        try:
            spec = _spec_for(key, linear, config, used)
            spec.warn_unusual(f"{where}: {key!r}")
            if isinstance(linear, LoRABase):
                adapter = LoRAAdapter(spec, device=linear.weight.device, dtype=linear.weight.dtype)
                plan.add_adapter(name, linear, adapter_name, adapter)
            else:
                cls = LoRAQKV if spec.kind == "LoRAQKV" else LoRALinear
                new = cls.from_linear_spec(linear, spec, adapter_name)
                new.set_adapter(active)
                plan.swap(name, new)
        except ValueError as exc:
            raise ValueError(f"{where}: cannot inject into {key!r}: {exc}") from None
        names.append(key)

    qkv = config.qkv_targets
    if isinstance(qkv, str) and not used["qkv_targets"]:
        raise ValueError(f"{where}: qkv_targets={qkv!r} applies to modules named 'qkv', and none of the injected "
                         f"modules is ({shorten_names(names)}); name the fused modules with a mapping, e.g. "
                         f"qkv_targets={{'to_qkv': {qkv!r}}}")
    if isinstance(qkv, dict):
        unused = [k for k in qkv if k not in used["qkv_targets"]]
        if unused:
            raise ValueError(f"{where}: qkv_targets keys {unused} match none of the injected modules "
                             f"({shorten_names(names)})")
    for what in ("rank_pattern", "alpha_pattern"):
        unused = [k for k in getattr(config, what) if k not in used[what]]
        if unused:
            warnings.warn(f"{where}: {what} entries {unused} matched none of the injected modules", stacklevel=3)

    if config.modules_to_save:
        found = _modules_named(root, config.modules_to_save)
        missing = [item for item in config.modules_to_save if not any(name_in_list(n, [item]) for n in found)]
        if missing:
            raise ValueError(f"{where}: modules_to_save: no module of the model is named {missing}")
        plan_saved_modules(plan, found, adapter_name, names, where)

    if freeze:
        plan.finally_(lambda: mark_only_lora_as_trainable(root, bias=config.bias))
    else:
        plan.finally_(lambda: _train_saved_modules(root, adapter_name, active))
    return plan, names


def _train_saved_modules(root: nn.Module, adapter_name: str, active: str) -> None:
    if adapter_name == active:
        set_trainable_for_active(root, active)


def _modules_named(root: nn.Module, items: Sequence[str]) -> Dict[str, nn.Module]:
    """``clean name → module`` of every module whose name matches ``items`` by the list rule."""
    out = {}
    for name, module in root.named_modules():
        key = clean_name(name)
        if key and name_in_list(key, items):
            out[key] = module
    return out


def _spec_for(name: str, linear: nn.Linear, config: LoraConfig, used: Dict[str, set]) -> AdapterSpec:
    """The adapter layout of module ``name`` under ``config`` (records which patterns were used)."""
    r_key = pattern_key(config.rank_pattern, name, "rank_pattern")
    a_key = pattern_key(config.alpha_pattern, name, "alpha_pattern")
    if r_key is not None:
        used["rank_pattern"].add(r_key)
    if a_key is not None:
        used["alpha_pattern"].add(a_key)
    r = config.rank_pattern[r_key] if r_key is not None else config.r
    alpha = config.alpha_pattern[a_key] if a_key is not None else config.lora_alpha
    targets = splits = None
    qkv = config.qkv_targets
    if isinstance(qkv, str) and name.rpartition(".")[2] == "qkv":
        targets = qkv
        used["qkv_targets"].add(qkv)
    elif isinstance(qkv, dict):
        q_key = pattern_key(qkv, name, "qkv_targets")
        if q_key is not None:
            targets = qkv[q_key]
            used["qkv_targets"].add(q_key)
    if targets is not None and isinstance(linear, LoRAQKV):
        if config.qkv_splits is not None and tuple(config.qkv_splits) != linear.splits:
            raise ValueError(f"its splits are {linear.splits}, not qkv_splits={tuple(config.qkv_splits)}")
        splits = linear.splits
    elif targets is not None:
        splits = normalize_splits(config.qkv_splits, linear.out_features)
    return AdapterSpec(linear.in_features, linear.out_features, r, alpha, config.lora_dropout, config.use_rslora,
                       targets, splits, lora_fa=config.lora_fa, adapter_dtype=config.adapter_dtype)


def _describe_spec(spec) -> str:
    if isinstance(spec, str) or isinstance(spec, (list, tuple)):
        return repr(spec)
    return getattr(spec, "__name__", type(spec).__name__)
