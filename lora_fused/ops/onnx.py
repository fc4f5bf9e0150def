"""ONNX export of the unmerged LoRA op: a decomposition into standard operators.

While ``torch.onnx.export`` runs (the ``dynamo=True`` exporter and the TorchScript one alike), the LoRA layers
compute their output with plain PyTorch operators instead of the registered op, so the graph holds only
standard ONNX operators (``MatMul``/``Gemm``, ``Add``, ``Mul``, ``Slice``, ``Concat``):

    y = x Wᵀ + b;   y[..., slice_t] += s · (x A_tᵀ) B_tᵀ   for each target t

This is the eval function (no dropout). A layer exported in training mode with dropout active cannot be
written this way (its mask would be a random operator that no runtime reproduces): that raises
:class:`LoRAExportError`, saying to call ``model.eval()`` or to merge the adapters first
(``lora_fused.merge_lora(model)``, then the layers are plain linears).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class LoRAExportError(RuntimeError):
    """A LoRA layer that cannot be exported as it is (e.g. dropout active in training mode)."""


def lora_linear_decomposed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    lora_slices: Sequence[int],
    x_lora: Optional[Tensor] = None,
) -> Tensor:
    """``x Wᵀ + b + s · (x̂ Aᵀ) Bᵀ`` on the targeted output columns, with out-of-place standard operators only.

    Args: ``x`` (..., K); ``weight`` (N, K); ``bias`` (N,) or None; ``lora_A`` (T·r, K); ``lora_B`` (ΣN_t, r);
    ``lora_slices`` the flat ``[off_0, n_0, …]`` output columns of each target; ``x_lora`` the input of the
    low-rank branch ``x̂`` (..., K), e.g. the dropped ``x`` (default: ``x``).
    """
    y = F.linear(x, weight, bias)
    h = F.linear(x if x_lora is None else x_lora, lora_A)
    n_out, r = weight.shape[0], lora_B.shape[1]
    targets, b_off = [], 0
    for t in range(len(lora_slices) // 2):
        off, n = int(lora_slices[2 * t]), int(lora_slices[2 * t + 1])
        targets.append((off, n, t * r, b_off))
        b_off += n
    if len(targets) == 1 and targets[0][:2] == (0, n_out):
        return y + scaling * F.linear(h, lora_B)
    parts, col = [], 0
    for off, n, a_row, b_row in sorted(targets):
        if off > col:
            parts.append(y[..., col:off])
        delta = F.linear(h[..., a_row:a_row + r], lora_B[b_row:b_row + n])
        parts.append(y[..., off:off + n] + scaling * delta)
        col = off + n
    if col < n_out:
        parts.append(y[..., col:])
    return torch.cat(parts, dim=-1)


def export_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, lora_slices, where: str
                   ) -> Tensor:
    """The layer's output while ``torch.onnx.export`` runs (``dropout_p`` is the active rate: 0 in eval)."""
    if dropout_p > 0.0:
        raise LoRAExportError(
            f"{where}: cannot export a LoRA layer with dropout active (training mode, p={dropout_p:g}) to ONNX; "
            "call model.eval() first, or merge the adapters with lora_fused.merge_lora(model) and export the "
            "merged model"
        )
    return lora_linear_decomposed(x, weight, bias, lora_A, lora_B, scaling, lora_slices)
