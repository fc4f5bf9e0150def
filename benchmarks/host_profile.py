"""Where a tiny training step's host time goes, per backend: cProfile over many back-to-back steps.

    python -m benchmarks.host_profile --device cuda --backends triton,cuda --steps 300 --out DIR

The host-overhead table (:mod:`benchmarks.host_overhead`) says how long a step takes on the host; this says
which Python functions (and which calls into C: kernel launches, allocations) the time is spent in, so a slow
launch path can be fixed from one GPU run. Shape and settings as in that table: ``LoRALinear`` 8x16->16, r=4,
p=0.1, the suite's dtype (bf16 on CUDA), ``x`` requiring grad. Each backend is warmed up first (compiles,
autotuning), timed without the profiler (for Triton also with its direct launches switched off: every launch
through Triton's JIT), then profiled; the report lists the top functions by own time and by cumulative time,
with the per-step time of each.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

import lora_fused
from lora_fused import LoRALinear


def profile_backend(backend: str, device: str, dtype: torch.dtype, steps: int, top: int) -> str:
    """The report of one backend: per-step host time, then the top functions by tottime and by cumtime."""
    torch.manual_seed(0)
    m = LoRALinear(16, 16, r=4, lora_alpha=8, lora_dropout=0.1).to(device, dtype).train()
    x = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(8, 16, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step():
        x.grad = None
        m.lora_A.grad = m.lora_B.grad = None
        m(x).backward(g)

    def per_step_us() -> float:  # unprofiled, best of 3 runs of ``steps`` steps
        best = float("inf")
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            best = min(best, (time.perf_counter() - t0) / steps * 1e6)
        return best

    with lora_fused.use_backend(backend):
        for _ in range(20):
            step()
        sync()
        timing = f"{per_step_us():.1f} µs per step unprofiled"
        if backend == "triton":  # the same steps with every launch through Triton's JIT (no direct launches)
            from lora_fused.kernels.triton._common import jit_launches

            with jit_launches():
                timing += f" ({per_step_us():.1f} through Triton's JIT launch path)"
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        sync()
        prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total_us = stats.total_tt / steps * 1e6
    out.write(f"## backend {backend}: {total_us:.1f} µs of profiled host time per step ({steps} steps); {timing}\n")
    for order in ("tottime", "cumulative"):
        out.write(f"\n### top {top} by {order} (times are for all {steps} steps)\n")
        stats.sort_stats(order).print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--backends", default=None, help="comma-separated (default: every available one)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="a directory for host_profile_<backend>.txt (default: print)")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    names = args.backends.split(",") if args.backends else lora_fused.available_backends()
    for name in names:
        reason = lora_fused.backends.unavailable_reason(name)
        if reason is not None:
            print(f"backend {name}: skipped ({reason})")
            continue
        report = profile_backend(name, args.device, dtype, args.steps, args.top)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"host_profile_{name}.txt"), "w") as f:
                f.write(report)
        print(report.splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
