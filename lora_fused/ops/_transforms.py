"""The LoRA op under ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``, …): the same math in plain
differentiable PyTorch operations.

The registered op's autograd (``torch.library.register_autograd``) has no ``torch.func`` rules, so
``torch.func.grad`` over a LoRA layer would fail inside PyTorch. While a transform is active the layers compute

    y = x Wᵀ + b;   y[..., slice_t] += s · (x̂ A_tᵀ) B_tᵀ,   x̂ = m∘x / (1-p)

with standard operators that every transform differentiates and batches. The mask ``m`` is the torch backend's
CPU-form mask (:func:`~lora_fused.kernels.reference.dropout.keep_multiplier_of_size`) drawn on ``x``'s device
from a seed taken from the CPU generator, so ``torch.manual_seed`` reproduces it; on a CPU it is the very mask
the eager route draws for the same generator state. Under ``vmap`` the draw follows ``randomness=``: the
default ``"error"`` refuses dropout in training mode, ``"same"`` gives every sample one mask, and
``"different"`` is refused by PyTorch (the seed is read as a Python number, which ``vmap`` cannot batch).

What this route does not keep: the fused kernels and the saved-memory guarantee (autograd keeps the dropped
``x̂`` and the mask, as a plain-PyTorch LoRA does). A backend named explicitly other than ``"torch"`` cannot run
here and raises; ``"auto"`` and ``"torch"`` take this route.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .._errors import BackendUnavailableError
from ..kernels.reference.dropout import keep_multiplier_of_size
from .onnx import lora_linear_decomposed


def transformed_forward(x: Tensor, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float,
                        lora_slices: Sequence[int], requested: str, draw_seed, where: str) -> Tensor:
    """``y`` (..., N) for checked inputs (``x`` (..., K) and the rest as in :func:`lora_linear_decomposed`);
    ``dropout_p`` the active rate (0 in eval), ``requested`` the backend name asked for, ``draw_seed()`` a fresh
    Python ``int`` seed, ``where`` the caller's name for errors."""
    if requested not in ("auto", "torch"):
        raise BackendUnavailableError(
            f"{where}: lora_fused backend {requested!r} cannot run under torch.func transforms (grad, vmap, jvp, "
            "...); the layers compute with plain PyTorch operations there: use the 'auto' or 'torch' backend"
        )
    x_lora = None
    if dropout_p > 0.0:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        keep = keep_multiplier_of_size(draw_seed(), (rows, x.shape[-1]), dropout_p, x.device, x.dtype)
        x_lora = x * keep.view(x.shape) * (1.0 / (1.0 - dropout_p))
    return lora_linear_decomposed(x, weight, bias, lora_A, lora_B, scaling, lora_slices, x_lora)
