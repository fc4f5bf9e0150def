"""Run tests/test_cuda_backend.py on the CPU against a Python stand-in for ``lora_fused._C``.

This checks the TEST FILE (its shapes, references, tolerances, API use) and the Python wrapper
``lora_fused/backends/cuda_backend.py`` on a machine without a GPU, so that GPU time is not spent on a broken
test. It says nothing about the CUDA kernels: the stand-in computes the kernels' math (fp32 accumulation,
``h``/``dh`` rounded to the input dtype, the documented Philox mask) with torch ops.

    python csrc/tools/dry_run_gpu_tests.py [pytest args]
"""

from __future__ import annotations

import os
import sys
import types

import torch

_MASK32 = 0xFFFFFFFF


def philox_keep(seed: int, rows: int, cols: int, p: float) -> torch.Tensor:
    """Vectorized Philox-4x32-10 keep mask, counter (col // 8, row, 0, 0), key (seed_lo, seed_hi)."""
    thr = min(round(p * 65536), 65535)
    groups = (cols + 7) // 8
    c0 = torch.arange(groups, dtype=torch.int64).repeat(rows)
    c1 = torch.arange(rows, dtype=torch.int64).repeat_interleave(groups)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57  # wraps mod 2**64: the low 64 bits are what we need
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    words = torch.stack([c0, c1, c2, c3], dim=1)  # (rows*groups, 4)
    u = torch.stack([(words[:, i // 2] >> (16 * (i % 2))) & 0xFFFF for i in range(8)], dim=1)
    return (u >= thr).view(rows, groups * 8)[:, :cols]


def _slices(flat):
    out, boff = [], 0
    for t in range(len(flat) // 2):
        out.append((t, flat[2 * t], flat[2 * t + 1], boff))
        boff += flat[2 * t + 1]
    return out


def _keep(seed, x, p):
    if p <= 0:
        return None
    return philox_keep(int(seed.reshape(-1)[0].item()), x.shape[0], x.shape[1], p)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices):
    r = lora_B.shape[1]
    keep = _keep(seed, x, dropout_p)
    xf = x.float() if keep is None else x.float() * keep
    h = (xf @ lora_A.float().t() * (1 / (1 - dropout_p) if keep is not None else 1.0)).to(x.dtype)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y += bias.float()
    for t, off, n, boff in _slices(lora_slices):
        y[:, off:off + n] += scaling * h[:, t * r:(t + 1) * r].float() @ lora_B[boff:boff + n].float().t()
    return y.to(x.dtype), h


def backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs):
    assert x is not None or not (needs[1] or needs[3]), "x is needed for dA and dW"
    assert h is not None or not needs[4], "h is needed for dB"
    r = lora_B.shape[1]
    M, K = grad_y.shape[0], weight.shape[1]
    g = grad_y.float()
    dh = torch.zeros(M, lora_A.shape[0])
    dB = torch.zeros(lora_B.shape)
    for t, off, n, boff in _slices(lora_slices):
        dh[:, t * r:(t + 1) * r] = scaling * g[:, off:off + n] @ lora_B[boff:boff + n].float()
        if needs[4]:
            dB[boff:boff + n] = scaling * g[:, off:off + n].t() @ h[:, t * r:(t + 1) * r].float()
    keep = None
    if dropout_p > 0 and (needs[0] or needs[3]) and M:
        keep = philox_keep(int(seed.reshape(-1)[0].item()), M, K, dropout_p)
    inv = 1 / (1 - dropout_p) if keep is not None else 1.0
    dh = (dh * inv).to(grad_y.dtype).float()  # dh' = dh / (1-p), rounded to the input dtype like the kernels
    low = dh @ lora_A.float()
    dx = (g @ weight.float() + (low if keep is None else low * keep)).to(grad_y.dtype) if needs[0] else None
    if needs[3]:
        xk = x.float() if keep is None else x.float() * keep
        dA = (dh.t() @ xk).to(grad_y.dtype)
    else:
        dA = None
    dW = (g.t() @ x.float()).to(grad_y.dtype) if needs[1] else None
    db = g.sum(0).to(grad_y.dtype) if needs[2] else None
    return [dx, dW, db, dA, dB.to(grad_y.dtype) if needs[4] else None]


def keep_mask(seed, M, K, p):
    if p <= 0:
        return torch.ones(M, K, dtype=torch.bool)
    return philox_keep(int(seed.reshape(-1)[0].item()), M, K, p)


def main(argv):
    fake = types.ModuleType("lora_fused._C")
    fake.forward, fake.backward, fake.keep_mask = forward, backward, keep_mask
    fake.built_archs = lambda: ["dry-run"]
    fake.cutlass_version = lambda: "dry-run"
    fake.max_rank, fake.max_targets = 128, 3
    sys.modules["lora_fused._C"] = fake
    os.environ["LORA_FUSED_CUDA_TEST_DEVICE"] = "cpu"
    from lora_fused.backends import cuda_backend

    cuda_backend._DEVICE_TYPE = "cpu"
    cuda_backend.CudaBackend.auto_device_types = ("cpu",)
    cuda_backend.CudaBackend.unavailable_reason = lambda self: None
    import pytest

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return pytest.main([os.path.join(root, "tests", "test_cuda_backend.py"), "-q", "-p", "no:cacheprovider"] + argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
