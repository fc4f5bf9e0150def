"""``python -m benchmarks``: time and memory of lora_fused next to the floor, plain PyTorch LoRA and PEFT.

Runs on the best device present (CUDA if visible, else CPU), shows a progress bar, prints a table and writes
``results.csv``, ``results.json``, ``results.md``, ``time_ratio.png``, ``memory.png`` and ``info.txt`` into
``--out`` (default ``benchmarks/results/<device>-<date>/``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import harness, host_overhead, report, suite
from .methods import OPS

DEFAULTS = {
    # device type -> (shapes, dtype, reps, warmup)
    "cpu": ("cpu", "fp32", 12, 1),
    "cuda": ("cuda", "bf16", 50, 10),
}
QUICK = (3, 1)  # reps, warmup

CPU_SHAPES_NOTE = (
    "CPU default shapes: vit_b_qkv only (the SAM ViT-H and LLM shapes take seconds per call on a CPU); "
    "run them with --shapes sam_h_qkv,llm_4k,llm_16k, or on a GPU where they are the default."
)


def _floats(spec: str) -> List[float]:
    vals = [float(s) for s in spec.split(",") if s.strip()]
    for v in vals:
        if not 0.0 <= v < 1.0:
            raise argparse.ArgumentTypeError(f"dropout {v} is outside [0, 1)")
    if not vals:
        raise argparse.ArgumentTypeError("no dropout values given")
    return sorted(set(vals))


def build_parser() -> argparse.ArgumentParser:
    shapes_help = ", ".join(f"{k} ({v.mkn})" for k, v in harness.PRESETS.items())
    groups_help = ", ".join(f"{k}={'+'.join(v)}" for k, v in harness.SHAPE_GROUPS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="lora_fused benchmark suite: time and memory of our layers next to the frozen floor, "
        "plain PyTorch LoRA and PEFT, all interleaved in one process.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if visible, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated presets, groups or MxKxN. Presets: {shapes_help}. Groups: {groups_help}. "
                   "Default: the 'cpu' group on CPU, the 'cuda' group on CUDA.")
    p.add_argument("--rank", "-r", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*r)")
    p.add_argument("--dropout", type=_floats, default=[0.0, 0.1], help="comma-separated dropout rates (default 0,0.1)")
    p.add_argument("--backends", default=None,
                   help="comma-separated lora_fused backends (default: every available one that runs on the device)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd (eval forward), fwd+bwd (train step); default both")
    p.add_argument("--ops", default="linear,qkv",
                   help="linear (LoRALinear), qkv (LoRAQKV targets=qv, on shapes whose N splits in 3); default both")
    p.add_argument("--quick", action="store_true", help=f"{QUICK[0]} repetitions, {QUICK[1]} warm-up (a smoke run)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 12 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per method (default 1 CPU, 10 CUDA)")
    p.add_argument("--no-peft", action="store_true", help="leave PEFT out even when it is installed")
    p.add_argument("--host-overhead", dest="host_overhead", action="store_true", default=None,
                   help="add the host-overhead table (µs per call at a tiny shape; default: on, except with --quick)")
    p.add_argument("--no-host-overhead", dest="host_overhead", action="store_false")
    p.add_argument("--host-rounds", type=int, default=None,
                   help=f"interleaved rounds of the host-overhead table (default {host_overhead.DEFAULT_ROUNDS})")
    p.add_argument("--host-calls", type=int, default=None,
                   help=f"calls per method and round in the host-overhead table (default {host_overhead.DEFAULT_CALLS})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>-<date>/)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for a CPU run (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", action="store_true",
                   help="print the Triton kernels' cost model (bytes, FLOPs, implied H100 time vs the floor) and exit")
    return p


def resolve(args: argparse.Namespace) -> Dict:
    """Fill the device-dependent defaults; validate. Returns the run configuration."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = args.device or harness.best_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch")
    if dev.type not in DEFAULTS:
        raise SystemExit(f"--device {device}: only cpu and cuda are supported")
    shapes_d, dtype_d, reps_d, warm_d = DEFAULTS[dev.type]
    if args.quick:
        reps_d, warm_d = QUICK
    dtype = harness.parse_dtype(args.dtype or dtype_d)
    shapes = harness.parse_shapes(args.shapes or shapes_d)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"unknown op {o!r}; choose from {', '.join(OPS)}")
    if args.rank < 1:
        raise SystemExit("--rank must be >= 1")
    requested = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    backends, notes = harness.runnable_backends(device, dtype, requested)
    peft_reason = harness.peft_available()
    with_peft = not args.no_peft and peft_reason is None
    if args.no_peft:
        notes.append("PEFT rows left out (--no-peft)")
    elif peft_reason is not None:
        notes.append(f"PEFT rows left out: peft does not import ({peft_reason})")
    if dev.type == "cpu" and args.shapes is None:
        notes.append(CPU_SHAPES_NOTE)
    if dev.type == "cpu":
        notes.append("CPU run: these numbers say nothing about GPU speed.")
    skipped_qkv = [s.name for s in shapes if not s.qkv]
    if "qkv" in ops and skipped_qkv:
        notes.append(f"qkv op skipped on {', '.join(skipped_qkv)} (not a fused qkv shape)")
    if "fwd" in suite.parse_modes(args.modes):
        notes.append("fwd is the eval forward: dropout is inactive, so it runs once (p=0)")
    if not backends:
        notes.append("no lora_fused backend runs here: only the reference methods are measured")
    return {
        "device": device,
        "dtype": dtype,
        "shapes": shapes,
        "ops": ops,
        "modes": suite.parse_modes(args.modes),
        "r": args.rank,
        "lora_alpha": args.alpha if args.alpha is not None else 2.0 * args.rank,
        "ps": args.dropout,
        "backends": backends,
        "with_peft": with_peft,
        "reps": args.reps if args.reps is not None else reps_d,
        "warmup": args.warmup if args.warmup is not None else warm_d,
        "out": args.out or harness.default_out_dir(device),
        "notes": notes,
        "progress": not args.no_progress,
        "seed": args.seed,
        "host_overhead": (not args.quick) if args.host_overhead is None else args.host_overhead,
        "host_rounds_calls": _host_rounds_calls(args),
    }


def _host_rounds_calls(args: argparse.Namespace):
    rounds, calls = ((host_overhead.QUICK_ROUNDS, host_overhead.QUICK_CALLS) if args.quick
                     else (host_overhead.DEFAULT_ROUNDS, host_overhead.DEFAULT_CALLS))
    rounds = args.host_rounds if args.host_rounds is not None else rounds
    calls = args.host_calls if args.host_calls is not None else calls
    if rounds < 1 or calls < 1:
        raise SystemExit("--host-rounds and --host-calls must be >= 1")
    return rounds, calls


def run(cfg: Dict, on_case=None) -> List[Dict]:
    """Runs every (op, shape, mode) comparison of ``cfg``; returns the rows (without environment columns).
    ``on_case(rows_so_far)`` is called after each (op, shape), e.g. to write partial results."""
    total = suite.count_reps(cfg["ops"], cfg["shapes"], cfg["modes"], cfg["reps"])
    bar = None
    if cfg["progress"]:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="rep", desc="benchmarks", dynamic_ncols=True, file=sys.stderr, disable=None)
        except ImportError:
            bar = None
    rows: List[Dict] = []
    try:
        for shape in cfg["shapes"]:
            for op in cfg["ops"]:
                if op == "qkv" and not shape.qkv:
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"{op} {shape.name}")
                t_case = time.time()
                rows += suite.run_case(
                    op, shape, device=cfg["device"], dtype=cfg["dtype"], r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                    ps=cfg["ps"], modes=cfg["modes"], backends=cfg["backends"], with_peft=cfg["with_peft"],
                    reps=cfg["reps"], warmup=cfg["warmup"], seed=cfg["seed"],
                    on_rep=(lambda: bar.update(1)) if bar is not None else None,
                )
                if bar is None or bar.disable:
                    print(f"[benchmarks] {op} {shape.name}: done in {time.time() - t_case:.0f} s", flush=True)
                if on_case is not None:
                    on_case(rows)
    finally:
        if bar is not None:
            bar.close()
    if cfg.get("host_overhead"):
        t_host = time.time()
        rounds, calls = cfg["host_rounds_calls"]
        rows += host_overhead.run_host_overhead(
            device=cfg["device"], dtype=cfg["dtype"], backends=cfg["backends"], with_peft=cfg["with_peft"],
            rounds=rounds, calls=calls, seed=cfg["seed"],
        )
        print(f"[benchmarks] host overhead: done in {time.time() - t_host:.0f} s", flush=True)
        if on_case is not None:
            on_case(rows)
    return rows


def write_outputs(rows: List[Dict], cfg: Dict, command: str, plots: bool = True, info: bool = True) -> Dict[str, str]:
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    env = harness.environment(cfg["device"], cfg["dtype"])
    full = report.complete_rows(rows, env)
    meta = dict(env)
    meta.update({
        "command": command,
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "dropout": cfg["ps"],
        "modes": cfg["modes"],
        "ops": cfg["ops"],
        "shapes": {s.name: s.mkn for s in cfg["shapes"]},
        "backends": cfg["backends"],
        "host_overhead": cfg.get("host_overhead", False),
        "host_rounds_calls": list(cfg.get("host_rounds_calls", ())),
        "reps": cfg["reps"],
        "warmup": cfg["warmup"],
        "notes": cfg["notes"],
    })
    paths = {k: os.path.join(out, v) for k, v in report.FILES.items()}
    report.write_csv(full, paths["csv"])
    report.write_json(full, meta, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(report.markdown(full, meta))
    if plots:
        title = f"{env['device_name']} · {env['dtype']} · r={cfg['r']} · commit {env['commit']}"
        try:
            report.plot(full, out, title)
        except ImportError as exc:
            print(f"note: no PNG plots ({exc}; pip install matplotlib)")
            plots = False
    if not plots:
        paths.pop("time_png")
        paths.pop("mem_png")
    if not info:
        return paths
    info_path = os.path.join(out, "info.txt")
    try:
        from lora_fused.info import collect

        info = collect()
        backs = info.pop("backends", [])
        with open(info_path, "w") as f:
            for k, v in info.items():
                f.write(f"{k}: {v}\n")
            for name, ok, reason in backs:
                f.write(f"backend {name}: {'yes' if ok else 'no'} ({reason})\n")
        paths["info"] = info_path
    except Exception as exc:  # noqa: BLE001
        with open(info_path, "w") as f:
            f.write(f"lora_fused.info failed: {type(exc).__name__}: {exc}\n")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.model:
        from .costmodel import main as model_main

        return model_main(rank=args.rank, ps=args.dropout)
    cfg = resolve(args)
    dev_name = harness.device_name(cfg["device"])
    print(f"lora_fused benchmarks on {dev_name} ({cfg['device']}), {harness.dtype_name(cfg['dtype'])}, "
          f"r={cfg['r']}, alpha={cfg['lora_alpha']:g}, p={','.join(f'{p:g}' for p in cfg['ps'])}, "
          f"modes={','.join(cfg['modes'])}, reps={cfg['reps']} (warm-up {cfg['warmup']})")
    print(f"shapes: {', '.join(f'{s.name} ({s.mkn})' for s in cfg['shapes'])}; ops: {', '.join(cfg['ops'])}; "
          f"lora_fused backends: {', '.join(cfg['backends']) or 'none'}; peft: {'yes' if cfg['with_peft'] else 'no'}")
    for note in cfg["notes"]:
        print(f"note: {note}")
    t0 = time.time()
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    # Tables are rewritten after every case, so a run cut short still leaves its finished rows behind.
    rows = run(cfg, on_case=lambda rs: write_outputs(rs, cfg, command.strip(), plots=False, info=False))
    paths = write_outputs(rows, cfg, command.strip(), plots=not args.no_plots)
    print()
    print(report.console_table(report.complete_rows(rows, {})))
    host_lines = host_overhead.markdown(rows)
    if host_lines:
        print("\n".join(host_lines))
    for line in report.headline(rows):
        print(line)
    print(f"\n{len(rows)} rows in {time.time() - t0:.0f} s; written to {cfg['out']}:")
    for k, v in paths.items():
        print(f"  {os.path.relpath(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def main_for_op(op: str, script: str, argv: Optional[Sequence[str]] = None) -> int:
    """``main`` with ``--ops`` fixed to ``op`` (the per-op scripts ``bench_lora_<op>.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--ops" or a.startswith("--ops=") for a in argv):
        raise SystemExit(f"{os.path.basename(script)} runs --ops {op} only")
    return main(["--ops", op] + argv)
