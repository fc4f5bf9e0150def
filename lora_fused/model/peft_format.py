"""PEFT's adapter directory format (``adapter_config.json`` + ``adapter_model.safetensors``), both ways, with PEFT's
multi-adapter layout (the adapter ``"default"`` at the top of the directory, every other adapter in a sub-directory
named after it, as ``PeftModel.save_pretrained`` writes them).

A ``LoRALinear`` adapter is a PEFT LoRA adapter as is. A ``LoRAQKV`` adapter with targets ``T`` is written exactly as
ONE PEFT adapter of rank ``|T|·r`` over the whole fused qkv Linear (:meth:`AdapterSpec.to_peft_B`: ``A`` the packed
``lora_A``, ``B`` block-diagonal with zeros outside the target blocks, ``lora_alpha`` scaled to keep the scaling). It
computes the same function, with the same shared dropout mask. (PEFT itself cannot *train* the block structure:
further PEFT training fills the zero blocks.) lora_fused's configuration (exact alpha, targets, LoRA-FA, dtype)
travels in the safetensors metadata, so :func:`~lora_fused.load_lora` restores the ``LoRAQKV``.
``modules_to_save`` are written as PEFT writes them (``base_model.model.<module>.<key>``, listed in the config).
What PEFT's format cannot express raises ``ValueError``: modules of one adapter with different ``lora_dropout`` or
``use_rslora`` (PEFT has one value per adapter).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from ..config import PEFT_UNSUPPORTED
from ..modules import LoRAQKV
from ..spec import AdapterSpec
from ._common import NameMap, pattern_key
from ._io import atomic_write_bytes, read_safetensors, to_cpu
from .adapter_data import META_MODULES, AdapterData, entries_json, validate_entries

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
DEFAULT_DIR_ADAPTER = "default"


# -- write -----------------------------------------------------------------------------------------------------------
def save_peft(datas: List[AdapterData], directory: str, single: bool) -> None:
    """Write ``datas`` in PEFT's layout under ``directory`` (``single``: the one adapter at the top, whatever its
    name). Everything is encoded (and validated) before the first file is written; each file is written atomically."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_lora(format='peft'): {directory!r} exists and is not a directory")
    files = []
    for data in datas:
        where = directory if single or data.name in (None, DEFAULT_DIR_ADAPTER) else os.path.join(directory, data.name)
        config, weights = encode_peft(data)
        files += [(os.path.join(where, WEIGHTS_NAME), weights), (os.path.join(where, CONFIG_NAME), config)]
    for path, payload in files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, payload)


def encode_peft(data: AdapterData) -> Tuple[bytes, bytes]:
    """``(adapter_config.json bytes, adapter_model.safetensors bytes)`` of one adapter."""
    from safetensors.torch import save as st_save

    dropouts = {spec.lora_dropout for spec in data.specs.values()}
    rslora = {spec.use_rslora for spec in data.specs.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(
            "save_lora(format='peft'): PEFT's format has one lora_dropout and one use_rslora per adapter, but "
            f"adapter {data.name!r} uses lora_dropout {sorted(dropouts)} and use_rslora {sorted(rslora)}; "
            "use format='safetensors'"
        )
    tensors, ranks, alphas = {}, {}, {}
    for name, spec in data.specs.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = data.tensors[f"{name}.lora_A"]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = spec.to_peft_B(data.tensors[f"{name}.lora_B"])
        ranks[name], alphas[name] = spec.peft_rank_alpha()
    for key, value in data.extras.items():
        tensors[PREFIX + key] = value
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(),
        "target_modules": list(data.specs),
        "exclude_modules": None,
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r0},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != a0},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": list(data.saved_modules) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    weights = st_save(to_cpu(tensors), metadata={"format": "pt", META_MODULES: entries_json(data)})
    return (json.dumps(config, indent=2) + "\n").encode(), weights


# -- read ------------------------------------------------------------------------------------------------------------
def read_peft_dir(directory: str, adapter_name: Optional[str] = None,
                  model: Optional[nn.Module] = None) -> List[Tuple[Optional[str], AdapterData]]:
    """The adapters of a PEFT directory as ``(name, data)``: with ``adapter_name``, the top-level adapter (name
    None) or else the sub-directory ``adapter_name``; without, every adapter of the layout (the top-level one is
    named None when alone, ``"default"`` beside sub-directory adapters). ``model`` (optional) helps turn a
    block-form PEFT adapter without lora_fused metadata back into the model's ``LoRAQKV`` layout."""
    where = f"load_lora({directory!r})"
    top = os.path.isfile(os.path.join(directory, CONFIG_NAME))
    subs = sorted(d for d in os.listdir(directory)
                  if os.path.isfile(os.path.join(directory, d, CONFIG_NAME)) and not d.startswith("."))
    if adapter_name is not None:
        if top:
            return [(None, read_peft_adapter(directory, model))]
        if adapter_name in subs:
            return [(adapter_name, read_peft_adapter(os.path.join(directory, adapter_name), model))]
        raise ValueError(f"{where}: no adapter {adapter_name!r} here (adapters: {subs or 'none'}; "
                         f"a PEFT adapter directory has {CONFIG_NAME})")
    if not top and not subs:
        raise ValueError(f"{where}: not a PEFT adapter directory (no {CONFIG_NAME})")
    items = [(DEFAULT_DIR_ADAPTER if subs else None, read_peft_adapter(directory, model))] if top else []
    return items + [(sub, read_peft_adapter(os.path.join(directory, sub), model)) for sub in subs]


def read_peft_adapter(directory: str, model: Optional[nn.Module] = None) -> AdapterData:
    """One PEFT LoRA adapter directory in lora_fused's form; non-adapter weights (``modules_to_save`` heads,
    trained biases) become ``extras`` under the model's own names."""
    where = f"load_lora({directory!r})"
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    try:
        with open(cfg_path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{where}: {CONFIG_NAME} is not a PEFT LoRA config (peft_type={kind!r})")
    bad = [k for k in PEFT_UNSUPPORTED if config.get(k)]
    if bad:
        raise ValueError(f"{where}: the adapter uses PEFT features lora_fused does not support: {bad}")
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise ValueError(f"{where}: only adapter_model.bin (a pickle) is present; lora_fused never unpickles. "
                             "Re-save it with safe_serialization=True")
        raise ValueError(f"{where}: {WEIGHTS_NAME} is missing")
    raw, metadata = read_safetensors(w_path)
    ours: Dict[str, AdapterSpec] = {}
    if META_MODULES in metadata:
        try:
            ours = validate_entries(json.loads(metadata[META_MODULES]), where)
        except (json.JSONDecodeError, ValueError):
            ours = {}
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    pairs, extras = {}, {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if m:
            if tensor.dim() > 2:
                raise ValueError(f"{where}: {m.group(1)!r} has a {tensor.dim()}-D {m.group(2)}: Conv LoRA is not "
                                 "supported (only LoRA on nn.Linear)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif "lora_" in rest:
            raise ValueError(f"{where}: {key!r} is not a LoRA Linear weight (embedding/conv adapters are not supported)")
        else:
            extras[rest] = tensor
    if not pairs:
        raise ValueError(f"{where}: {WEIGHTS_NAME} holds no LoRA adapters")
    modules = NameMap(model) if model is not None else None
    specs, tensors = {}, {}
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: {name!r} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or A.shape[0] < 1:
            raise ValueError(f"{where}: {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}: "
                             "not a LoRA pair")
        key = pattern_key(config.get("alpha_pattern"), name, "alpha_pattern")
        alpha = config["alpha_pattern"][key] if key is not None else config.get("lora_alpha", 8)
        try:
            spec = AdapterSpec(A.shape[1], B.shape[0], A.shape[0], alpha, dropout, use_rslora)
        except ValueError as exc:
            raise ValueError(f"{where}: {name!r}: {exc}") from None
        # our metadata (or the model's own LoRAQKV) tells the exact layout PEFT's form stands for
        candidate = ours.get(name)
        if candidate is None and modules is not None:
            existing = modules.get(name)
            if isinstance(existing, LoRAQKV) and existing.has_active_adapter():
                candidate = existing.spec.with_(lora_dropout=dropout)
        if candidate is not None and _same_function(candidate, spec):
            packed = candidate.from_peft_B(B)
            if packed is not None and tuple(A.shape) == candidate.a_shape:
                spec, B = candidate, packed
        specs[name] = spec
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A, B
    saved = config.get("modules_to_save") or []
    saved_modules = sorted({k.rsplit(".", 1)[0] for k in extras for item in saved
                            if k.rsplit(".", 1)[0] == item or k.rsplit(".", 1)[0].endswith("." + item)})
    return AdapterData(specs, tensors, saved_modules, extras)


def _same_function(candidate: AdapterSpec, peft_spec: AdapterSpec) -> bool:
    """Whether ``candidate`` (lora_fused's layout) written in PEFT's form has ``peft_spec``'s rank and scaling."""
    rank, _ = candidate.peft_rank_alpha()
    return rank == peft_spec.r and (peft_spec.in_features, peft_spec.out_features) == (
        candidate.in_features, candidate.out_features) and math.isclose(candidate.scaling, peft_spec.scaling,
                                                                        rel_tol=1e-6)

