"""Seeded dropout mask of the torch backend, regenerated in backward instead of being stored.

The mask of an ``(M, K)`` input is a pure function of ``(seed, M, K, p, device)``:

    words = M*K/4 int64 words drawn with ``random_`` from a ``torch.Generator`` seeded with ``seed``
    u     = the words viewed as M*K signed 16-bit integers (uniform on [-32768, 32767])
    keep  = u >= keep_threshold_u16(p) - 32768          (probability 1 - round(p*65536)/65536)

``p`` is thus quantized to a multiple of 1/65536 (|error| <= 7.7e-6); the kept values are scaled by
``1/(1-p)``. Drawing 16-bit decisions four to a word is ~3x cheaper on a CPU than ``torch.rand`` per element
(see ``shared/design/KERNELS.md``). Other backends use their own generator (Philox in Triton/CUDA): masks
agree within one backend for one seed, not across backends.
"""

from __future__ import annotations

import torch

_U16 = 65536


def keep_threshold_u16(p: float) -> int:
    """Integer threshold ``t`` in [0, 65536): an element is dropped when its 16-bit draw is below ``t``."""
    return min(int(round(p * _U16)), _U16 - 1)


def dropout_scale(p: float) -> float:
    """Inverted-dropout scale ``1/(1-p)`` applied to kept elements."""
    return 1.0 / (1.0 - p)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep mask of shape ``(rows, cols)`` for dropout rate ``p``, a pure function of ``seed``.

    Args:
        seed: integer seed (any 64-bit value).
        rows, cols: the 2-D shape ``(M, K)`` of the input the mask applies to.
        p: dropout rate in [0, 1).
        device: where to generate the mask (its own ``torch.Generator`` type).
    """
    n = rows * cols
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)
    draws = words.view(torch.int16)[:n].view(rows, cols)
    return draws >= keep_threshold_u16(p) - _U16 // 2
