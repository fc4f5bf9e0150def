"""Guarded import of the optional compiled CUDA extension (built from ``csrc/`` by ``setup.py``).

``CUDA_EXT_AVAILABLE`` says whether it loaded; ``CUDA_EXT_ERROR`` says why not.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch  # noqa: F401  (the extension links against libtorch)

_C = None
CUDA_EXT_AVAILABLE = False
CUDA_EXT_ERROR: Optional[str] = None

try:
    _C = importlib.import_module("lora_fused._C")
    CUDA_EXT_AVAILABLE = True
except ModuleNotFoundError:
    CUDA_EXT_ERROR = (
        "the CUDA extension lora_fused._C is not built (it needs nvcc and the CUTLASS headers at install time: "
        "pip install nvidia-cutlass && LORA_FUSED_FORCE_CUDA=1 pip install --no-build-isolation -e .)"
    )
except ImportError as exc:  # built for another torch / CUDA runtime
    CUDA_EXT_ERROR = (
        f"the CUDA extension lora_fused._C failed to load ({exc}); it must be rebuilt against the torch that "
        f"imports it (torch {torch.__version__}): LORA_FUSED_FORCE_CUDA=1 pip install --no-build-isolation -e ."
    )
