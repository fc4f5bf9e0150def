"""Seeded dropout mask of the torch backend, regenerated in backward instead of being stored.

The mask of an ``(M, K)`` input is a pure function of ``(seed, M, K, p, device type)``; an element is kept
when its 16-bit draw ``u`` is at least ``keep_threshold_u16(p)``, so ``p`` is quantized to a multiple of
1/65536 (|error| <= 7.7e-6), and kept values are scaled by ``1/(1-p)``.

* On the CPU (:func:`dropout_keep_multiplier`, an integer seed): ``M*K`` draws ``u`` = the low 16 bits of
  consecutive 32-bit outputs of a ``torch.Generator`` seeded with ``seed`` (row-major order), taken by one
  ``torch.randint`` over the 65536 values shifted by ``1 - t`` and clamped to [0, 1]: that gives the mask as a
  0/1 multiplier in the input's dtype in two tensor operations, without a boolean mask or a conversion. One
  32-bit draw per element costs more than four 16-bit decisions per 64-bit word (about 1.9 ms against 0.6 ms
  for a 1576x768 mask on one core), but takes three calls fewer per mask, which is what counts where host time
  dominates; a whole CPU training step at ViT-B qkv size (1576x768->2304) moves by less than 1 %.
* On other devices (:func:`hashed_keep_mask`, a one-element seed tensor on the device): a counter-based hash
  of ``(seed, row·K + col)`` computed with tensor operations. Reading the seed never copies it to the host,
  so the forward and backward passes do not synchronize with the GPU and can be captured in a CUDA graph.

Other backends use their own generator (Philox in Triton/CUDA): masks agree within one backend for one seed,
not across backends.
"""

from __future__ import annotations

import functools
import threading

import torch

_U16 = 65536
_M32 = 0xFFFF_FFFF
_MIX = (0x7FEB352D, 0x31848BAB)  # odd multipliers below 2**31: products of 32-bit values stay below 2**63


@functools.lru_cache(maxsize=256)
def keep_threshold_u16(p: float) -> int:
    """Integer threshold ``t`` in [0, 65536): an element is dropped when its 16-bit draw is below ``t``."""
    return min(int(round(p * _U16)), _U16 - 1)


def dropout_scale(p: float) -> float:
    """Inverted-dropout scale ``1/(1-p)`` applied to kept elements."""
    return 1.0 / (1.0 - p)


_local = threading.local()  # one reusable torch.Generator per thread and device (creating one costs a call)


def _generator(device: torch.device) -> torch.Generator:
    try:
        gens = _local.gens
    except AttributeError:
        gens = _local.gens = {}
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    return gen


def dropout_keep_multiplier(seed: int, rows: int, cols: int, p: float, device: torch.device,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keep mask of shape ``(rows, cols)`` as a ``dtype`` tensor of 0 (dropped) and 1 (kept), a pure function of
    ``seed``: element ``i`` (row-major) is kept when ``u_i >= keep_threshold_u16(p)``, ``u_i`` the low 16 bits
    of the ``i``-th 32-bit output of a ``torch.Generator`` seeded with ``seed``.

    Args:
        seed: integer seed (any 64-bit value).
        rows, cols: the 2-D shape ``(M, K)`` of the input the mask applies to.
        p: dropout rate in [0, 1).
        device: where to generate the mask (its own ``torch.Generator`` type).
        dtype: the floating dtype of the result.
    """
    return keep_multiplier_of_size(int(seed), (rows, cols), p, torch.device(device), dtype)


def keep_multiplier_of_size(seed: int, size, p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dropout_keep_multiplier` for a Python ``int`` seed, a ``size`` (a 2-tuple or ``torch.Size``) and a
    ``torch.device``: the form the kernels call on every step, without argument conversions."""
    try:  # the thread's generator for this device (made on first use)
        gen = _local.gens[device]
    except (AttributeError, KeyError):
        gen = _generator(device)
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    # randint over 65536 values takes (32-bit draw mod 65536) + low; with low = 1 - t the kept draws are >= 1
    # and the dropped ones <= 0, so a clamp to [0, 1] is the multiplier. Integers of that range are exact in
    # float32 and float64; narrower dtypes draw in float32 and convert (0 and 1 are exact everywhere).
    low = 1 - keep_threshold_u16(p)
    if dtype is _F32 or dtype is _F64:
        return torch.randint(low, low + _U16, size, generator=gen, device=device, dtype=dtype).clamp_(0, 1)
    keep = torch.randint(low, low + _U16, size, generator=gen, device=device, dtype=_F32)
    return keep.clamp_(0, 1).to(dtype)


_F32, _F64 = torch.float32, torch.float64


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep mask of shape ``(rows, cols)``: :func:`dropout_keep_multiplier` as booleans (the same draws).

    Args:
        seed: integer seed (any 64-bit value).
        rows, cols: the 2-D shape ``(M, K)`` of the input the mask applies to.
        p: dropout rate in [0, 1).
        device: where to generate the mask.
    """
    return dropout_keep_multiplier(seed, rows, cols, p, device).bool()


def _mix32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xorshift-multiply) on int64 tensors holding values in [0, 2**32)."""
    v = v ^ (v >> 16)
    v = (v * _MIX[0]) & _M32
    v = v ^ (v >> 15)
    v = (v * _MIX[1]) & _M32
    return v ^ (v >> 16)


def hashed_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask ``(rows, cols)`` on ``seed``'s device, a pure function of the seed's value and the
    position, computed without reading the seed on the host (capturable in a CUDA graph).

    The element ``i = row·cols + col`` draws ``u = mix(mix(i_lo ^ s_lo) ^ i_hi ^ s_hi) mod 2**16`` with
    ``s_lo``/``s_hi`` and ``i_lo``/``i_hi`` the low and high 32 bits of the seed and of ``i``.

    Args:
        seed: int64 tensor with one element.  rows, cols: the mask's shape.  p: dropout rate in [0, 1).
        device: where to build the mask (default: the seed's device).
    """
    device = seed.device if device is None else device
    s = seed.reshape(()).to(device=device, dtype=torch.int64)
    i = torch.arange(rows * cols, device=device, dtype=torch.int64)
    v = _mix32((i & _M32) ^ (s & _M32))
    v = _mix32(v ^ (i >> 32) ^ ((s >> 32) & _M32))
    return (v & (_U16 - 1)).view(rows, cols) >= keep_threshold_u16(p)
