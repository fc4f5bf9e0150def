"""The eager route of the LoRA op: the same backend functions and saved tensors as the registered op
``lora_fused::lora_linear``, without the ``torch.library`` dispatch around them.

A registered custom op costs, per call, a dispatcher round trip, a redispatch below autograd, argument
normalisation and an autograd wrapper, and its backward another op call: tens of microseconds of host time
per layer and step, more than a LoRA layer's GPU kernels at ViT sizes. When nothing traces the call (no
``torch.compile``/``torch.export``, no JIT tracing, no fake or meta tensors, no tensor subclass, no
``TorchDispatchMode`` such as ``FlopCounterMode``, no ``torch.func`` transform), the op runs here instead: a
``torch.autograd.Function`` when a gradient is needed, the backend's forward alone when not. Everything that
traces or inspects the call still sees the registered op, but for ``torch.func`` transforms, which see plain
operators (:mod:`._transforms`).

Saved for backward (through ``save_for_backward``, so ``saved_tensors_hooks``, activation checkpointing and
offloading see them): ``x``, ``h`` and the seed when the needed gradients require them (:mod:`._grad_plan`),
and ``W``, ``A``, ``B`` when they are computed tensors (e.g. autocast casts). A seed given as a Python ``int``
(CPU inputs of a backend that declares ``cpu_int_seed``) is kept on the context instead. Parameters (leaf
tensors) are kept as plain references, which costs less host time: they are alive anyway, and backward checks
that none was modified in place in between, as autograd would.

The backend is chosen by :func:`lora_fused.backends.backend_for` (remembered per requested name, device,
dtype and adapter shape; ``use_backend``/``set_backend``/``LORA_FUSED_BACKEND`` are read on every call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import backend_for
from ._grad_plan import GRAD_INPUTS, refuse_double_backward

_C = torch._C


def rows(t: Tensor) -> Tensor:
    """``t`` as a 2-D (rows, last dim) tensor."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def unflatten(t: Tensor, shape) -> Tensor:
    """``t`` viewed as ``shape``, returned as a tensor of its own rather than a view (same storage)."""
    return t if t.shape == shape else t.view(shape).detach()


def eligible(x: Tensor) -> bool:
    """Whether this call may skip the registered op: nothing traces, fakes or intercepts it."""
    return not (
        torch.compiler.is_compiling()
        or type(x) is not Tensor
        or x.is_meta
        or _C._is_tracing()
        or _C._len_torch_dispatch_stack()
        or _C._are_functorch_transforms_active()
    )


class _LoRAFunction(torch.autograd.Function):
    """Autograd of the eager route. ``seed``: a one-element tensor, a Python ``int`` or None;
    ``hyper`` = (scaling, dropout_p, lora_slices, backend object)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, seed, hyper):
        scaling, dropout_p, lora_slices, impl = hyper
        x2 = rows(x)
        y, h = impl.forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)
        # what backward keeps (._grad_plan.keeps, inlined: this runs on every training step)
        need_dx, need_dw, _, need_da, need_dlb, _, _ = ctx.needs_input_grad
        if dropout_p > 0.0 and not (need_dx or need_da):
            seed, ctx.hyper = None, (scaling, 0.0, lora_slices, impl)  # no mask in backward: dB and dW do not need it
        else:
            ctx.hyper = hyper
            if seed.__class__ is int:
                ctx.host_seed, seed = seed, None
        if weight.is_leaf and lora_A.is_leaf and lora_B.is_leaf:
            ctx.save_for_backward(x if need_da or need_dw else None, h if need_dlb else None, seed)
            ctx.params = (weight, lora_A, lora_B)
            ctx.versions = (weight._version, lora_A._version, lora_B._version)
        else:
            ctx.save_for_backward(x if need_da or need_dw else None, h if need_dlb else None, seed,
                                  weight, lora_A, lora_B)
            ctx.params = None
        return y if x2 is x else unflatten(y, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad_y):
        if _C.is_grad_enabled():
            refuse_double_backward(True)
        params = ctx.params
        if params is None:
            x, h, seed, weight, lora_A, lora_B = ctx.saved_tensors
        else:
            x, h, seed = ctx.saved_tensors
            weight, lora_A, lora_B = params
            if (weight._version, lora_A._version, lora_B._version) != ctx.versions:
                raise RuntimeError(
                    "lora_fused: a weight or adapter needed for the LoRA gradient was modified by an inplace "
                    "operation between forward and backward"
                )
        scaling, dropout_p, lora_slices, impl = ctx.hyper
        if seed is None and dropout_p > 0.0:
            seed = ctx.host_seed
        flat = grad_y.dim() == 2  # x has grad_y's leading dimensions
        dx, dW, db, dA, dB = impl.backward(
            (grad_y if flat else rows(grad_y)).contiguous(), x if flat or x is None else rows(x), weight, lora_A,
            lora_B, h, scaling, dropout_p, seed, lora_slices, ctx.needs_input_grad[:GRAD_INPUTS],
        )
        if dx is not None and not flat:
            dx = unflatten(dx, (*grad_y.shape[:-1], weight.shape[1]))
        return dx, dW, db, dA, dB, None, None


def run(x, weight, bias, lora_A, lora_B, seed, scaling: float, dropout_p: float, lora_slices, impl=None):
    """``y`` of the op for checked inputs of one dtype and device (see ``prepare_inputs``); ``impl``: the backend
    object when the caller has chosen it (:func:`lora_fused.backends.backend_for`)."""
    if impl is None:
        impl = backend_for(x, weight, lora_A, lora_B)
    if _C.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        return _LoRAFunction.apply(x, weight, bias, lora_A, lora_B, seed, (scaling, dropout_p, lora_slices, impl))
    x2 = rows(x)
    y = impl.forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices)[0]
    return y if x2 is x else unflatten(y, (*x.shape[:-1], weight.shape[0]))
