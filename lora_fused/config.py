"""``LoraConfig`` (the options of ``inject_lora`` / ``add_adapter`` as one object, JSON round trip, conversion to and
from PEFT's ``LoraConfig``) and the preset registry (``presets``, ``register_preset``, ``LoraConfig.preset``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .spec import check_lora_hparams, dtype_name, normalize_targets, parse_dtype

TargetSpec = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]
QkvTargets = Union[str, Sequence[str], Dict[str, str]]

BIAS_CHOICES = ("none", "all", "lora_only")

# Fields of PEFT's LoraConfig that turn it into something other than plain LoRA on nn.Linear modules: a config
# (or a saved adapter_config.json) setting any of them is refused, naming it.
PEFT_UNSUPPORTED = (
    "use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens",
    "arrow_config", "velora_config", "monteclora_config", "kasa_config", "mica", "target_parameters",
    "layer_replication", "trainable_token_indices", "layers_to_transform", "layers_pattern", "loftq_config",
    "megatron_config", "eva_config", "corda_config",
)


@dataclass
class LoraConfig:
    """The options of :func:`~lora_fused.inject_lora` as one object.

    Fields:
        target_modules: which ``nn.Linear`` modules get an adapter: a regex ``str`` matched in full against the
            qualified name, a list of names (equal or ``"." + item`` suffix, PEFT's rule), or a callable
            ``(name, module) -> bool`` (not JSON-serialisable).
        r, lora_alpha, lora_dropout, use_rslora: the adapter's hyper-parameters (``scaling = lora_alpha / r``, or
            ``/ sqrt(r)`` with rsLoRA).
        qkv_targets: a ``str`` such as ``"qv"`` (fused modules whose last name component is ``qkv`` become
            ``LoRAQKV`` with those projections adapted), or a mapping ``{pattern: "qv"}`` naming any fused module
            (``{"to_qkv": "qv", "Wqkv": "v"}``; keys follow the ``rank_pattern`` rule). One that applies to no
            injected module is an error.
        qkv_splits: ``(q_out, k_out, v_out)`` of the fused modules (grouped-query attention); default thirds.
        exclude_modules: same forms as ``target_modules``; matches are never adapted.
        rank_pattern / alpha_pattern: ``{pattern: value}`` overriding ``r`` / ``lora_alpha`` per module; a key
            matches a name equal to it, ending with ``"." + key``, or matching it as a regex anchored at a
            component boundary (PEFT's rule; the first matching key in dict order wins).
        bias: ``"none"`` | ``"all"`` | ``"lora_only"``: which biases train (PEFT's meaning).
        modules_to_save: names of modules (heads, decoders; list rule) that train fully and are saved with the
            adapter.
        adapter_dtype: dtype of the adapter parameters (e.g. ``torch.float32`` on a bf16 model); None: the base's.
        lora_fa: LoRA-FA: ``A`` frozen at its initialisation, only ``B`` trains.
    """

    target_modules: Optional[TargetSpec] = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    qkv_targets: Optional[QkvTargets] = None
    qkv_splits: Optional[Tuple[int, int, int]] = None
    exclude_modules: Optional[TargetSpec] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None
    adapter_dtype: Optional[torch.dtype] = None
    lora_fa: bool = False

    def __post_init__(self) -> None:
        check_lora_hparams(self.r, self.lora_alpha, self.lora_dropout)
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        for what in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, what)
            if patterns is None:
                setattr(self, what, {})
            elif not isinstance(patterns, dict):
                raise TypeError(f"{what} must be a dict {{pattern: value}}, got {type(patterns).__name__}")
            else:
                setattr(self, what, dict(patterns))
        for what, index in (("rank_pattern", 0), ("alpha_pattern", 1)):
            for key, value in getattr(self, what).items():
                args = [1, 1, 0.0]
                args[index] = value
                try:
                    check_lora_hparams(*args)
                except ValueError as exc:
                    raise ValueError(f"{what}[{key!r}]: {exc}") from None
        self.qkv_targets = _normalize_qkv_targets(self.qkv_targets)
        if self.qkv_splits is not None:
            self.qkv_splits = tuple(int(s) for s in self.qkv_splits)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
            bad = [m for m in self.modules_to_save if not isinstance(m, str)]
            if bad:
                raise TypeError(f"modules_to_save must be module names (str), got {bad!r}")
        self.adapter_dtype = parse_dtype(self.adapter_dtype)
        self.use_rslora, self.lora_fa = bool(self.use_rslora), bool(self.lora_fa)
        for what in ("target_modules", "exclude_modules"):
            value = getattr(self, what)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, what, sorted(value) if isinstance(value, (set, frozenset)) else list(value))

    # -- JSON -----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-serialisable dict; ``from_dict`` rebuilds an equal config. ``ValueError`` for a callable
        ``target_modules`` / ``exclude_modules`` (a function has no JSON form)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if callable(value) and not isinstance(value, (str, list, dict)):
                raise ValueError(f"LoraConfig.to_dict: {f.name} is a callable, which has no JSON form; "
                                 "use a regex or a list of names")
            if f.name == "adapter_dtype":
                value = dtype_name(value)
            elif f.name == "qkv_splits" and value is not None:
                value = list(value)
            else:
                value = copy.deepcopy(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"LoraConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoraConfig.from_dict: unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes) -> "LoraConfig":
        """A copy with ``changes`` applied (validated)."""
        return replace(copy.deepcopy(self), **changes)

    # -- presets --------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "LoraConfig":
        """The preset ``name`` (see :func:`presets`) with ``overrides`` applied, e.g.
        ``LoraConfig.preset("standard", r=4, exclude_modules=r"stages\\.0\\..*")``."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; the presets are {presets()}")
        return _PRESETS[name].replace(**overrides)

    # -- PEFT -----------------------------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, peft_config) -> "LoraConfig":
        """The equivalent of PEFT's ``LoraConfig``; ``ValueError`` naming what lora_fused cannot hold (DoRA,
        ``fan_in_fan_out``, ``layers_to_transform``, an init other than PEFT's default, ``"all-linear"``, …)."""
        if getattr(peft_config, "peft_type", None) is None or str(getattr(peft_config.peft_type, "value",
                                                                          peft_config.peft_type)) != "LORA":
            raise TypeError(f"LoraConfig.from_peft expects PEFT's LoraConfig, got {type(peft_config).__name__}")
        problems = [name for name in PEFT_UNSUPPORTED if getattr(peft_config, name, None)]
        init = getattr(peft_config, "init_lora_weights", True)
        if init is not True:
            problems.append(f"init_lora_weights={init!r} (lora_fused initialises as PEFT's default, True)")
        targets = peft_config.target_modules
        if isinstance(targets, str) and targets.lower() == "all-linear":
            problems.append("target_modules='all-linear' (name the modules)")
        if problems:
            raise ValueError(f"LoraConfig.from_peft: PEFT options lora_fused cannot hold: {problems}")
        return cls(
            target_modules=targets, r=peft_config.r, lora_alpha=peft_config.lora_alpha,
            lora_dropout=peft_config.lora_dropout or 0.0, use_rslora=bool(getattr(peft_config, "use_rslora", False)),
            exclude_modules=getattr(peft_config, "exclude_modules", None),
            rank_pattern=dict(peft_config.rank_pattern or {}), alpha_pattern=dict(peft_config.alpha_pattern or {}),
            bias=peft_config.bias, modules_to_save=peft_config.modules_to_save,
        )

    def to_peft(self):
        """PEFT's ``LoraConfig`` meaning the same; ``ValueError`` for what PEFT's config cannot hold
        (``qkv_targets``/``qkv_splits``, ``adapter_dtype``, ``lora_fa``, a callable target)."""
        import peft

        problems = []
        if self.qkv_targets is not None or self.qkv_splits is not None:
            problems.append("qkv_targets/qkv_splits (PEFT has no per-projection adapters on a fused qkv)")
        if self.adapter_dtype is not None:
            problems.append("adapter_dtype (PEFT keeps float32 adapters through get_peft_model("
                            "autocast_adapter_dtype=True), not through its config)")
        if self.lora_fa:
            problems.append("lora_fa (PEFT trains LoRA-FA with peft.optimizers.create_lorafa_optimizer)")
        for what in ("target_modules", "exclude_modules"):
            value = getattr(self, what)
            if callable(value) and not isinstance(value, (str, list)):
                problems.append(f"a callable {what}")
        if problems:
            raise ValueError(f"LoraConfig.to_peft: PEFT's LoraConfig cannot hold {'; '.join(problems)}")
        return peft.LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, use_rslora=self.use_rslora,
            target_modules=copy.deepcopy(self.target_modules), exclude_modules=copy.deepcopy(self.exclude_modules),
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern), bias=self.bias,
            modules_to_save=copy.deepcopy(self.modules_to_save),
        )


def _normalize_qkv_targets(value):
    """``"vq"`` → ``"qv"``; a mapping keeps its keys with normalised values; None stays None."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ValueError("qkv_targets: an empty mapping adapts nothing; pass None")
        out = {}
        for key, targets in value.items():
            if not isinstance(key, str):
                raise TypeError(f"qkv_targets: mapping keys are module name patterns (str), got {key!r}")
            out[key] = "".join(normalize_targets(targets))
        return out
    return "".join(normalize_targets(value))


# -- presets ---------------------------------------------------------------------------------------------------------
_PRESETS: Dict[str, LoraConfig] = {}


def presets() -> List[str]:
    """The names of the registered presets (built in: ``minimal``, ``standard``, ``full``, ``sam_qv``)."""
    return list(_PRESETS)


def register_preset(name: str, config: LoraConfig, *, overwrite: bool = False) -> None:
    """Register ``config`` as preset ``name`` (a copy is kept). Re-registering a name needs ``overwrite=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a preset name must be a non-empty str, got {name!r}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_preset expects a lora_fused.LoraConfig, got {type(config).__name__}")
    if name in _PRESETS and not overwrite:
        raise ValueError(f"preset {name!r} exists; pass overwrite=True to replace it")
    _PRESETS[name] = copy.deepcopy(config)


# Built-in presets for ViT-style encoders (timm ViT/Swin/EVA, segment-anything's image encoder, point-cloud
# transformers): attention as one fused ``qkv`` Linear and an output ``attn.proj``; MLPs named fc1/fc2 (timm) or
# lin1/lin2 (segment-anything). docs/presets.md lists exactly what each one adapts.
register_preset("minimal", LoraConfig(target_modules=["qkv"], qkv_targets="qv", r=4, lora_alpha=8))
register_preset("standard", LoraConfig(target_modules=["qkv", "attn.proj"], r=8, lora_alpha=16))
register_preset("full", LoraConfig(target_modules=["qkv", "attn.proj", "fc1", "fc2", "lin1", "lin2"], r=16,
                                   lora_alpha=32))
register_preset("sam_qv", LoraConfig(target_modules=["qkv"], qkv_targets="qv", r=4, lora_alpha=4))

