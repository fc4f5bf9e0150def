"""Shared pieces of the Triton kernels: the dropout RNG, dot precision, per-architecture autotuning, launching.

Dropout RNG (used by every kernel that touches the mask, so forward and backward agree bit for bit):

    group  = col // 8,  lane = col % 8
    w0..w3 = Philox-4x32-10(key = seed, counter = (group, row, 0, 0))     # 128 random bits per 8 columns
    u16    = 16-bit half (lane % 2) of word w[lane // 2]
    keep   = u16 >= t,  t = round(p · 65536)   (``keep_threshold_u16``)

The mask is a pure function of ``(seed, row, col)`` (not of the tile shape, the kernel or the launch), so any
kernel can regenerate any tile's mask without coordinating offsets, and one Philox call yields 8 keep
decisions. ``p`` is quantized to a multiple of 1/65536 (|error| ≤ 7.7e-6); kept values are scaled by the exact
``1/(1-p)``. Counters are 32-bit per coordinate: rows < 2³² and columns < 2³⁵, so no wrap-around in practice.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, List, Sequence

import torch
import triton
import triton.language as tl

from ..reference.dropout import dropout_scale, keep_threshold_u16

__all__ = ["keep_tile", "interpreting", "dot_precision", "dropout_args", "tuned", "next_pow2"]


def interpreting() -> bool:
    """True when kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 uses tf32 only where PyTorch allows it; fp16/bf16 accumulate in fp32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dropout_args(dropout_p: float, seed, fallback: torch.Tensor):
    """``(seed_ptr_tensor, threshold, scale, has_dropout)`` for a launch; ``seed`` stays on the device."""
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("dropout_p > 0 needs a seed tensor")
        return seed, keep_threshold_u16(dropout_p), dropout_scale(dropout_p), True
    return fallback, 0, 1.0, False


@triton.jit
def keep_tile(seed, rows, k0, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep mask (bool [BLOCK_M, BLOCK_K]) of columns ``k0 … k0+BLOCK_K`` (``k0 % 8 == 0``) of ``rows``.

    One Philox-4x32 call per 8 columns: 4 words × 2 halves = 8 decisions at 16-bit resolution."""
    G: tl.constexpr = BLOCK_K // 8
    groups = (k0 // 8 + tl.arange(0, G)).to(tl.int32)
    c0 = tl.broadcast_to(groups[None, :], (BLOCK_M, G))
    c1 = tl.broadcast_to(rows.to(tl.int32)[:, None], (BLOCK_M, G))
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
    lane = tl.arange(0, 8)[None, None, :]
    word = tl.where(
        lane < 4,
        tl.where(lane < 2, w0[:, :, None], w1[:, :, None]),
        tl.where(lane < 6, w2[:, :, None], w3[:, :, None]),
    )
    u16 = (word >> ((lane % 2) * 16).to(tl.uint32)) & 0xFFFF
    u16 = tl.reshape(u16, (BLOCK_M, BLOCK_K))
    return u16 >= threshold


def _arch_key(device: torch.device) -> str:
    if interpreting() or device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def autotune_enabled() -> bool:
    """``LORA_FUSED_TRITON_AUTOTUNE=0`` runs the first config (of those that fit the GPU's shared memory) of each
    list: no benchmarking, fewer compiles."""
    return os.environ.get("LORA_FUSED_TRITON_AUTOTUNE", "1") not in ("0", "", "false", "False")


# Opt-in shared memory per block by compute-capability major, when torch does not report it.
_SMEM_FALLBACK = {9: 232448, 8: 166912}


@functools.lru_cache(maxsize=None)
def smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    reported = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    return reported or _SMEM_FALLBACK.get(props.major, 101376)


def device_smem_limit(device: torch.device) -> int:
    return smem_limit(device.index if device.index is not None else torch.cuda.current_device())


def pick_configs(configs, estimate, limit: int, elem: int, meta: dict, full: bool):
    """The configs whose estimated shared memory (``estimate(meta+config, elem)``) fits ``limit`` (the smallest
    one when none does); only the first of them when ``full`` is False."""
    def need(c):
        return estimate({**meta, **c.kwargs, "num_stages": c.num_stages}, elem)

    fits = [c for c in configs if need(c) <= limit] or [min(configs, key=need)]
    return fits if full else fits[:1]


class tuned:
    """A ``@triton.jit`` kernel wrapped in ``triton.autotune`` with the config list of the device's architecture.

    ``configs`` maps ``"sm90"``, ``"sm80"`` and ``"interpret"`` to lists of ``triton.Config`` (first = the
    default when autotuning is off); the autotuner is built once per architecture, keyed on the shapes named
    in ``key`` (M enters as ``M_KEY``, its next power of two, so varying batch sizes do not re-tune each time).
    ``smem(meta, elem_size)`` estimates a config's shared memory (pipelined tiles); configs that cannot fit the
    device are pruned before any compile. ``kernel(device)[grid](*args, **kwargs)`` launches."""

    def __init__(self, fn, configs: Dict[str, List["triton.Config"]], key: Sequence[str], reset_to_zero=None,
                 smem=None):
        self.fn, self.configs, self.key, self.reset_to_zero, self.smem = fn, configs, list(key), reset_to_zero, smem

    @functools.lru_cache(maxsize=None)
    def _for(self, arch: str, full: bool):
        estimate = self.smem

        def prune(configs, named_args, **kwargs):
            if estimate is None:
                return list(configs) if full else list(configs)[:1]
            tensor = next(v for v in named_args.values() if torch.is_tensor(v))
            limit = device_smem_limit(tensor.device)
            return pick_configs(configs, estimate, limit, tensor.element_size(), {**named_args, **kwargs}, full)

        return triton.autotune(configs=self.configs[arch], key=self.key, reset_to_zero=self.reset_to_zero,
                               prune_configs_by={"early_config_prune": prune})(self.fn)

    def __call__(self, device: torch.device):
        return self._for(_arch_key(device), autotune_enabled())
