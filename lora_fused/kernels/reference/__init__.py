"""Pure-PyTorch reference kernels. They define the math every other backend must match and serve as the
``"torch"`` backend (any device)."""

from .dropout import dropout_keep_mask, dropout_scale, hashed_keep_mask, keep_threshold_u16
from .lora_linear import keep_mask, lora_linear_backward_ref, lora_linear_forward_ref

__all__ = [
    "dropout_keep_mask",
    "dropout_scale",
    "hashed_keep_mask",
    "keep_mask",
    "keep_threshold_u16",
    "lora_linear_forward_ref",
    "lora_linear_backward_ref",
]
