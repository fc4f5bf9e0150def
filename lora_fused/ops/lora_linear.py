"""``lora_fused::lora_linear``: the LoRA linear as a ``torch.library`` custom op with autograd and fake impls.

    y = x Wᵀ + b + s · (dropout_p(x) Aᵀ) Bᵀ

Registered ops (namespace ``lora_fused``):

* ``lora_linear(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, lora_slices, backend) -> (y, h)``
  with ``x`` (..., K) (M rows once flattened), ``weight`` (N, K), ``bias`` (N,) or None, ``lora_A`` (T·r, K),
  ``lora_B`` (ΣN_t, r), ``seed`` an int64 one-element tensor (None when ``dropout_p == 0``), ``lora_slices``
  the flat ``[off_0, n_0, …]`` output columns of each target (``[0, N]`` for a plain layer), ``backend`` the
  requested backend name; returns ``y`` (..., N) and ``h = dropout(x) Aᵀ`` (M, T·r). The op flattens ``x``
  itself (so a non-contiguous input is saved as it is, not as a copy) and its ``y`` is a fresh tensor, not a
  view (FSDP2 warns about modules returning views).
* ``lora_linear_backward(grad_y, x, weight, lora_A, lora_B, h, seed, scaling, dropout_p, lora_slices, backend,
  needs) -> [dx, dW, db, dA, dB]`` (an empty tensor where ``needs`` is False); ``x`` is None when neither dA
  nor dW is needed, ``h`` None when dB is not. ``grad_y`` is (..., N) and ``dx`` has its leading dimensions.

Autograd saves only what the needed gradients require (:mod:`lora_fused.ops._grad_plan`): ``x`` for dA or dW,
``h`` for dB, the seed for the mask of dx or dA; never a dropped copy of ``x`` nor the mask, which backward
regenerates from the seed.

Two routes run the same backend functions. ``torch.compile``, ``torch.export``, tracing, fake/meta tensors and
any active ``TorchDispatchMode`` (e.g. ``FlopCounterMode``) see the registered op. Plain eager calls take a
shorter route with the same math and the same saved tensors (:mod:`lora_fused.ops._eager`): the
``torch.library`` dispatch costs tens of microseconds of host time per layer and step, more than the layer's
GPU kernels at ViT sizes. On that route a backend that declares ``cpu_int_seed`` (the torch backend) gets the
seed of CPU inputs as a Python ``int`` (:func:`draw_host_seed`, the same value :func:`draw_seed` draws), kept
on the autograd context instead of a saved one-element tensor. Under ``torch.func`` transforms (``grad``,
``vmap``, ``jvp``), for which the registered op has no rules, the layers compute the same function with plain
operators instead (:mod:`lora_fused.ops._transforms`).
"""

from __future__ import annotations

import math
import sys
import threading
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._errors import LoRADtypeError, LoRAShapeError
from ..backends import backend_for_parts, requested_backend, select_backend
from . import _eager
from ._eager import rows as _rows, unflatten as _unflatten
from ._grad_plan import GRAD_INPUTS, saved
from ._transforms import transformed_forward

_C = torch._C


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


@torch.library.custom_op("lora_fused::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: Tensor,
    x: Optional[Tensor],
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    h: Optional[Tensor],
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    lora_slices: List[int],
    backend: str,
    needs: List[bool],
) -> List[Tensor]:
    g2 = _rows(grad_y)
    x2 = _rows(x) if x is not None else None
    # ``grad_y`` stands in for ``x`` in the choice when x was not kept: same device and dtype, also 2-D.
    impl = select_backend(backend, x2 if x2 is not None else g2, weight, lora_A, lora_B)
    grads = list(impl.backward(g2, x2, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs))
    if grads[0] is not None:
        grads[0] = _unflatten(grads[0], (*grad_y.shape[:-1], weight.shape[1]))
    return [g if g is not None else grad_y.new_empty(0) for g in grads]


@_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, h, seed, scaling, dropout_p, lora_slices, backend, needs):
    shapes = ((*grad_y.shape[:-1], weight.shape[1]), weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    return [grad_y.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, lora_slices, backend = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    x_kept, h_kept, seed_kept, p_backward = saved(x, h, seed, ctx.needs_input_grad, dropout_p)
    ctx.save_for_backward(x_kept, weight, lora_A, lora_B, h_kept, seed_kept)
    ctx.hyper = (scaling, p_backward, list(lora_slices), backend)


def _backward(ctx, grad_y, grad_h):
    x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:GRAD_INPUTS])
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
_DIST_AVAILABLE = torch.distributed.is_available()  # a property of the build: read once


def _distributed_rank() -> int:
    return torch.distributed.get_rank() if _DIST_AVAILABLE and torch.distributed.is_initialized() else 0


_distributed_rank._dynamo_marked_constant = True  # type: ignore[attr-defined]  (see backends.requested_backend)


def _rank_mix() -> int:
    """What is XOR-ed into this process's dropout seeds: a value in [0, 2**62) spread from the rank under
    ``torch.distributed`` (0 on rank 0 and without it)."""
    if _DIST_AVAILABLE and torch.distributed.is_initialized():
        return (_distributed_rank() * _RANK_MIX) & (2**62 - 1)
    return 0


def draw_seed(x: Tensor) -> Tensor:
    """A fresh dropout seed: an int64 one-element tensor drawn from the generator of ``x``'s device, so
    ``torch.manual_seed`` reproduces the masks (and activation checkpointing, which restores the RNG state,
    recomputes the same mask). Under ``torch.distributed`` the rank is mixed in, so ranks seeded alike still
    draw different masks."""
    seed = torch.randint(2**62, (1,), device=x.device)  # int64, uniform in [0, 2**62)
    mix = _rank_mix()
    return seed ^ mix if mix else seed


_host = threading.local()  # per thread: the one-element int64 tensor draw_host_seed draws into


def draw_host_seed() -> int:
    """:func:`draw_seed` for a CPU input, as a Python ``int``: the same draw from the CPU generator (the same
    value for the same generator state, the rank mixed in alike), without a tensor to allocate, save for
    backward and read back; drawn into a per-thread buffer."""
    try:
        buf = _host.buf
    except AttributeError:
        with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
            buf = _host.buf = torch.empty(1, dtype=torch.int64, device="cpu")  # whatever the default device
    return buf.random_(0, 2**62).item() ^ _rank_mix()  # what torch.randint(2**62, (1,)) draws, mixed alike


def _fresh_host_seed() -> int:
    """:func:`draw_host_seed` drawn into a new tensor (the same value): ``torch.func`` transforms refuse an
    in-place draw into a tensor they did not see come in."""
    return int(torch.randint(2**62, (1,), device="cpu")) ^ _rank_mix()


_AUTOCAST_DEVICE_TYPES: dict = {}  # device type -> whether torch.autocast exists for it (not for "meta")


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None."""
    device_type = device.type
    ok = _AUTOCAST_DEVICE_TYPES.get(device_type)
    if ok is None:
        ok = _AUTOCAST_DEVICE_TYPES[device_type] = torch.amp.is_autocast_available(device_type)
    if ok and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _name(where) -> str:
    return where() if callable(where) else where


def _shape_error(x, weight, lora_A, lora_B, where) -> LoRAShapeError:
    in_features = weight.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        return LoRAShapeError(
            f"{_name(where)}: input of shape {tuple(x.shape)} does not end in in_features={in_features}; "
            f"expected (..., {in_features})"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        return LoRAShapeError(f"{_name(where)}: lora_A has shape {tuple(lora_A.shape)}, expected (r, {in_features})")
    return LoRAShapeError(
        f"{_name(where)}: lora_B has shape {tuple(lora_B.shape)}, incompatible with lora_A {tuple(lora_A.shape)}"
    )


def prepare_inputs(x, weight, bias, lora_A, lora_B, where):
    """Check shapes, dtypes and devices; apply autocast; return ``(x, weight, bias, lora_A, lora_B)`` with
    one dtype. ``where`` names the caller in error messages (e.g. ``"LoRALinear(in_features=768, …)"``), or is
    a callable returning that name (called only to build an error message)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{_name(where)}: expected a Tensor input, got {type(x).__name__}")
    xs, a_shape, b_shape, K = x.shape, lora_A.shape, lora_B.shape, weight.shape[1]
    if (not xs or xs[-1] != K or len(a_shape) != 2 or a_shape[1] != K or len(b_shape) != 2 or not b_shape[1]
            or a_shape[0] % b_shape[1]):
        raise _shape_error(x, weight, lora_A, lora_B, where)
    device = x.device
    if _C._is_any_autocast_enabled():
        autocast = _autocast_dtype(device)
        if autocast is not None:
            x, weight = x.to(autocast), weight.to(autocast)
    dtype = x.dtype
    if weight.dtype != dtype or weight.device != device:
        raise LoRADtypeError(
            f"{_name(where)}: input is {x.dtype} on {x.device} but the weight is {weight.dtype} on {weight.device}; "
            "cast the input (or use torch.autocast)"
        )
    if lora_A.device != device or lora_B.device != device or (bias is not None and bias.device != device):
        raise LoRADtypeError(f"{_name(where)}: input on {device} but the bias or adapters are on another device")
    # Adapters kept in another precision (e.g. float32 adapters on a bf16 base) are cast, tracked by autograd.
    if lora_A.dtype != dtype:
        lora_A = lora_A.to(dtype)
    if lora_B.dtype != dtype:
        lora_B = lora_B.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return x, weight, bias, lora_A, lora_B


def _onnx_exporting() -> bool:
    # torch.onnx is imported only by an export: when it is absent, nothing is exporting (and importing it
    # here would cost every call).
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


_onnx_exporting._dynamo_marked_constant = True  # type: ignore[attr-defined]  (see backends.requested_backend)


def lora_apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, lora_slices: Sequence[int], where):
    """Shared body of :func:`lora_linear`, :func:`~lora_fused.ops.lora_qkv` and the modules: validate, apply
    autocast, draw the seed when dropout is active, run the op (by the eager route when nothing traces it).

    ``lora_slices``: the flat ``[off_0, n_0, …]`` output columns of each target; ``where``: the caller's name
    for error messages, or a callable returning it."""
    # The common call first, checked with as little work as possible (this runs once per layer and step): a plain
    # tensor, no autocast, one dtype and device, shapes that agree, nothing tracing it. Anything else takes the
    # full checks below, which cast or raise the error that names the problem.
    if type(x) is Tensor and not _C._is_any_autocast_enabled():
        dtype, device = x.dtype, x.device
        xs, a_shape, b_shape, K = x.shape, lora_A.shape, lora_B.shape, weight.shape[1]
        if (weight.dtype is dtype and lora_A.dtype is dtype and lora_B.dtype is dtype
                and weight.device == device and lora_A.device == device and lora_B.device == device
                and (bias is None or (bias.dtype is dtype and bias.device == device))
                and xs and xs[-1] == K and len(a_shape) == 2 and a_shape[1] == K and len(b_shape) == 2
                and b_shape[1] and not a_shape[0] % b_shape[1] and 0.0 <= dropout_p < 1.0 and _eager.eligible(x)):
            impl = backend_for_parts(device, dtype, a_shape, b_shape, x, weight, lora_A, lora_B)
            if training and dropout_p > 0.0:
                seed = draw_host_seed() if impl.cpu_int_seed and x.is_cpu else draw_seed(x)
                return _eager.run(x, weight, bias, lora_A, lora_B, seed, float(scaling), float(dropout_p),
                                  lora_slices, impl)
            return _eager.run(x, weight, bias, lora_A, lora_B, None, float(scaling), 0.0, lora_slices, impl)
    x, weight, bias, lora_A, lora_B = prepare_inputs(x, weight, bias, lora_A, lora_B, where)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_name(where)}: dropout_p must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if _eager.eligible(x):
        seed = draw_seed(x) if p > 0.0 else None
        return _eager.run(x, weight, bias, lora_A, lora_B, seed, float(scaling), p, lora_slices)
    if _C._are_functorch_transforms_active():
        return transformed_forward(x, weight, bias, lora_A, lora_B, float(scaling), p, lora_slices,
                                   requested_backend(), _fresh_host_seed, _name(where))
    if _onnx_exporting():
        from .onnx import export_forward

        return export_forward(x, weight, bias, lora_A, lora_B, float(scaling), p, lora_slices, _name(where))
    seed = draw_seed(x) if p > 0.0 else None
    y, _ = _lora_linear_op(
        x, weight, bias, lora_A, lora_B, seed, float(scaling), p, list(lora_slices), requested_backend()
    )
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
