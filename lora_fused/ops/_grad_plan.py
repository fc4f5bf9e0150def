"""What the backward pass of the LoRA op needs, shared by the registered op's autograd and the eager path.

With ``x̂ = m∘x/(1-p)`` (``m`` the keep mask, regenerated from the seed), ``g`` the output gradient and
``dh = s·g B`` (per target):

    dx = g W + m∘(dh A)/(1-p)     needs W, A, B and the seed (not x)
    dW = gᵀ x                      needs x
    db = Σ_rows g                  needs nothing saved
    dA = dhᵀ x̂                     needs x, B and the seed
    dB = s · gᵀ h                  needs h = x̂ Aᵀ only

So ``x`` is kept only when ``dA`` or ``dW`` is needed, ``h`` only when ``dB`` is, and the seed only when the
mask is (``dx`` or ``dA`` with ``p > 0``). Without the mask, the backend is called with ``p = 0`` and no seed:
``dB``, ``dW`` and ``db`` do not depend on ``p`` (``h`` already carries the mask and the ``1/(1-p)``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor

GRAD_INPUTS = 5  # x, weight, bias, lora_A, lora_B: the op inputs that can have a gradient


def keeps(needs: Sequence[bool], dropout_p: float) -> Tuple[bool, bool, bool]:
    """``(keep_x, keep_h, keep_seed)`` for the gradients ``needs`` = (dx, dW, db, dA, dB)."""
    need_dx, need_dw, _, need_da, need_dlb = needs[:GRAD_INPUTS]
    return bool(need_da or need_dw), bool(need_dlb), bool(dropout_p > 0.0 and (need_dx or need_da))


def saved(x: Tensor, h: Tensor, seed: Optional[Tensor], needs: Sequence[bool], dropout_p: float):
    """``(x or None, h or None, seed or None, p for the backward)``: what backward keeps of the forward."""
    keep_x, keep_h, keep_seed = keeps(needs, dropout_p)
    return (x if keep_x else None, h if keep_h else None, seed if keep_seed else None,
            dropout_p if keep_seed else 0.0)


def refuse_double_backward(grad_enabled: bool) -> None:
    if grad_enabled:
        raise RuntimeError(
            "lora_fused: the LoRA op has no double backward (create_graph=True); its gradients are not differentiable"
        )
