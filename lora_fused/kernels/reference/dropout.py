"""Seeded dropout mask of the torch backend, regenerated in backward instead of being stored.

The mask of an ``(M, K)`` input is a pure function of ``(seed, M, K, p, device type)``; an element is kept
when its 16-bit draw ``u`` is at least ``keep_threshold_u16(p)``, so ``p`` is quantized to a multiple of
1/65536 (|error| <= 7.7e-6), and kept values are scaled by ``1/(1-p)``.

* On the CPU (:func:`dropout_keep_mask`, an integer seed): ``M*K/4`` int64 words drawn with ``random_`` from
  a ``torch.Generator`` seeded with ``seed``, viewed as ``M*K`` 16-bit integers. Four decisions per word are
  about 3x cheaper on a CPU than one ``torch.rand`` per element.
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
    gens = getattr(_local, "gens", None)
    if gens is None:
        gens = _local.gens = {}
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    return gen


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep mask of shape ``(rows, cols)`` for dropout rate ``p``, a pure function of ``seed``.

    Args:
        seed: integer seed (any 64-bit value).
        rows, cols: the 2-D shape ``(M, K)`` of the input the mask applies to.
        p: dropout rate in [0, 1).
        device: where to generate the mask (its own ``torch.Generator`` type).
    """
    n = rows * cols
    gen = _generator(device if isinstance(device, torch.device) else torch.device(device))
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    # (rows, cols/4) words are the same row-major bits as n/4 flat words: one view less when cols % 4 == 0
    words = torch.empty((rows, cols // 4) if cols % 4 == 0 else ((n + 3) // 4,), dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)
    draws = words.view(torch.int16)
    if cols % 4:
        draws = draws.narrow(0, 0, n).view(rows, cols)
    return draws >= keep_threshold_u16(p) - _U16 // 2


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
