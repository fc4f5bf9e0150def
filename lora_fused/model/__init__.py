"""Model-level APIs: inject adapters (named, several per model), choose what trains, save/load adapter
checkpoints (safetensors or PEFT's directory format), merge for deployment, summarise, and run PEFT models on
lora_fused's op."""

from .adapters import (
    active_adapter,
    adapter_names,
    delete_adapter,
    disable_adapters,
    set_adapter,
    unload_lora,
)
from .check import AdapterCheck, check_adapters
from .checkpoint import load_lora, save_lora
from .from_peft import from_peft
from .inject import add_adapter, inject_lora
from .lorafa import create_lorafa_optimizer
from .merge import merge_lora
from .migrate import migrate_lora_qkv
from .summary import LoRAModuleInfo, LoRASummary, lora_summary
from .trainable import (
    LoadResult,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
)

__all__ = [
    "inject_lora",
    "add_adapter",
    "set_adapter",
    "active_adapter",
    "adapter_names",
    "disable_adapters",
    "delete_adapter",
    "unload_lora",
    "mark_only_lora_as_trainable",
    "lora_parameters",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora",
    "load_lora",
    "merge_lora",
    "lora_summary",
    "LoRASummary",
    "LoRAModuleInfo",
    "LoadResult",
    "from_peft",
    "check_adapters",
    "AdapterCheck",
    "migrate_lora_qkv",
    "create_lorafa_optimizer",
]
