"""lora_fused: fused LoRA layers for PyTorch.

Layers of the package: ``lora_fused.kernels`` (reference, Triton; CUDA in ``csrc/``) → ``lora_fused.ops``
(``torch.library`` custom ops, namespace ``lora_fused::``) → ``lora_fused.modules`` and the model-level APIs.
"""

from ._version import __version__
from ._cuda_ext import CUDA_EXT_AVAILABLE
from ._errors import BackendUnavailableError, LoRADtypeError, LoRAShapeError
from .backends import available_backends, get_backend, set_backend, use_backend
from . import model as _model
from . import ops
from .config import LoraConfig, presets, register_preset
from .modules import LoRAAdapter, LoRABase, LoRALinear, LoRAQKV
from .spec import AdapterSpec
from .model import (
    AdapterCheck,
    check_adapters,
    create_lorafa_optimizer,
    LoadResult,
    LoRAModuleInfo,
    LoRASummary,
    active_adapter,
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapters,
    from_peft,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    lora_summary,
    mark_only_lora_as_trainable,
    merge_lora,
    migrate_lora_qkv,
    save_lora,
    set_adapter,
    unload_lora,
)

__all__ = [
    "__version__",
    "CUDA_EXT_AVAILABLE",
    "BackendUnavailableError",
    "LoRADtypeError",
    "LoRAShapeError",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "ops",
    "LoRABase",
    "LoRALinear",
    "LoRAQKV",
    "LoRAAdapter",
    "AdapterSpec",
    "LoraConfig",
    "presets",
    "register_preset",
] + _model.__all__
