"""A quick correctness check of one lora_fused backend on a GPU, run before the suite times it.

    python benchmarks/gpu_smoke.py --backend triton      # exit 0: every check passed

``benchmarks/gpu_check.sh`` runs it in its own process under a time limit for each backend and times only the
backends that pass, so a kernel that fails or hangs on its first GPU run costs seconds, not the suite's run.

Checks, in bf16 on the ViT-B qkv shape (1576x768->2304) and an LLM shape (4096x4096->4096), r=16:
- p=0, ``LoRALinear`` and (where N splits in 3) ``LoRAQKV`` (targets q, v): the output and the gradients of x, A and B against the
  torch backend on float64 copies of the same module and inputs, ``‖out − ref‖ / ‖ref‖ ≤ 2e-2``; every element
  finite. (bf16 operands land between 1e-3 and 1e-2.)
- p=0.1: the training forward and backward run, are finite, differ from the p=0 output, and two calls from the
  same ``torch.manual_seed`` agree bitwise (the mask is a function of the seed).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_fused  # noqa: E402
from lora_fused import LoRALinear, LoRAQKV  # noqa: E402

SHAPES = {"vit_b_qkv": (1576, 768, 2304), "llm_4k": (4096, 4096, 4096)}
RANK, ALPHA, TOL = 16, 32.0, 2e-2


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _module(cls: str, k: int, n: int, p: float, seed: int):
    torch.manual_seed(seed)
    if cls == "linear":
        m = LoRALinear(k, n, r=RANK, lora_alpha=ALPHA, lora_dropout=p)
    else:
        m = LoRAQKV(k, n, r=RANK, lora_alpha=ALPHA, lora_dropout=p, targets="qv")
    for name, t in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(t, std=0.05)  # B starts at zero; a zero B hides a wrong dA
    return m


def _step(m, x, g):
    """One training step: (y, dx, {param name: grad}) with ``g`` as dL/dy."""
    x = x.detach().clone().requires_grad_(True)
    for t in m.parameters():
        t.grad = None
    y = m(x)
    y.backward(g)
    grads = {name: t.grad for name, t in m.named_parameters() if t.requires_grad}
    return y.detach(), x.grad, grads


def check(backend: str, device: str, shapes) -> int:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    failures = 0
    for shape_name, (mm, k, n) in shapes.items():
        for cls in ("linear", "qkv") if n % 3 == 0 else ("linear",):
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(mm, k, generator=gen).to(dev)
            g = torch.randn(mm, n, generator=gen).to(dev)
            base = _module(cls, k, n, 0.0, seed=2).to(dev).train()
            ref = copy.deepcopy(base).double()
            fast = copy.deepcopy(base).to(torch.bfloat16)
            with lora_fused.use_backend("torch"):
                y_ref, dx_ref, gr_ref = _step(ref, x.double(), g.double())
            t0 = time.time()
            with lora_fused.use_backend(backend):
                y, dx, gr = _step(fast, x.to(torch.bfloat16), g.to(torch.bfloat16))
            sync()
            errs = {"y": _rel(y, y_ref), "dx": _rel(dx, dx_ref)}
            errs.update({name.rsplit(".", 1)[-1]: _rel(gr[name], gr_ref[name]) for name in gr_ref})
            finite = all(torch.isfinite(t).all().item() for t in [y, dx, *gr.values()])
            ok = finite and all(e <= TOL for e in errs.values())
            failures += not ok
            print(f"[smoke {backend}] {cls:6s} {shape_name:9s} p=0   {'ok  ' if ok else 'FAIL'} "
                  + " ".join(f"{key}={v:.1e}" for key, v in errs.items())
                  + ("" if finite else " NON-FINITE") + f" (first call {time.time() - t0:.1f} s)", flush=True)

            drop = _module(cls, k, n, 0.1, seed=2).to(dev, torch.bfloat16).train()
            drop.load_state_dict(fast.state_dict())
            with lora_fused.use_backend(backend):
                torch.manual_seed(5)
                y1, dx1, g1 = _step(drop, x.to(torch.bfloat16), g.to(torch.bfloat16))
                torch.manual_seed(5)
                y2, dx2, g2 = _step(drop, x.to(torch.bfloat16), g.to(torch.bfloat16))
            sync()
            same = torch.equal(y1, y2) and torch.equal(dx1, dx2)
            finite = all(torch.isfinite(t).all().item() for t in [y1, dx1, *g1.values()])
            differs = not torch.equal(y1, y)
            ok = same and finite and differs
            failures += not ok
            print(f"[smoke {backend}] {cls:6s} {shape_name:9s} p=0.1 {'ok  ' if ok else 'FAIL'} "
                  f"same-seed-equal={same} finite={finite} differs-from-p0={differs}", flush=True)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", required=True, choices=["torch", "triton", "cuda"])
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu with --tiny is a dry run of this script")
    ap.add_argument("--tiny", action="store_true", help="one small shape (64x32->48) instead of the two above")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU visible", file=sys.stderr)
        return 2
    reason = lora_fused.backends.unavailable_reason(args.backend)
    if reason is not None:
        print(f"[smoke {args.backend}] unavailable: {reason}")
        return 3
    failures = check(args.backend, args.device, {"tiny": (64, 32, 48)} if args.tiny else SHAPES)
    print(f"[smoke {args.backend}] {'PASS' if failures == 0 else f'FAIL ({failures} checks)'}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
