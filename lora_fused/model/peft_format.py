"""PEFT's adapter directory format (``adapter_config.json`` + ``adapter_model.safetensors``), both ways.

A ``LoRALinear`` is a PEFT LoRA adapter as is. A ``LoRAQKV`` with targets ``T`` (each ``A_t`` (r, K), ``B_t``
(n_t, r)) is written exactly as ONE PEFT adapter of rank ``|T|·r`` over the whole fused qkv Linear:
``A = [A_t; …]`` (the packed ``lora_A``) and ``B`` the block matrix with ``B_t`` in rows ``slice_t`` × columns
``t·r:(t+1)·r`` and zeros elsewhere (so untargeted projections get nothing), with ``lora_alpha`` scaled so the
scaling is unchanged. It computes the same function, with the same shared dropout mask. (PEFT itself cannot
*train* the block structure: further PEFT training fills the zero blocks.) The lora_fused configuration travels
in the safetensors metadata, so :func:`load_lora` turns the block adapter back into a ``LoRAQKV``.
What PEFT's format cannot express raises ``ValueError``: modules with different ``lora_dropout`` or ``use_rslora``
(PEFT has one value for all modules).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Dict, Tuple

import torch
import torch.nn as nn

from ..modules import LoRAQKV
from ._common import lora_modules, module_config
from .trainable import gathered
from .checkpoint import (
    META_MODULES, atomic_write_bytes, read_safetensors, scaling_of, to_cpu, validate_configs,
)

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."

# Config fields that switch PEFT to something other than plain LoRA on a Linear: refused on load.
_UNSUPPORTED = (
    "use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens",
    "arrow_config", "velora_config", "monteclora_config", "kasa_config", "mica", "target_parameters",
    "layer_replication", "trainable_token_indices",
)


def _slices(module: LoRAQKV):
    s = module.lora_slices()
    return [(s[2 * i], s[2 * i + 1]) for i in range(len(s) // 2)]


def block_B(module: LoRAQKV) -> torch.Tensor:
    """PEFT's ``B`` (out_features, T·r) of a LoRAQKV: ``B_t`` on its rows and its rank block, zeros elsewhere."""
    r, B = module.r, gathered(module.lora_B)
    out = B.new_zeros(module.out_features, len(module.targets) * r)
    b_off = 0
    for i, (off, n) in enumerate(_slices(module)):
        out[off:off + n, i * r:(i + 1) * r] = B[b_off:b_off + n]
        b_off += n
    return out


def save_peft(model: nn.Module, directory: str) -> None:
    """Write ``directory/adapter_config.json`` and ``directory/adapter_model.safetensors`` (each atomically)."""
    from safetensors.torch import save as st_save

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_lora(format='peft'): {directory!r} exists and is not a directory")
    modules = list(lora_modules(model))
    dropouts = {float(m.lora_dropout) for _, m in modules}
    rslora = {bool(m.use_rslora) for _, m in modules}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(
            "save_lora(format='peft'): PEFT's format has one lora_dropout and one use_rslora for all modules, but "
            f"this model's adapters use lora_dropout {sorted(dropouts)} and use_rslora {sorted(rslora)}; "
            "use format='safetensors'"
        )
    use_rslora = rslora.pop()
    tensors, ranks, alphas, configs = {}, {}, {}, []
    for name, m in modules:
        t = len(m.targets) if isinstance(m, LoRAQKV) else 1
        tensors[f"{PREFIX}{name}.lora_A.weight"] = gathered(m.lora_A)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = block_B(m) if isinstance(m, LoRAQKV) else gathered(m.lora_B)
        ranks[name] = t * m.r
        alpha = m.lora_alpha
        if t > 1:  # keep the scaling: alpha'/(t·r) == alpha/r, alpha'/sqrt(t·r) == alpha/sqrt(r)
            alpha = alpha * (math.sqrt(t) if use_rslora else t)
        alphas[name] = alpha
        configs.append(dict(name=name, **module_config(m)))
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
        "use_rslora": use_rslora,
        "target_modules": [name for name, _ in modules],
        "exclude_modules": None,
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r0},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != a0},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    metadata = {"format": "pt", META_MODULES: json.dumps(configs)}
    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME), st_save(to_cpu(tensors), metadata=metadata))
    atomic_write_bytes(os.path.join(directory, CONFIG_NAME), (json.dumps(config, indent=2) + "\n").encode())


def _peft_pattern_value(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            continue
    return default


def _as_qkv(cfg_qkv: dict, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """``(lora_A, lora_B)`` packed for a LoRAQKV config from PEFT's block form, or None if ``B`` has non-zero
    entries outside the target blocks (then it is not a LoRAQKV adapter) or the shapes do not fit."""
    r, targets, splits = cfg_qkv["r"], cfg_qkv["targets"], cfg_qkv["splits"]
    if A.shape[0] != len(targets) * r or B.shape != (sum(splits), len(targets) * r):
        return None
    if not math.isclose(scaling_of(cfg_qkv), scaling, rel_tol=1e-6):
        return None
    offsets = {"q": 0, "k": splits[0], "v": splits[0] + splits[1]}
    sizes = dict(zip("qkv", splits))
    mask = torch.zeros_like(B, dtype=torch.bool)
    blocks = []
    for i, t in enumerate(targets):
        rows = slice(offsets[t], offsets[t] + sizes[t])
        mask[rows, i * r:(i + 1) * r] = True
        blocks.append(B[rows, i * r:(i + 1) * r])
    if bool((B[~mask] != 0).any()):
        return None
    return A, torch.cat(blocks, 0)


def read_peft_dir(directory: str, model: nn.Module) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(configs, tensors, extra)`` of a PEFT LoRA adapter directory, in lora_fused's checkpoint form; ``extra``
    holds non-adapter weights PEFT saved (``modules_to_save`` heads, biases) under the model's own names."""
    where = f"load_lora({directory!r})"
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{where}: not a PEFT adapter directory (no {CONFIG_NAME})")
    try:
        with open(cfg_path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: {CONFIG_NAME} is not a PEFT LoRA config (peft_type={config.get('peft_type') if isinstance(config, dict) else None!r})")
    bad = [k for k in _UNSUPPORTED if config.get(k)]
    if bad:
        raise ValueError(f"{where}: the adapter uses PEFT features lora_fused does not support: {bad}")
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise ValueError(f"{where}: only adapter_model.bin (a pickle) is present; lora_fused never unpickles. "
                             "Re-save it with safe_serialization=True")
        raise ValueError(f"{where}: {WEIGHTS_NAME} is missing")
    raw, metadata = read_safetensors(w_path)
    ours = {}
    if META_MODULES in metadata:
        try:
            ours = validate_configs(json.loads(metadata[META_MODULES]), where)
        except (json.JSONDecodeError, ValueError):
            ours = {}
    use_rslora = bool(config.get("use_rslora", False))
    dropout = config.get("lora_dropout", 0.0) or 0.0
    default_alpha = config.get("lora_alpha", 8)
    pairs, extra = {}, {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: unexpected key {key!r} (PEFT keys start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif "lora_" in rest:
            raise ValueError(f"{where}: {key!r} is not a LoRA Linear weight (embedding/conv adapters are not supported)")
        else:
            extra[rest] = tensor
    if not pairs:
        raise ValueError(f"{where}: {WEIGHTS_NAME} holds no LoRA adapters")
    model_modules = dict(model.named_modules())
    configs, tensors = {}, {}
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: {name!r} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or A.shape[0] < 1:
            raise ValueError(f"{where}: {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}: not a LoRA pair")
        r = A.shape[0]
        alpha = _peft_pattern_value(config.get("alpha_pattern"), name, default_alpha)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"{where}: bad lora_alpha {alpha!r} for {name!r}")
        cfg = {"kind": "LoRALinear", "r": r, "lora_alpha": alpha, "lora_dropout": float(dropout),
               "use_rslora": use_rslora, "targets": None, "splits": None,
               "in_features": A.shape[1], "out_features": B.shape[0], "bias": True}
        scaling = scaling_of(cfg)
        # A LoRAQKV where the model has one (or where our metadata says it was one): undo the block form.
        candidate = None
        existing = model_modules.get(name)
        if isinstance(existing, LoRAQKV):
            candidate = module_config(existing)
        elif name in ours and ours[name]["kind"] == "LoRAQKV":
            candidate = dict(ours[name])
        if candidate is not None:
            packed = _as_qkv(candidate, A, B, scaling)
            if packed is not None:
                cfg = dict(candidate, lora_dropout=float(dropout))
                A, B = packed
        if name in ours and ours[name]["kind"] == cfg["kind"] and ours[name]["r"] == cfg["r"]:
            cfg["lora_alpha"] = ours[name]["lora_alpha"]  # exact value, not the rescaled one
        configs[name] = cfg
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A, B
    return configs, tensors, extra
