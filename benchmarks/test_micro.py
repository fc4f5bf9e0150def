"""pytest-benchmark micro-benchmarks of each op and method (not collected by the main test run).

    python -m pytest benchmarks/test_micro.py --benchmark-enable                    # CPU: a 512x256->768 shape
    python -m pytest benchmarks/test_micro.py --benchmark-enable -k "qkv and fwd+bwd"
    python -m pytest benchmarks/test_micro.py --benchmark-enable --benchmark-json=micro.json

``--benchmark-enable`` is needed because the project's pytest.ini disables benchmarks by default. On CUDA the
shape is ViT-B qkv at bf16, and every call ends with a synchronize so the clock sees the GPU work. Groups are
(op, mode, p), so pytest-benchmark's table compares the methods of one group. The suite (``python -m
benchmarks``) is the reference measurement: it interleaves methods and reports memory too.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, suite  # noqa: E402
from benchmarks.methods import OPS, make_base  # noqa: E402

DEVICE = harness.best_device()
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPE = harness.PRESETS["vit_b_qkv"] if DEVICE == "cuda" else harness.Shape("micro", 512, 256, 768, True)
R = 16
BACKENDS, _ = harness.runnable_backends(DEVICE, DTYPE)
WITH_PEFT = harness.peft_available() is None

LABELS = ["floor", "plain"] + (["peft"] if WITH_PEFT else []) + [f"lora_fused[{b}]" for b in BACKENDS]
CASES = [
    (op, mode, p, label)
    for op in OPS
    for mode, ps in (("fwd", (0.0,)), ("fwd+bwd", (0.0, 0.1)))
    for p in ps
    for label in LABELS
]


@functools.lru_cache(maxsize=None)
def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE.M, SHAPE.K, generator=gen).to(DEVICE, DTYPE).requires_grad_(True)
    g = torch.randn(SHAPE.M, SHAPE.N, generator=gen).to(DEVICE, DTYPE)
    return make_base(SHAPE.K, SHAPE.N, DEVICE, DTYPE, 0), x, g


@functools.lru_cache(maxsize=None)
def _steps(op: str, mode: str, p: float):
    base, x, g = _inputs()
    methods = OPS[op][0](base, R, 2 * R, [p], BACKENDS, WITH_PEFT)
    out = {}
    for m in methods:
        m.module.train(mode == "fwd+bwd")
        name = f"{m.method}[{m.backend}]" if m.backend else m.method
        out[name] = suite._make_step(m, x, g, mode)
    return out


@pytest.mark.parametrize("op,mode,p,label", CASES, ids=[f"{o}-{m}-p{p:g}-{l}" for o, m, p, l in CASES])
def test_micro(benchmark, op, mode, p, label):
    clear, step = _steps(op, mode, p)[label]
    if DEVICE == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.group = f"{op} {SHAPE.name} {mode} p={p:g}"
    benchmark.extra_info.update({"shape": SHAPE.mkn, "dtype": harness.dtype_name(DTYPE), "device": DEVICE})
    benchmark.pedantic(run, setup=clear, rounds=10 if DEVICE == "cpu" else 50, warmup_rounds=2, iterations=1)
