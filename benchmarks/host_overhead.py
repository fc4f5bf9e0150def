"""Host overhead: CPU time per call of each method at a tiny shape, where the math is negligible.

On a GPU a layer's step is only as fast as the host can issue it: at ViT-B sizes a LoRA layer's kernels take
microseconds, and the Python and dispatcher work around them takes tens. This table measures that work.

Shapes: ``linear`` 8x16->16 and ``qkv`` 8x16->48 (q, k, v of 16; adapters on q and v), rank 4, in the suite's
dtype (float32 on a CPU).
Methods: ``floor`` (the frozen ``nn.Linear``), ``plain`` (hand-written LoRA), ``peft`` (when installed) and
``lora_fused`` on each backend that runs on the device, at p=0 and p=0.1. Modes: ``fwd`` (eval forward under
``torch.no_grad``) and ``fwd+bwd`` (a training step: forward, then backward from a fixed gradient; ``x``
requires grad, as inside a network).

Timing: each method runs ``calls`` times back to back per round; the rounds of all methods are interleaved
(reshuffled each round, from a fixed seed) and the median per-call time over the rounds is reported, in
microseconds. On a CPU the run uses one intra-op thread (``torch.set_num_threads(1)``, restored afterwards),
so thread wake-ups do not blur the host cost; on CUDA each round ends with a synchronize, so the figure is
the host's issue rate while the tiny kernels keep up.
"""

from __future__ import annotations

import gc
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import harness
from .harness import Shape
from .methods import OPS, as_tuple, grads_for, make_base

SHAPE_NAME = "host_tiny"
SHAPES = {"linear": Shape(SHAPE_NAME, 8, 16, 16), "qkv": Shape(SHAPE_NAME, 8, 16, 48, True)}
RANK = 4
ALPHA = 8.0
PS = (0.0, 0.1)
MODES = ("fwd", "fwd+bwd")
DEFAULT_ROUNDS, DEFAULT_CALLS = 7, 1000
QUICK_ROUNDS, QUICK_CALLS = 3, 50


def _step(module, x: torch.Tensor, g: torch.Tensor, params: List[torch.Tensor], mode: str, ctx) -> Callable[[], None]:
    if mode == "fwd":
        x_eval = x.detach()

        def step():
            with torch.no_grad():
                module(x_eval)

    else:

        def step():
            x.grad = None
            for t in params:
                t.grad = None
            outs = as_tuple(module(x))
            torch.autograd.backward(outs, grads_for(outs, g))

    def run(n: int):
        with ctx():
            for _ in range(n):
                step()

    return run


def time_rounds(fns: Dict[str, Callable[[int], None]], device: str, rounds: int, calls: int, seed: int = 0
                ) -> Dict[str, List[float]]:
    """µs per call of each ``fns[name](calls)``, one value per round; rounds interleaved in a shuffled order
    (:func:`benchmarks.harness.time_interleaved` with host clocks; on CUDA each round ends with a synchronize)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def batch(fn):
        def run():
            fn(calls)
            sync()

        return run

    for fn in fns.values():  # warm-up: caches, lazy imports, first-call paths
        fn(max(1, calls // 10))
    sync()
    ms = harness.time_interleaved({name: batch(fn) for name, fn in fns.items()}, "cpu", rounds, 0, seed=seed)
    return {name: [t * 1e3 / calls for t in times] for name, times in ms.items()}


def run_host_overhead(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backends: Sequence[str] = ("torch",),
    with_peft: bool = True,
    ops: Sequence[str] = ("linear", "qkv"),
    rounds: int = DEFAULT_ROUNDS,
    calls: int = DEFAULT_CALLS,
    threads: Optional[int] = 1,
    seed: int = 0,
) -> List[Dict]:
    """Result rows (the suite's schema; ``shape`` is ``host_tiny``, times in ``median_ms`` are per call)."""
    cpu = torch.device(device).type == "cpu"
    saved_threads = torch.get_num_threads()
    if cpu and threads:
        torch.set_num_threads(threads)
    rows: List[Dict] = []
    try:
        for op in ops:
            shape = SHAPES[op]
            builder, _ = OPS[op]
            base = make_base(shape.K, shape.N, device, dtype, seed)
            gen = torch.Generator().manual_seed(seed + 2)
            x = torch.randn(shape.M, shape.K, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
            g = torch.randn(shape.M, shape.N, generator=gen).to(device=device, dtype=dtype)
            for mode in MODES:
                methods = builder(base, RANK, ALPHA, list(PS), backends, with_peft, seed=seed)
                for m in methods:
                    m.module.train(mode == "fwd+bwd")
                fns = {m.label: _step(m.module, x, g, m.trainable, mode, m.backend_ctx) for m in methods}
                times = time_rounds(fns, device, rounds, calls, seed)
                rows += _rows(op, shape, mode, methods, times, calls)
                del methods, fns
                gc.collect()
    finally:
        torch.set_num_threads(saved_threads)
    return rows


def _rows(op, shape, mode, methods, times, calls) -> List[Dict]:
    floor = statistics.median(times[methods[0].label])
    peft = {m.p: statistics.median(times[m.label]) for m in methods if m.method == "peft"}
    rows = []
    for m in methods:
        us = sorted(times[m.label])
        med = statistics.median(us)
        q = statistics.quantiles(us, n=4) if len(us) > 1 else [med, med, med]
        rows.append({
            "op": op, "shape": shape.name, "M": shape.M, "K": shape.K, "N": shape.N, "r": RANK, "lora_alpha": ALPHA,
            "method": m.method, "backend": m.backend, "p": m.p, "mode": mode,
            "median_ms": med / 1e3, "iqr_ms": (q[2] - q[0]) / 1e3, "min_ms": us[0] / 1e3, "reps": len(us) * calls,
            "ratio_to_floor": med / floor,
            "ratio_to_floor_paired": statistics.median(a / b for a, b in zip(times[m.label], times[methods[0].label])),
            "note": (f"host overhead; x PEFT {med / peft[m.p]:.2f}" if m.p in peft and m.method != "floor"
                     else "host overhead"),
        })
    return rows


def is_host_row(row: Dict) -> bool:
    return row.get("shape") == SHAPE_NAME


def markdown(rows: Sequence[Dict]) -> List[str]:
    """The host-overhead table: one line per (op, method, p), µs per call in eval fwd and fwd+bwd."""
    rows = [r for r in rows if is_host_row(r)]
    if not rows:
        return []
    r0 = rows[0]
    lines = [
        "### Host overhead: µs per call at a tiny shape",
        "",
        f"linear {SHAPES['linear'].mkn}, qkv {SHAPES['qkv'].mkn} (adapters on q, v), r={r0['r']}; "
        "median over interleaved rounds of back-to-back calls (CPU: one thread). x floor: over the frozen "
        "nn.Linear; x PEFT: over PEFT at the same p.",
        "",
        "| op | method | p | eval fwd µs | x floor | x PEFT | fwd+bwd µs | x floor | x PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        label = f"{r['method']}[{r['backend']}]" if r.get("backend") else r["method"]
        by_key.setdefault((r["op"], label, r["p"]), {})[r["mode"]] = r
    peft = {(r["op"], r["p"], r["mode"]): r["median_ms"] for r in rows if r["method"] == "peft"}
    for (op, label, p), modes in by_key.items():
        cells = [op, label, "-" if label == "floor" else f"{p:g}"]
        for mode in MODES:
            r = modes.get(mode)
            if r is None or r.get("median_ms") is None:
                cells += ["-", "-", "-"]
                continue
            ref = peft.get((op, p, mode))
            cells += [f"{r['median_ms'] * 1e3:.1f}", f"{r['ratio_to_floor']:.2f}",
                      f"{r['median_ms'] / ref:.2f}" if ref and label != "floor" else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main() -> int:  # a quick look without the rest of the suite: python -m benchmarks.host_overhead
    import lora_fused

    backends = [b for b in lora_fused.available_backends() if b == "torch"]
    try:
        import peft  # noqa: F401

        with_peft = True
    except ImportError:
        with_peft = False
    rows = run_host_overhead(backends=backends, with_peft=with_peft)
    print("\n".join(markdown(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
