"""Shared machinery of :class:`LoRALinear` and :class:`LoRAQKV`: named adapters, init, merge/unmerge, to_linear.

Storage: a LoRA module is an ``nn.Linear`` (frozen ``weight``/``bias``) plus ``lora_adapters``, an
``nn.ModuleDict`` of :class:`LoRAAdapter` (one per adapter name, each holding its packed ``lora_A``/``lora_B``
Parameters and its :class:`~lora_fused.spec.AdapterSpec`). ``active_adapter`` names the one that computes; the
attributes ``lora_A``, ``lora_B``, ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout``, ``use_rslora``,
``lora_fa`` read the active adapter. Parameter names are ``<module>.lora_adapters.<name>.lora_A``; a state dict
with the single-adapter names ``<module>.lora_A`` / ``<module>.lora_B`` still loads (into the active adapter).
"""

from __future__ import annotations

import json
import math
import warnings
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.lora_linear import lora_apply
from ..spec import AdapterSpec

DEFAULT_ADAPTER = "default"
_ADAPTER_ATTRS = ("lora_A", "lora_B")
CONFIG_KEY = "lora_config"  # state-dict key suffix of an adapter's configuration (see config_tensor)
_NAME_PROBE = nn.ModuleDict()  # an adapter name must not shadow one of its attributes


def check_adapter_name(name) -> str:
    """``name`` if it can key the ``nn.ModuleDict`` of adapters (a non-empty ``str`` without ``.``, not starting with
    ``_``, not shadowing a ``ModuleDict`` attribute such as ``keys``); ``ValueError`` otherwise."""
    if not isinstance(name, str) or not name or "." in name or name.startswith("_") or hasattr(_NAME_PROBE, name):
        raise ValueError(f"adapter name must be a non-empty string without '.', not starting with '_' and not an "
                         f"nn.ModuleDict attribute, got {name!r}")
    return name


def config_tensor(spec: AdapterSpec) -> torch.Tensor:
    """``spec`` as a uint8 tensor of its JSON (a state dict entry that ``torch.load(weights_only=True)`` reads)."""
    data = json.dumps(spec.to_json(), sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def spec_from_tensor(t, where: str) -> AdapterSpec:
    """Inverse of :func:`config_tensor`; ``ValueError`` naming ``where`` when it is not one."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{where}: expected a uint8 tensor holding the adapter configuration, got "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    try:
        entry = json.loads(bytes(t.tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: the adapter configuration is not valid JSON ({exc})") from None
    return AdapterSpec.from_json(entry, where)


class LoRAAdapter(nn.Module):
    """One named adapter: ``lora_A`` ``(T·r, K)`` and ``lora_B`` ``(Σ n_t, r)`` (see :mod:`lora_fused.spec`)."""

    def __init__(self, spec: AdapterSpec, device=None, dtype=None) -> None:
        super().__init__()
        self.spec = spec
        factory = {"device": device, "dtype": spec.adapter_dtype or dtype}
        self.lora_A = nn.Parameter(torch.empty(spec.a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(spec.b_shape, **factory))
        self.reset_parameters()
        self.set_trainable(True)

    def reset_parameters(self) -> None:
        """PEFT's default init: each ``A_t`` kaiming-uniform (a=√5), ``B`` zero (the layer starts as the base)."""
        with torch.no_grad():
            for block in self.lora_A.split(self.spec.r, dim=0):
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            self.lora_B.zero_()

    def set_trainable(self, trainable: bool) -> None:
        """``B`` requires grad iff ``trainable``; ``A`` too unless the adapter is LoRA-FA (``A`` stays frozen)."""
        self.lora_A.requires_grad_(bool(trainable) and not self.spec.lora_fa)
        self.lora_B.requires_grad_(bool(trainable))

    def extra_repr(self) -> str:
        s = self.spec
        text = f"r={s.r}, lora_alpha={s.lora_alpha}, lora_dropout={s.lora_dropout}"
        if s.targets is not None:
            text += f", targets={''.join(s.targets)!r}"
        if s.use_rslora:
            text += ", use_rslora=True"
        if s.lora_fa:
            text += ", lora_fa=True"
        return text


def _linear_shell(cls, linear: nn.Linear):
    """An instance of ``cls`` (an ``nn.Linear`` class) sharing ``linear``'s ``weight`` and ``bias`` Parameters and
    train/eval mode, made without running ``nn.Linear.__init__`` (which would allocate and initialise a weight only
    to throw it away)."""
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    obj.in_features, obj.out_features = linear.in_features, linear.out_features
    obj.weight = linear.weight
    obj.bias = linear.bias
    obj.train(linear.training)
    return obj


def _active_attr(attr: str, doc: str):
    def get(self):
        return getattr(self._active_adapter_module(), attr)
    return property(get, doc=doc)


def _spec_attr(attr: str, doc: str):
    def get(self):
        return getattr(self._active_adapter_module().spec, attr)
    return property(get, doc=doc)


class LoRABase(nn.Linear):
    """An ``nn.Linear`` with a frozen base and named low-rank adapters, one of them active (see subclasses).

    The active adapter (``active_adapter``) adds ``scaling · (dropout(x) A_tᵀ) B_tᵀ`` to each target's output
    columns; the others take no part in forward or backward. ``adapters_disabled`` (see
    :func:`lora_fused.disable_adapters`) makes the module compute the base linear.
    """

    lora_A = _active_attr("lora_A", "The active adapter's packed ``A`` Parameter ``(T·r, in_features)``.")
    lora_B = _active_attr("lora_B", "The active adapter's packed ``B`` Parameter ``(Σ n_t, r)``.")
    spec = _active_attr("spec", "The active adapter's :class:`~lora_fused.spec.AdapterSpec`.")
    r = _spec_attr("r", "Rank of the active adapter.")
    lora_alpha = _spec_attr("lora_alpha", "``lora_alpha`` of the active adapter.")
    scaling = _spec_attr("scaling", "``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) of the active adapter.")
    lora_dropout = _spec_attr("lora_dropout", "Dropout rate p of the active adapter's branch.")
    use_rslora = _spec_attr("use_rslora", "Whether the active adapter uses rsLoRA scaling.")
    lora_fa = _spec_attr("lora_fa", "Whether the active adapter is LoRA-FA (``A`` frozen, ``B`` trains).")

    def __setattr__(self, name, value) -> None:
        # ``m.lora_A = nn.Parameter(...)`` replaces the active adapter's Parameter (same shape), as on a module
        # whose lora_A is a plain attribute.
        if name in _ADAPTER_ATTRS and "lora_adapters" in self.__dict__.get("_modules", {}):
            adapter = self._active_adapter_module()
            if not isinstance(value, nn.Parameter):
                raise TypeError(f"{self._describe()}.{name} must be an nn.Parameter, got {type(value).__name__}")
            if value.shape != getattr(adapter, name).shape:
                raise ValueError(f"{self._describe()}.{name} has shape {tuple(getattr(adapter, name).shape)}; "
                                 f"got {tuple(value.shape)}")
            setattr(adapter, name, value)
            return
        super().__setattr__(name, value)

    # -- construction --------------------------------------------------------------------------------------
    def _init_adapters(self) -> None:
        self.lora_adapters = nn.ModuleDict()
        self.active_adapter: str = DEFAULT_ADAPTER
        self.merged_adapter: Optional[str] = None
        self.adapters_disabled = False

    def freeze_base(self) -> None:
        """``weight`` and ``bias`` stop requiring grad (the adapters train instead)."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear_spec(cls, linear: nn.Linear, spec: AdapterSpec, adapter_name: str = DEFAULT_ADAPTER):
        """A module wrapping ``linear`` (sharing its weight and bias, which are left as they are: see
        :meth:`freeze_base`) with one adapter ``adapter_name`` of layout ``spec``, active."""
        obj = cls._shell_from_linear(linear)
        if spec.splits is not None:
            obj.splits = spec.splits
        obj._init_adapters()
        obj.active_adapter = check_adapter_name(adapter_name)
        obj.attach_adapter(adapter_name, obj.new_adapter(spec))
        return obj

    @classmethod
    def _shell_from_linear(cls, linear: nn.Linear):
        """An instance sharing ``linear``'s weight and bias Parameters (see :func:`_linear_shell`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRABase):
            raise ValueError(f"{cls.__name__}.from_linear: the module is already a {type(linear).__name__}")
        return _linear_shell(cls, linear)

    def make_spec(self, *, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, lora_fa=False,
                  adapter_dtype=None, **kind_options) -> AdapterSpec:
        """The :class:`AdapterSpec` of an adapter of this module (subclasses add their layout options)."""
        if kind_options:
            raise TypeError(f"{type(self).__name__}: unexpected adapter options {sorted(kind_options)}")
        return AdapterSpec(self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora,
                           lora_fa=lora_fa, adapter_dtype=adapter_dtype)

    def check_spec(self, spec: AdapterSpec) -> None:
        """``ValueError`` unless ``spec`` describes an adapter this module can hold."""
        if (spec.in_features, spec.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"{self._describe()}: the adapter is for a ({spec.in_features} -> "
                             f"{spec.out_features}) linear")
        if spec.kind not in type(self).accepts:
            raise ValueError(f"{self._describe()} cannot hold a {spec.kind} adapter (it holds {type(self).accepts})")

    def new_adapter(self, spec: AdapterSpec) -> LoRAAdapter:
        """A freshly initialised :class:`LoRAAdapter` for ``spec`` on this module's device (the module is not
        changed; :meth:`attach_adapter` adds it)."""
        self.check_spec(spec)
        return LoRAAdapter(spec, device=self.weight.device, dtype=self.weight.dtype)

    def attach_adapter(self, name: str, adapter: LoRAAdapter) -> None:
        """Add ``adapter`` under ``name`` (which must be new). It trains only if it is the active one."""
        check_adapter_name(name)
        if name in self.lora_adapters:
            raise ValueError(f"{self._describe()} already has an adapter named {name!r}")
        self.check_spec(adapter.spec)
        self.lora_adapters[name] = adapter
        adapter.set_trainable(name == self.active_adapter)

    def add_adapter(self, name: str, **options) -> LoRAAdapter:
        """Create and attach an adapter ``name`` (options as the constructor's: ``r``, ``lora_alpha``,
        ``lora_dropout``, ``use_rslora``, ``lora_fa``, ``adapter_dtype``, and ``targets`` for a ``LoRAQKV``).
        A merged module is unmerged first (with a warning). Returns the new :class:`LoRAAdapter`."""
        return self.add_adapter_spec(name, self.make_spec(**options))

    def add_adapter_spec(self, name: str, spec: AdapterSpec) -> LoRAAdapter:
        """:meth:`add_adapter` from an :class:`AdapterSpec`."""
        check_adapter_name(name)
        if name in self.lora_adapters:
            raise ValueError(f"{self._describe()} already has an adapter named {name!r}")
        spec.warn_unusual(self._describe())
        adapter = self.new_adapter(spec)
        self.unmerge_before("adding an adapter")
        self.attach_adapter(name, adapter)
        return adapter

    # -- named adapters ---------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> List[str]:
        """Names of the adapters this module holds, in insertion order."""
        return list(self.lora_adapters.keys())

    def _active_adapter_module(self) -> LoRAAdapter:
        adapter = self.lora_adapters._modules.get(self.active_adapter)
        if adapter is None:
            # AttributeError: hasattr(module, "lora_A") is False for a module without the active adapter
            raise AttributeError(f"{self._describe()} has no adapter {self.active_adapter!r} "
                                 f"(its adapters: {self.adapter_names})")
        return adapter

    def has_active_adapter(self) -> bool:
        return self.active_adapter in self.lora_adapters

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter: it computes and trains (``A`` stays frozen for LoRA-FA); the others
        are frozen. A module without ``name`` computes the base. A merged module is unmerged first (warning)."""
        check_adapter_name(name)
        if name != self.active_adapter:
            self.unmerge_before(f"switching to adapter {name!r}")
        self.active_adapter = name
        for key, adapter in self.lora_adapters.items():
            adapter.set_trainable(key == name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged). The active name is left as it is."""
        if name not in self.lora_adapters:
            raise KeyError(f"{self._describe()} has no adapter {name!r} (its adapters: {self.adapter_names})")
        if self.merged_adapter == name:
            self.unmerge_before(f"deleting adapter {name!r}")
        del self.lora_adapters[name]

    def unmerge_before(self, action: str) -> None:
        """Unmerge (with a warning naming ``action``) if merged: the base weight must never hold an adapter that
        is not the one computing."""
        if self.merged_adapter is not None:
            warnings.warn(f"{self._describe()}: unmerging adapter {self.merged_adapter!r} before {action}",
                          UserWarning, stacklevel=3)
            self.unmerge()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init of the active adapter: ``A_t`` kaiming-uniform (a=√5), ``B`` zero."""
        self._active_adapter_module().reset_parameters()

    # -- math ------------------------------------------------------------------------------------------------
    def lora_slices(self) -> List[int]:
        """Flat ``[off_0, n_0, …]``: the output columns each target of the active adapter adds to."""
        return list(self.spec.slices)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B Aᵀ`` of the active adapter placed in its target rows, a float32 ``(N, K)`` tensor."""
        adapter = self._active_adapter_module()
        return adapter.spec.delta_weight(adapter.lora_A, adapter.lora_B)

    def _describe(self) -> str:
        return f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters and submodules are read from their registries: ``self.weight`` would go through
        # ``nn.Module.__getattr__`` (a failed lookup first), a measurable share of a small layer's host time.
        # Anything that keeps them elsewhere (parametrizations, pruning) is read the ordinary way.
        if self.merged_adapter is None and not self.adapters_disabled:
            adapter = self._modules["lora_adapters"]._modules.get(self.active_adapter)
            if adapter is not None:
                params, adapter_params = self._parameters, adapter._parameters
                spec = adapter.spec
                return lora_apply(
                    x,
                    params["weight"] if "weight" in params else self.weight,
                    params["bias"] if "bias" in params else self.bias,
                    adapter_params["lora_A"] if "lora_A" in adapter_params else adapter.lora_A,
                    adapter_params["lora_B"] if "lora_B" in adapter_params else adapter.lora_B,
                    spec.scaling, spec.lora_dropout, self.training, spec.slices, self._describe,
                )
        return F.linear(x, self.weight, self.bias)

    # -- merge -----------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """Whether an adapter (``merged_adapter``) is folded into ``weight``."""
        return self.merged_adapter is not None

    def merge(self) -> None:
        """Fold the active adapter's ``scaling · B A`` into ``weight`` (float32 arithmetic, cast back); forward is
        then the plain linear."""
        if self.merged_adapter is not None:
            raise RuntimeError(f"{self._describe()} is already merged (adapter {self.merged_adapter!r})")
        delta = self.delta_weight()
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        """Undo :meth:`merge` (float32 arithmetic)."""
        if self.merged_adapter is None:
            raise RuntimeError(f"{self._describe()} is not merged; nothing to unmerge")
        adapter = self.lora_adapters[self.merged_adapter]
        with torch.no_grad():
            delta = adapter.spec.delta_weight(adapter.lora_A, adapter.lora_B)
            self.weight.copy_((self.weight.float() - delta).to(self.weight.dtype))
        self.merged_adapter = None

    def to_linear(self) -> nn.Linear:
        """A new, independent ``nn.Linear`` holding the weight with the active adapter merged (the base weight when
        the module has no active adapter); this module is left unchanged."""
        with torch.no_grad():
            weight = self.weight.float()
            if self.merged_adapter is None and self.has_active_adapter():
                weight = weight + self.delta_weight()
            linear = nn.Linear(
                self.in_features, self.out_features, bias=self.bias is not None,
                device=self.weight.device, dtype=self.weight.dtype,
            )
            linear.weight.copy_(weight.to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def base_linear(self, unmerge: bool = True) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's ``weight`` and ``bias`` Parameters, unmerging first (with
        ``unmerge``; without, the caller unmerges before using it). The inverse of ``from_linear``."""
        if unmerge and self.merged_adapter is not None:
            self.unmerge()
        return _linear_shell(nn.Linear, self)

    # -- state dict: the single-adapter names still load ---------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        old = [prefix + attr for attr in _ADAPTER_ATTRS + (CONFIG_KEY,)]
        if any(key in state_dict for key in old):
            if not self.has_active_adapter():
                error_msgs.append(f"{prefix}lora_A/lora_B: {self._describe()} has no active adapter to load into")
            else:
                config = state_dict.pop(prefix + CONFIG_KEY, None)
                if config is not None:
                    try:
                        saved = spec_from_tensor(config, prefix + CONFIG_KEY)
                    except ValueError as exc:
                        error_msgs.append(str(exc))
                    else:
                        diffs = saved.differences(self.spec, fields=LOAD_CHECKED_FIELDS,
                                                  labels=("state dict", "module"))
                        if diffs:
                            error_msgs.append(f"{prefix.rstrip('.')}: the adapter configuration differs: "
                                              f"{'; '.join(diffs)}")
                for attr in _ADAPTER_ATTRS:
                    if prefix + attr in state_dict:
                        state_dict[f"{prefix}lora_adapters.{self.active_adapter}.{attr}"] = state_dict.pop(prefix + attr)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.has_active_adapter():
            text += f", r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"
            if self.use_rslora:
                text += ", use_rslora=True"
            if self.lora_fa:
                text += ", lora_fa=True"
        if self.adapter_names != [DEFAULT_ADAPTER] or self.active_adapter != DEFAULT_ADAPTER:
            text += f", active_adapter={self.active_adapter!r}"
        if self.merged:
            text += ", merged=True"
        return text


# Fields of a saved configuration that must equal the model's for its tensors to mean the same function
# (lora_dropout and adapter_dtype change training, not the function).
LOAD_CHECKED_FIELDS = ("kind", "r", "lora_alpha", "use_rslora", "targets", "splits", "lora_fa", "in_features",
                       "out_features")
