"""FLOP formulas of the LoRA ops for ``torch.utils.flop_counter.FlopCounterMode``.

With ``M`` rows, ``K`` inputs, ``N`` outputs, ``T·r`` adapter rows and ``ΣN_t`` adapted outputs (multiply-adds
count 2, bias and dropout count 0, as for ``aten.addmm``):

    forward  = 2·M·K·N + 2·M·K·T·r + 2·M·r·ΣN_t
    backward = 2·M·ΣN_t·r (u = g B, for dx or dA) + 2·M·ΣN_t·r (dB) + 2·M·T·r·K (dA)
             + 2·M·T·r·K + 2·M·N·K (dx) + 2·M·N·K (dW), each term only when that gradient is computed

``FlopCounterMode`` copies the registry when it is created, so the formulas must be registered before.
Importing ``torch.utils.flop_counter`` imports Triton (about a second), which ``import lora_fused`` must not
do: the formulas are registered at once when that module is already imported, else right after it is
imported (a one-shot import hook for that module name only).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys

import torch

_MODULE = "torch.utils.flop_counter"


def lora_linear_flops(x_shape, w_shape, bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``lora_fused::lora_linear`` from its argument shapes."""
    M, K, N = math.prod(x_shape[:-1]), x_shape[-1], w_shape[0]
    return 2 * M * K * N + 2 * M * K * a_shape[0] + 2 * M * b_shape[1] * b_shape[0]


def lora_linear_backward_flops(g_shape, x_shape, w_shape, a_shape, b_shape, h_shape, seed_shape, scaling,
                               dropout_p, lora_slices, backend, needs, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``lora_fused::lora_linear_backward`` from its argument shapes and ``needs``."""
    need_dx, need_dw, _, need_da, need_dlb = needs
    M, N, K = math.prod(g_shape[:-1]), g_shape[-1], w_shape[1]
    Tr, r, n_lora = a_shape[0], b_shape[1], b_shape[0]
    flops = 0
    if need_dx or need_da:
        flops += 2 * M * n_lora * r
    if need_dlb:
        flops += 2 * M * n_lora * r
    if need_da:
        flops += 2 * M * Tr * K
    if need_dx:
        flops += 2 * M * Tr * K + 2 * M * N * K
    if need_dw:
        flops += 2 * M * N * K
    return flops


def _register(module) -> None:
    ops = torch.ops.lora_fused
    formulas = ((ops.lora_linear, lora_linear_flops), (ops.lora_linear_backward, lora_linear_backward_flops))
    for packet, formula in formulas:
        if packet not in module.flop_registry:
            module.register_flop_formula(packet)(formula)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register(module)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Register the formulas now if ``torch.utils.flop_counter`` is imported, else when it is."""
    module = sys.modules.get(_MODULE)
    if module is not None:
        _register(module)
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
