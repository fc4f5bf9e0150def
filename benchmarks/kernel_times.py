"""Which GPU kernels a training step runs, and how long each takes, per method (torch.profiler, CUDA activity).

    python -m benchmarks.kernel_times --shape 16384x4096x4096 --p 0.1 --out DIR

The suite says a step costs 1.4x the frozen layer; this says which kernel holds the excess (the forward GEMM,
the dx GEMM, a mask or reduction kernel, an unexpected copy). For each method of the suite (the frozen ``nn.Linear``
with a gradient to x only, plain PyTorch LoRA, PEFT when installed, and lora_fused on each backend that runs), after warm-up, ``steps``
training steps of ``LoRALinear`` (r=16 by default, bf16) are profiled; the report lists every kernel with its
calls per step and µs per step, and the sum.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

import lora_fused

from .harness import peft_available
from .methods import linear_methods, make_base


def _methods(K: int, N: int, r: int, p: float, dtype, backends, device):
    """The suite's methods for one ``LoRALinear`` comparison (:func:`benchmarks.methods.linear_methods`): floor,
    plain, PEFT when it imports, and lora_fused on each backend, around one frozen base."""
    base = make_base(K, N, device, dtype, seed=0)
    return linear_methods(base, r, 2.0 * r, [p], backends, peft_available() is None, lora_fa=False,
                          two_adapters=False)


def kernel_table(module, backend_ctx, trainable, x, g, steps: int):
    """``{kernel name: [calls, µs]}`` per step of ``steps`` profiled training steps (on a CPU, for a dry run of
    this script: the operators' CPU time instead)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU

    def step():  # gradients reset each step: no accumulation kernels in the table
        x.grad = None
        for t in trainable:
            t.grad = None
        module(x).backward(g)

    with backend_ctx():
        for _ in range(5):
            step()
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
            sync()
    table = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == kind and (cuda or ev.name.startswith("aten::")):
            row = table[ev.name]
            row[0] += 1
            row[1] += (getattr(ev, "device_time_total", None) or ev.cuda_time_total) if cuda else ev.self_cpu_time_total
    return {k: [v[0] / steps, v[1] / steps] for k, v in table.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16384x4096x4096", help="MxKxN")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backends", default=None, help="comma-separated (default: every available GPU backend)")
    ap.add_argument("--out", default=None, help="a directory for kernel_times.md (default: print only)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu (fp32, operators' CPU time) is a dry run")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("kernel_times: no CUDA GPU visible (--device cpu for a dry run)", file=sys.stderr)
        return 2
    M, K, N = (int(v) for v in args.shape.lower().split("x"))
    backends = args.backends.split(",") if args.backends else [
        b for b in lora_fused.available_backends() if (b in ("triton", "cuda")) == cuda]
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=args.device).manual_seed(1)
    x = torch.randn(M, K, device=args.device, dtype=dtype, generator=gen).requires_grad_(True)
    g = torch.randn(M, N, device=args.device, dtype=dtype, generator=gen)
    where = torch.cuda.get_device_name(0) if cuda else "CPU (dry run: operators' CPU time)"
    lines = [f"# Kernels per training step: {where}, {str(dtype)[6:]}, {M}x{K}->{N}, r={args.rank}, p={args.p}, "
             f"{args.steps} profiled steps", ""]
    for method in _methods(K, N, args.rank, args.p, dtype, backends, args.device):
        method.module.train()
        label = method.label
        table = kernel_table(method.module, method.backend_ctx, method.trainable, x, g, args.steps)
        total = sum(v[1] for v in table.values())
        lines += [f"## {label}: {total:.1f} µs of kernel time per step", "", "| kernel | calls/step | µs/step |",
                  "|---|---|---|"]
        for name, (calls, us) in sorted(table.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| `{name[:110]}` | {calls:g} | {us:.1f} |")
        lines.append("")
    text = "\n".join(lines)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_times.md"), "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
