"""Seeded dropout mask of the torch backend, regenerated in backward instead of being stored.

The mask of an ``(M, K)`` input is a pure function of the seed, the shape (on the CPU) or the position (the
hashed mask) and ``p``; an element is kept when its 16-bit draw ``u`` is at least ``keep_threshold_u16(p)``, so
``p`` is quantized to a multiple of 1/65536 (|error| <= 7.7e-6), and kept values are scaled by ``1/(1-p)``.

* On the CPU (:func:`dropout_keep_multiplier`, an integer seed), from a ``torch.Generator`` seeded with
  ``seed``, in one of two forms by size (both pure functions of the seed and the shape):

  - up to ``SCRATCH_MAX`` (65536) elements, where host time dominates: ``M*K`` draws ``u`` = the low 16 bits of
    consecutive 32-bit outputs (row-major order), taken by one ``torch.randint`` over the 65536 values shifted
    by ``1 - t`` and clamped to [0, 1]: the mask as a 0/1 multiplier in the input's dtype in two tensor
    operations. The kernels draw these into a buffer their thread reuses (:func:`cpu_keep_multiplier`, the same
    values): for the smallest masks the allocation costs more than the draws themselves.
  - larger masks, where the draws dominate: ``u`` = the 16-bit chunks of consecutive full 64-bit outputs (memory
    order, top bit flipped), compared with the threshold straight into the input's dtype: a quarter of the
    generator's work (0.9 ms against 2.8 ms for a 1576x768 float32 mask on one core) for four more calls.
* On other devices (:func:`hashed_keep_mask`, a one-element seed tensor on the device): a hash of ``(seed,
  row, col)`` computed with fourteen tensor operations: int32 keys per row and per column hashed from the seed
  (vectors of ``3·max(M, K)``), combined on the grid as ``P_row + R_row·Q_col`` into one int32 buffer that two
  in-place fold-and-multiply rounds finish, then one comparison (about 41 bytes moved per element, one int32
  buffer and the boolean result alive). Reading the seed never copies it to the host, so the forward and
  backward passes do not synchronize with the GPU and can be captured in a CUDA graph, and the mask is the same
  on every device (the CPU computes what the GPU does).

Other backends use their own generator (Philox in Triton/CUDA): masks agree within one backend for one seed,
not across backends.
"""

from __future__ import annotations

import functools
import math
import sys
import threading

import torch

_U16 = 65536


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
    ``seed`` and the shape: element ``i`` (row-major) is kept when ``u_i >= keep_threshold_u16(p)``, where, with
    a ``torch.Generator`` seeded with ``seed``,

    * masks of at most ``SCRATCH_MAX`` elements: ``u_i`` is the low 16 bits of its ``i``-th 32-bit output;
    * larger masks: ``u_i`` is the ``i``-th 16-bit chunk, in memory order, of its consecutive full 64-bit outputs,
      with the chunk's top bit flipped (a signed comparison of the chunk with ``t - 32768``).

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
    ``torch.device``, without argument conversions."""
    gen = _seeded(seed, device)
    n = size[0] * size[1]
    if n > SCRATCH_MAX:  # throughput decides: four 16-bit draws per 64-bit word, compared straight into dtype
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
        chunks = words.view(torch.int16)  # memory order; the signed value is u - 32768
        if chunks.numel() != n:
            chunks = chunks[:n]
        keep = torch.empty(size, dtype=dtype, device=device)
        return torch.ge(chunks.view(size), keep_threshold_u16(p) - _U16 // 2, out=keep)
    low = 1 - keep_threshold_u16(p)
    # randint over 65536 values takes (32-bit draw mod 65536) + low; with low = 1 - t the kept draws are >= 1
    # and the dropped ones <= 0, so a clamp to [0, 1] is the multiplier. Integers of that range are exact in
    # float32 and float64; narrower dtypes draw in float32 and convert (0 and 1 are exact everywhere).
    if dtype is _F32 or dtype is _F64:
        return torch.randint(low, low + _U16, size, generator=gen, device=device, dtype=dtype).clamp_(0, 1)
    keep = torch.randint(low, low + _U16, size, generator=gen, device=device, dtype=_F32)
    return keep.clamp_(0, 1).to(dtype)


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    """The thread's generator for ``device`` (made on first use), seeded with ``seed``."""
    try:
        gen = _local.gens[device]
    except (AttributeError, KeyError):
        gen = _generator(device)
    return gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


# elements: CPU masks up to this size (host time dominates) take 32-bit draws, into a reused per-thread buffer in
# the kernels; larger ones (the draws dominate) the 64-bit form
SCRATCH_MAX = 1 << 16
_SCRATCH_KEYS = 8  # (size, dtype) buffers a thread keeps at most (a ninth empties the cache)


def cpu_keep_multiplier(seed: int, size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`keep_multiplier_of_size` on the CPU for a mask that the caller consumes before its thread makes
    another: the same values, but a mask of at most ``SCRATCH_MAX`` elements in ``float32`` or ``float64`` is
    drawn into a buffer this thread reuses for every such mask of that size and dtype (it must not be kept,
    returned or handed to another thread). Where host time dominates (small masks), that saves the
    allocation; larger masks are allocated as usual.

    The draws: ``torch.randint(low, high, size)`` is ``torch.empty(size).random_(low, high)``, so both forms
    give the same values for one seed."""
    try:
        buf = _local.keep_bufs[(size, dtype)]
    except (AttributeError, KeyError):
        buf = _keep_buffer(size, dtype)
        if buf is None:
            return keep_multiplier_of_size(seed, size, p, _CPU, dtype)
    low = 1 - keep_threshold_u16(p)
    return buf.random_(low, low + _U16, generator=_seeded(seed, _CPU)).clamp_(0, 1)


def _keep_buffer(size, dtype: torch.dtype):
    """A new reusable buffer for :func:`cpu_keep_multiplier`, or None where it takes none."""
    size = tuple(size)
    if (dtype is not _F32 and dtype is not _F64) or math.prod(size) > SCRATCH_MAX:
        return None
    try:
        bufs = _local.keep_bufs
    except AttributeError:
        bufs = _local.keep_bufs = {}
    if len(bufs) >= _SCRATCH_KEYS:
        bufs.clear()
    with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
        buf = bufs[(size, dtype)] = torch.empty(size, dtype=dtype, device="cpu")  # whatever the default device
    return buf


_CPU = torch.device("cpu")
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


def _signed(value: int, bits: int) -> int:
    """``value`` (taken modulo ``2**bits``) as the two's-complement integer PyTorch stores in ``bits`` bits."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


# Constants of the hashed mask (see hashed_keep_mask), as the signed values int32 arithmetic takes: the 32-bit
# golden-ratio step of the key counter, the odd multipliers of the key rounds (lowbias32's) and of the grid
# rounds (murmur3's fmix32).
_STEP = _signed(0x9E37_79B9, 32)
_KEY_MUL = (_signed(0x7FEB_352D, 32), _signed(0x846C_A68B, 32))
_GRID_MUL = (_signed(0x85EB_CA6B, 32), _signed(0xC2B2_AE35, 32))
# Which element of a 2-element view is the low half of a wider integer: device memory (CUDA) and the CPUs
# PyTorch runs on are little-endian; a big-endian host's CPU tensors store the high half first.
_LO_CPU = 0 if sys.byteorder == "little" else 1


def _halves(t: torch.Tensor, dtype: torch.dtype):
    """``(low, high)``: views of the low and high halves of every element of a 1-D or 2-D ``t`` as ``dtype`` (half
    as wide), of ``t``'s shape, strided by 2 along the last dimension. Writing one half leaves the other."""
    w = t.view(dtype)
    lo = _LO_CPU if t.is_cpu else 0
    if t.dim() == 1:
        return w[lo::2], w[1 - lo::2]
    return w[:, lo::2], w[:, 1 - lo::2]


def _fold_multiply_(x: torch.Tensor, muls) -> torch.Tensor:
    """``x = fold_16(x)·m mod 2**32`` for each ``m`` of ``muls``, in place on a contiguous int32 ``x`` (1-D or 2-D):
    a bijection of 32-bit values. The fold XORs the high int16 half into the low one (``x ^ (x >> 16)`` with a
    logical shift, without shifting a signed value); the multiply wraps modulo ``2**32`` on CPU and CUDA alike."""
    lo, hi = _halves(x, torch.int16)
    for mul in muls:
        lo.bitwise_xor_(hi)
        x.mul_(mul)
    return x


def hashed_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask ``(rows, cols)`` on ``seed``'s device, a pure function of the seed's 64-bit value, the
    position ``(row, col)`` and ``p``, computed without reading the seed on the host (capturable in a CUDA
    graph) and bit-identical on every device.

    With ``fold_16(x) = x XOR (x >> 16)`` (logical shift), all arithmetic modulo ``2**32``, and ``s_lo``,
    ``s_hi`` the low and high 32 bits of the seed:

    * keys (:func:`hashed_keys`): ``x_i = (s_lo + G·i) XOR s_hi``, then twice ``x_i = fold_16(x_i)·A_k``, for
      ``i < 3·max(rows, cols)``; row ``r`` has ``P_r = x_(3r)`` and ``R_r = x_(3r+1) OR 1``, column ``c`` has
      ``Q_c = x_(3c+2)``;
    * element (:func:`keep_from_keys`): ``v = P_r + R_r·Q_c``, then twice ``v = fold_16(v)·B_k``;
      ``u = ((v + 2**31) mod 2**32) >> 16`` (the high 16 bits with the top one flipped), kept when
      ``u >= keep_threshold_u16(p)``.

    ``G = 0x9E3779B9``, ``A = (0x7FEB352D, 0x846CA68B)``, ``B = (0x85EBCA6B, 0xC2B2AE35)``.

    Args:
        seed: int64 tensor with one element.  rows, cols: the mask's shape.  p: dropout rate in [0, 1).
        device: where to build the mask (default: the seed's device).
    """
    row_add, row_mul, col_keys = hashed_keys(seed, rows, cols, device)
    return keep_from_keys(row_add[:, None], row_mul[:, None], col_keys, p)


def hashed_keys(seed: torch.Tensor, rows: int, cols: int, device=None):
    """``(P, R, Q)``: the int32 keys of :func:`hashed_keep_mask`, ``P_r`` and ``R_r`` (odd) for ``r < rows`` and
    ``Q_c`` for ``c < cols``, strided views of one int32 vector ``x`` of ``3·max(rows, cols)``.

    Each step is a bijection of 32-bit values and the counter ``s_lo + G·i`` (``G`` odd) takes distinct values
    for ``i < 2**32``, so ``P`` and ``Q`` never repeat (for fewer than ``2**32 / 3`` rows or columns): no two
    rows or columns of a mask are alike. The seed's high half enters before both rounds, so the keys of seeds
    ``s`` and ``s + 2**32`` are unrelated; seeds whose low halves differ by ``j·G`` (mod ``2**32``) and whose
    high halves agree share their counters shifted by ``j`` (masks shifted by ``j/3`` rows and columns when 3
    divides ``j``, keys trading roles otherwise), which seeds drawn uniformly from ``[0, 2**62)`` do not meet in
    practice. Eight tensor operations on ``3·max(rows, cols)`` elements; no host read of the seed.

    Args:
        seed: int64 tensor with one element.  rows, cols: how many keys.  device: where (default: the seed's
        device).
    """
    device = seed.device if device is None else device
    s = seed.to(device=device, dtype=torch.int64)
    if s.dim() != 1:
        s = s.reshape(1)
    s_lo, s_hi = _halves(s, torch.int32)
    x = torch.add(s_lo, torch.arange(3 * max(rows, cols), device=device, dtype=torch.int32), alpha=_STEP)
    _fold_multiply_(x.bitwise_xor_(s_hi), _KEY_MUL)
    return x[0 : 3 * rows : 3], x[1 : 3 * rows : 3].bitwise_or_(1), x[2 : 3 * cols : 3]


def keep_from_keys(row_add: torch.Tensor, row_mul: torch.Tensor, col_keys: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep mask of the broadcast shape of the int32 keys (e.g. ``(M, 1)``, ``(M, 1)``, ``(K,)``):
    ``v = P + R·Q``, then twice ``v = fold_16(v)·B_k`` (mod ``2**32``), kept when the high 16 bits of ``v + 2**31``
    are at least ``keep_threshold_u16(p)``. ``R`` must be odd.

    Why this mixing: a multiply only carries bits upward, the fold carries the high half down, and a pair of
    rows or columns draws alike only if some difference between them survives the rounds. Two columns differ by
    ``R_r·(Q' - Q)``, two rows by ``(P' - P) + (R' - R)·Q_c``: both change from element to element (``R`` odd,
    ``Q`` and ``P`` never repeat), unless ``R' = R`` (one pair of rows in ``2**31``), so no fixed difference
    runs along a pair (but ``2**31`` between columns whose ``Q`` differ by ``2**31``, which two rounds absorb).
    A fixed difference can be dangerous: after a sum ``P + Q`` instead, rows whose ``P`` differ by XOR
    ``0x80008000`` correlate by 0.18 through two rounds (the first fold maps that difference to the top bit).
    The rounds themselves: one fold-multiply round leaves small or high-only differences correlated (-0.75 for
    ``v' = v + 1``, -0.58 for ``v + 2**31``, at ``p = 0.5``); two keep every difference tried (small,
    ``m·2**k`` for ``k`` up to 31) below 1 % (0.7 % at most, over ``2**22`` samples).

    Six passes over the grid: ``addcmul`` allocates the one int32 buffer, the folds (an XOR of its int16
    halves) and the multiplies update it in place, and the comparison writes the boolean result. Only integer
    semantics that CPU and CUDA share are used: int32 addition and multiplication wrap modulo ``2**32`` (two's
    complement, as PyTorch's CPU and CUDA kernels compute them), the shift by 16 is a view of the high halves
    (no arithmetic shift of a signed value), and the test is a signed comparison, ``v >= (t - 32768)·65536``.
    """
    v = _fold_multiply_(torch.addcmul(row_add, row_mul, col_keys), _GRID_MUL)
    return torch.ge(v, (keep_threshold_u16(p) - _U16 // 2) * _U16)
