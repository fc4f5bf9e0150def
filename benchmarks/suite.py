"""Runs one comparison (an op on a shape, in one mode): all methods interleaved, then memory, then rows."""

from __future__ import annotations

import gc
import math
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import harness
from .methods import OPS, Method, as_tuple, grads_for, make_base

MODES = ("fwd", "fwd+bwd")


def parse_modes(spec: str) -> List[str]:
    modes = []
    for m in [s.strip().lower() for s in spec.split(",") if s.strip()]:
        m = {"train": "fwd+bwd", "fwdbwd": "fwd+bwd", "fwd_bwd": "fwd+bwd", "eval": "fwd"}.get(m, m)
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from fwd, fwd+bwd")
        if m not in modes:
            modes.append(m)
    if not modes:
        raise ValueError("no modes given")
    return modes


def _make_step(m: Method, x: torch.Tensor, g: torch.Tensor, mode: str):
    """``(clear, step)``: ``clear`` drops gradients from the previous call; ``step`` runs the mode once."""
    params = m.trainable
    if mode == "fwd":
        x_eval = x.detach()

        def step():
            with torch.no_grad(), m.backend_ctx():
                m.module(x_eval)

        return (lambda: None), step

    def clear():
        x.grad = None
        for t in params:
            t.grad = None

    def step():
        clear()
        with m.backend_ctx():
            outs = as_tuple(m.module(x))
            torch.autograd.backward(outs, grads_for(outs, g))

    return clear, step


def _forward_for_saved(m: Method, x: torch.Tensor):
    def fwd():
        with m.backend_ctx():
            return m.module(x)

    return fwd


def _rel_err(out, ref) -> float:
    a = torch.cat([t.float() for t in as_tuple(out)], dim=-1)
    b = torch.cat([t.float() for t in as_tuple(ref)], dim=-1)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_case(
    op: str,
    shape: harness.Shape,
    *,
    device: str,
    dtype: torch.dtype,
    r: int,
    lora_alpha: float,
    ps: Sequence[float],
    modes: Sequence[str],
    backends: Sequence[str],
    with_peft: bool,
    reps: int,
    warmup: int,
    on_rep: Optional[Callable[[], None]] = None,
    seed: int = 0,
) -> List[Dict]:
    """All rows of one op on one shape, for each mode. Eval forward (``fwd``) has no dropout, so it is run
    once with p=0 (the p column of those rows is 0); ``fwd+bwd`` runs every p in ``ps``."""
    builder, _ = OPS[op]
    base = make_base(shape.K, shape.N, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(shape.M, shape.K, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    g = torch.randn(shape.M, shape.N, generator=gen).to(device=device, dtype=dtype)
    x_bytes = x.numel() * x.element_size()
    rows: List[Dict] = []
    for mode in modes:
        mode_ps = [0.0] if mode == "fwd" else list(ps)
        methods = builder(base, r, lora_alpha, mode_ps, backends, with_peft, seed=seed, lora_fa=mode == "fwd+bwd")
        for m in methods:
            m.module.train(mode == "fwd+bwd")
        steps = {m.label: _make_step(m, x, g, mode) for m in methods}

        # Probe: a method that fails here (e.g. a backend that rejects the shape) is reported, not fatal.
        failed: Dict[str, str] = {}
        for m in methods[1:]:
            clear, step = steps[m.label]
            try:
                step()
                clear()
            except Exception as exc:  # noqa: BLE001
                failed[m.label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if failed:
            for m in methods:
                if m.label in failed:
                    rows.append(_failed_row(op, shape, r, lora_alpha, m, mode, failed[m.label]))
            methods = [m for m in methods if m.label not in failed]
            steps = {k: v for k, v in steps.items() if k not in failed}

        # Numerical check at p=0 in eval mode: every method against plain PyTorch.
        errs: Dict[str, float] = {}
        plain0 = next((m for m in methods if m.method == "plain" and m.p == 0.0), None)
        if plain0 is not None:
            with torch.no_grad():
                plain0.module.eval()
                ref = plain0.module(x.detach())
                for m in methods:
                    if m.p == 0.0 and m.method != "floor":
                        m.module.eval()
                        with m.backend_ctx():
                            errs[m.label] = _rel_err(m.module(x.detach()), ref)
                for m in methods:
                    m.module.train(mode == "fwd+bwd")
            del ref

        times = harness.time_interleaved(
            {label: step for label, (_, step) in steps.items()}, device, reps, warmup, seed=seed, on_rep=on_rep
        )

        # Memory, outside the timed region.
        saved: Dict[str, Optional[int]] = {}
        peak: Dict[str, Optional[int]] = {}
        for m in methods:
            clear, step = steps[m.label]
            if mode == "fwd+bwd":
                clear()
                saved[m.label] = harness.saved_bytes(_forward_for_saved(m, x), exclude=m.frozen_tensors())
            else:
                saved[m.label] = None
            clear()
            peak[m.label] = harness.peak_bytes(step, device)
            clear()

        floor = methods[0]
        fstats = harness.summarize(times[floor.label])
        for m in methods:
            st = harness.summarize(times[m.label])
            sb, pb = saved[m.label], peak[m.label]
            fsb, fpb = saved[floor.label], peak[floor.label]
            rows.append({
                "op": op,
                "shape": shape.name,
                "M": shape.M,
                "K": shape.K,
                "N": shape.N,
                "r": r,
                "lora_alpha": lora_alpha,
                "method": m.method,
                "backend": m.backend,
                "p": m.p,
                "mode": mode,
                "median_ms": st["median_ms"],
                "iqr_ms": st["iqr_ms"],
                "min_ms": st["min_ms"],
                "reps": st["reps"],
                "ratio_to_floor": st["median_ms"] / fstats["median_ms"],
                "ratio_to_floor_paired": statistics.median(
                    a / b for a, b in zip(times[m.label], times[floor.label]) if b > 0
                ),
                "saved_bytes": sb,
                "saved_ratio_to_floor": (sb / fsb) if (sb is not None and fsb) else None,
                "saved_over_x": (sb / x_bytes) if sb is not None else None,
                "peak_bytes": pb,
                "peak_ratio_to_floor": (pb / fpb) if (pb is not None and fpb) else None,
                "rel_err_vs_plain": errs.get(m.label),
                "note": m.note,
            })
        del methods, steps
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _failed_row(op, shape, r, lora_alpha, m: Method, mode: str, why: str) -> Dict:
    row = {k: None for k in ("median_ms", "iqr_ms", "min_ms", "reps", "ratio_to_floor", "ratio_to_floor_paired", "saved_bytes",
                             "saved_ratio_to_floor", "saved_over_x", "peak_bytes", "peak_ratio_to_floor",
                             "rel_err_vs_plain")}
    row.update({"op": op, "shape": shape.name, "M": shape.M, "K": shape.K, "N": shape.N, "r": r,
                "lora_alpha": lora_alpha, "method": m.method, "backend": m.backend, "p": m.p, "mode": mode,
                "note": why})
    return row


def count_reps(ops: Sequence[str], shapes: Sequence[harness.Shape], modes: Sequence[str], reps: int) -> int:
    n = 0
    for op in ops:
        for s in shapes:
            if op == "qkv" and not s.qkv:
                continue
            n += len(modes) * reps
    return n


def expected_saved_bytes(shape: harness.Shape, dtype: torch.dtype, r: int, n_targets: int = 1, p: float = 0.1,
                         seed_tensor: bool = True) -> int:
    """The design's saved-for-backward size of lora_fused: ``bytes(x) + bytes(M x T*r)``, + 8 for the seed when
    ``p > 0`` and it is a tensor (``seed_tensor=False``: the torch backend's CPU eager route keeps it as an int)."""
    el = torch.empty(0, dtype=dtype).element_size()
    return shape.M * shape.K * el + shape.M * n_targets * r * el + (8 if p > 0 and seed_tensor else 0)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 2**20:.2f}"
