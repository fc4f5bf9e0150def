"""``lora_fused::lora_linear``: the LoRA linear as a ``torch.library`` custom op with autograd and fake impls.

    y = x Wᵀ + b + s · (dropout_p(x) Aᵀ) Bᵀ

Registered ops (namespace ``lora_fused``):

* ``lora_linear(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, lora_slices, backend) -> (y, h)``
  with ``x`` (..., K) (M rows once flattened), ``weight`` (N, K), ``bias`` (N,) or None, ``lora_A`` (T·r, K), ``lora_B`` (ΣN_t, r),
  ``seed`` an int64 one-element tensor (None when ``dropout_p == 0``), ``lora_slices`` the flat
  ``[off_0, n_0, …]`` output columns of each target (``[0, N]`` for a plain layer), ``backend`` the requested
  backend name; returns ``y`` (..., N) and ``h = dropout(x) Aᵀ`` (M, T·r). The op flattens ``x`` itself (so
  a non-contiguous input is saved as it is, not as a copy) and its ``y`` is a fresh tensor, not a view
  (FSDP2 warns about modules returning views).
* ``lora_linear_backward(grad_y, x, weight, lora_A, lora_B, h, seed, scaling, dropout_p, lora_slices, backend,
  needs) -> [dx, dW, db, dA, dB]`` (an empty tensor where ``needs`` is False).

Autograd saves ``x``, ``h`` and the seed (plus the parameters themselves, not copies): no dropped copy of ``x``
and no mask. The dropout mask is regenerated from the seed in backward.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._errors import LoRADtypeError, LoRAShapeError
from ..backends import requested_backend, select_backend

_GRAD_INPUTS = 5  # x, weight, bias, lora_A, lora_B


@torch.library.custom_op("lora_fused::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    lora_slices: List[int],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    x2 = _rows(x)
    impl = select_backend(backend, x2, weight, lora_A, lora_B)
    y, h = impl.forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)
    return _unflatten(y, (*x.shape[:-1], weight.shape[0])), h


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, lora_slices, backend):
    rows = math.prod(x.shape[:-1])
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(rows, lora_A.shape[0])


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _unflatten(t: Tensor, shape) -> Tensor:
    """``t`` viewed as ``shape``, returned as a tensor of its own rather than a view (same storage)."""
    return t if t.shape == shape else t.view(shape).detach()


@torch.library.custom_op("lora_fused::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    h: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    lora_slices: List[int],
    backend: str,
    needs: List[bool],
) -> List[Tensor]:
    x2 = _rows(x)
    impl = select_backend(backend, x2, weight, lora_A, lora_B)
    grads = list(impl.backward(_rows(grad_y), x2, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs))
    if grads[0] is not None:
        grads[0] = _unflatten(grads[0], x.shape)
    return [g if g is not None else x.new_empty(0) for g in grads]


def _grad_shapes(x, weight, lora_A, lora_B, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    return [shape if need else (0,) for shape, need in zip(shapes, needs)]


@_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, h, seed, scaling, dropout_p, lora_slices, backend, needs):
    return [x.new_empty(shape) for shape in _grad_shapes(x, weight, lora_A, lora_B, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, lora_slices, backend = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, weight, lora_A, lora_B, h, seed)
    ctx.hyper = (scaling, dropout_p, list(lora_slices), backend)


def _backward(ctx, grad_y, grad_h):
    x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:_GRAD_INPUTS])
    if not any(needs):
        return (None,) * 10
    scaling, dropout_p, lora_slices, backend = ctx.hyper
    grads = _lora_linear_backward_op(
        grad_y.contiguous(), x, weight, lora_A, lora_B, h, seed, scaling, dropout_p, lora_slices, backend, needs
    )
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


_RANK_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads rank ids over the seed space


def _distributed_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_distributed_rank._dynamo_marked_constant = True  # type: ignore[attr-defined]  (see backends.requested_backend)


def draw_seed(x: Tensor) -> Tensor:
    """A fresh dropout seed: an int64 one-element tensor drawn from the generator of ``x``'s device, so
    ``torch.manual_seed`` reproduces the masks (and activation checkpointing, which restores the RNG state,
    recomputes the same mask). Under ``torch.distributed`` the rank is mixed in, so ranks seeded alike still
    draw different masks."""
    seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
    rank = _distributed_rank()
    if rank:
        seed = seed ^ ((rank * _RANK_MIX) & (2**62 - 1))
    return seed


def _same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device


def prepare_inputs(x, weight, bias, lora_A, lora_B, where: str):
    """Check shapes, dtypes and devices; apply autocast; return ``(x, weight, bias, lora_A, lora_B)`` with
    one dtype. ``where`` names the caller in error messages (e.g. ``"LoRALinear(in_features=768, …)"``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a Tensor input, got {type(x).__name__}")
    in_features = weight.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise LoRAShapeError(
            f"{where}: input of shape {tuple(x.shape)} does not end in in_features={in_features}; "
            f"expected (..., {in_features})"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise LoRAShapeError(f"{where}: lora_A has shape {tuple(lora_A.shape)}, expected (r, {in_features})")
    if lora_B.dim() != 2 or lora_A.shape[0] % lora_B.shape[1] != 0:
        raise LoRAShapeError(f"{where}: lora_B has shape {tuple(lora_B.shape)}, incompatible with lora_A {tuple(lora_A.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(dtype) if bias is not None else None
    elif not _same(x, weight):
        raise LoRADtypeError(
            f"{where}: input is {x.dtype} on {x.device} but the weight is {weight.dtype} on {weight.device}; "
            "cast the input (or use torch.autocast)"
        )
    if x.device != lora_A.device or x.device != lora_B.device or (bias is not None and bias.device != x.device):
        raise LoRADtypeError(f"{where}: input on {x.device} but the bias or adapters are on another device")
    # Adapters kept in another precision (e.g. float32 adapters on a bf16 base) are cast, tracked by autograd.
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return x, weight, bias, lora_A, lora_B


def lora_apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, lora_slices: Sequence[int], where):
    """Shared body of :func:`lora_linear` and :func:`~lora_fused.ops.lora_qkv`: validate, flatten to 2-D,
    draw the seed when dropout is active, call the op, restore the leading dimensions."""
    x, weight, bias, lora_A, lora_B = prepare_inputs(x, weight, bias, lora_A, lora_B, where)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{where}: dropout_p must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x) if p > 0.0 else None
    y, _ = _lora_linear_op(x, weight, bias, lora_A, lora_B, seed, float(scaling), p, list(lora_slices), requested_backend())
    return y


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with exact gradients and a seed-regenerated mask.

    Args:
        x: ``(..., K)`` input.  weight: ``(N, K)``.  bias: ``(N,)`` or None.
        lora_A: ``(r, K)``.  lora_B: ``(N, r)``.  scaling: ``s`` (``alpha / r``).
        dropout_p: dropout rate on the LoRA branch, in [0, 1).  training: dropout is applied only when True.
    Returns:
        ``(..., N)`` output in ``x``'s dtype (the autocast dtype under ``torch.autocast``).
    """
    n_out = weight.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[0] != n_out or lora_A.shape[0] != lora_B.shape[1]:
        raise LoRAShapeError(
            f"lora_linear: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not match "
            f"weight {tuple(weight.shape)}; expected (r, K) and ({n_out}, r)"
        )
    return lora_apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, (0, n_out), "lora_linear")
