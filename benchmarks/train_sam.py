"""Memory and step time of LoRA on segment-anything's image encoder, where SAM fine-tuning users look.

    python benchmarks/train_sam.py                     # SAM ViT-B encoder, 256 px, batch 2, r=4, p=0.1
    python benchmarks/train_sam.py --device cuda       # + torch.cuda.max_memory_allocated per step
    python benchmarks/train_sam.py --tiny --steps 2    # a seconds-long smoke run (the CI test)

The encoder is ``segment_anything.modeling.ImageEncoderViT`` in SAM ViT-B's configuration (dim 768, 12 blocks, 12
heads, windows of 14 with global attention in blocks 2, 5, 8, 11, relative positions), built offline with random
weights at ``--image-size`` (256 px: 16x16 tokens, each window padded to 28x28). Adapters sit on q and v of every
block's fused qkv (SAM fine-tuning's choice), rank ``--rank`` 4, dropout ``--dropout`` 0.1. Variants, all from the
same frozen encoder:

* ``frozen``: no adapters; the backward runs from the output to the input of the first block (the token
  embeddings), which is what an adapter in the first block needs: the floor every LoRA variant pays.
* ``seeds``: SAM fine-tuning's hand-written ``_LoRA_qkv`` pattern (``benchmarks.methods.PlainLoRAQKV``).
* ``peft``: PEFT's LoRA on q and v of each qkv split into three Linears with the same weights (PEFT cannot target
  slices of a fused qkv).
* ``lora_fused``: ``inject_lora(encoder, ["qkv"], qkv_targets="qv")``.
* ``lora_fused_fa``: the same in LoRA-FA mode, ``inject_lora(..., lora_fa=True)`` (A frozen at its
  initialisation, B trains; the op then saves ``h`` and the seed, not ``x``).

Each step is a forward, an MSE loss against a fixed random target, a backward and an AdamW step on what trains;
steps of the variants are interleaved (machine noise hits all alike). Reported per variant: the bytes autograd
saves for backward in one forward (``saved_tensors_hooks``; parameters and buffers excluded), the median step time
and, on CUDA, the peak of ``torch.cuda.max_memory_allocated`` during a step (absolute, and above what was
allocated before the step). The issue's targets are evaluated on the measurements, never assumed:
LoRA-FA saved <= frozen + 2 MiB; lora_fused saved <= frozen + bytes(x of every qkv) + bytes(h); LoRA-FA step time
<= lora_fused's. Writes ``train_sam.json``, ``train_sam.md`` and ``train_sam.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, report  # noqa: E402
from benchmarks.methods import PlainLoRAQKV  # noqa: E402
from benchmarks.train_vit import SplitQKV, _set, add_run_args, measured_step, setup_run  # noqa: E402

VARIANTS = ("frozen", "seeds", "peft", "lora_fused", "lora_fused_fa")
MIB = 2**20

CONFIGS = {
    # SAM ViT-B image encoder (segment_anything.build_sam_vit_b), at a chosen image size.
    "vit_b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11)),
    # A few-second stand-in with the same structure (windows with padding, a global block, relative positions).
    "tiny": dict(patch_size=16, embed_dim=48, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,)),
}


def build_encoder(config: str, image_size: int, seed: int) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=image_size, mlp_ratio=4, out_chans=256, qkv_bias=True, use_rel_pos=True,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6), **CONFIGS[config])
    enc.requires_grad_(False)
    return enc


def _qkv_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if n.endswith("attn.qkv") and isinstance(m, nn.Linear)]


def _grad_from_here(module: nn.Module, args):
    """Forward pre-hook: the module's input becomes a leaf that requires grad (in training mode only)."""
    if module.training and torch.is_grad_enabled():
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:])
    return None


def make_variant(kind: str, base: nn.Module, r: int, alpha: float, p: float) -> nn.Module:
    """A deep copy of the frozen ``base`` with the adapters of ``kind`` (see the module docstring)."""
    import lora_fused as lf

    model = copy.deepcopy(base)
    if kind == "frozen":
        model.blocks[0].register_forward_pre_hook(_grad_from_here)
        return model
    if kind == "seeds":
        for name in _qkv_names(model):
            qkv = model.get_submodule(name)
            n = qkv.out_features // 3
            _set(model, name, PlainLoRAQKV(qkv, (n, n, n), r, alpha, p))
        return model
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        for name in _qkv_names(model):
            _set(model, name, SplitQKV(model.get_submodule(name)))
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=r".*attn\.qkv\.(q|v)", bias="none")
        return get_peft_model(model, cfg).base_model.model
    lf.inject_lora(model, ["qkv"], qkv_targets="qv", r=r, lora_alpha=alpha, lora_dropout=p,
                   lora_fa=kind == "lora_fused_fa")
    return model


def qkv_input_bytes(model: nn.Module, x: torch.Tensor, r_total: int, el: int) -> Tuple[int, int]:
    """``(bytes(x), bytes(h))`` summed over every lora_fused qkv of ``model`` for one forward on ``x``: the
    input rows each qkv sees (windows padded) times K, and those rows times ``r_total`` (= T·r), at ``el`` bytes
    per element (the compute dtype)."""
    import lora_fused as lf

    seen: List[Tuple[int, int]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((args[0].numel() // args[0].shape[-1],
                                                                         args[0].shape[-1])))
             for m in model.modules() if isinstance(m, lf.LoRABase)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(rows * k * el for rows, k in seen), sum(rows * r_total * el for rows, _ in seen)


def trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the few-second stand-in encoder (CI); default SAM ViT-B")
    ap.add_argument("--image-size", type=int, default=None, help="default 256 (tiny: 64)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant, after one warm-up step")
    ap.add_argument("--rank", "-r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default r: scaling 1, as SAM fine-tuning)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    add_run_args(ap, "sam")
    args = ap.parse_args(argv)

    import lora_fused as lf

    device, is_cuda = setup_run(args)
    config = "tiny" if args.tiny else "vit_b"
    image_size = args.image_size or (64 if args.tiny else 256)
    alpha = args.alpha if args.alpha is not None else float(args.rank)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    notes: List[str] = []
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    if "peft" in variants and harness.peft_available() is not None:
        variants.remove("peft")
        notes.append(f"peft left out: {harness.peft_available()}")
    out = args.out or os.path.join(harness.REPO_ROOT, "benchmarks", "results",
                                   "sam-" + os.path.basename(harness.default_out_dir(device)))
    os.makedirs(out, exist_ok=True)

    base = build_encoder(config, image_size, args.seed).to(device)
    torch.manual_seed(args.seed + 1)
    models: Dict[str, nn.Module] = {v: make_variant(v, base, args.rank, alpha, args.dropout) for v in variants}
    gen = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(args.batch, 3, image_size, image_size, generator=gen).to(device)
    with torch.no_grad():
        target = torch.randn_like(base(images))
    del base
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    backend_ctx: Callable = (lambda: lf.use_backend(args.backend)) if args.backend else contextlib.nullcontext

    # Saved-for-backward bytes of one training-mode forward, parameters and buffers excluded.
    saved: Dict[str, int] = {}
    for kind, m in models.items():
        m.train()
        with amp, backend_ctx():
            saved[kind] = harness.saved_bytes(lambda: m(images), exclude=list(m.parameters()) + list(m.buffers()))
    ref = next((models[k] for k in ("lora_fused", "lora_fused_fa") if k in models), None)
    x_bytes = h_bytes = None
    if ref is not None:
        with amp:
            x_bytes, h_bytes = qkv_input_bytes(ref, images, 2 * args.rank, 2 if args.precision == "bf16" else 4)

    opts = {k: torch.optim.AdamW(trainable(m), lr=1e-4) for k, m in models.items() if trainable(m)}
    times: Dict[str, List[float]] = {k: [] for k in models}
    peaks: Dict[str, List[int]] = {k: [] for k in models}
    peaks_abs: Dict[str, List[int]] = {k: [] for k in models}
    for step in range(args.steps + 1):  # step 0 is the warm-up
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for kind in order:
            m, opt = models[kind], opts.get(kind)
            torch.manual_seed(args.seed + 10_000 + step)

            def train_step():
                with amp, backend_ctx():
                    loss = F.mse_loss(m(images).float(), target)
                loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            _, ms, peak, peak_abs = measured_step(train_step, is_cuda)
            if step == 0:
                continue
            times[kind].append(ms)
            if is_cuda:
                peaks_abs[kind].append(peak_abs)
                peaks[kind].append(peak)

    summary: Dict[str, Dict] = {}
    for kind in models:
        summary[kind] = {
            "saved_bytes": saved[kind],
            "median_step_ms": statistics.median(times[kind]) if times[kind] else None,
            "iqr_step_ms": harness.summarize(times[kind])["iqr_ms"] if times[kind] else None,
            "peak_bytes": max(peaks[kind]) if peaks[kind] else None,
            "max_memory_allocated": max(peaks_abs[kind]) if peaks_abs[kind] else None,
            "trainable_params": sum(p.numel() for p in trainable(models[kind])),
        }
    targets = _targets(summary, x_bytes, h_bytes)
    env = harness.environment(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    cmd = "python benchmarks/train_sam.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "meta": dict(env, config=config, image_size=image_size, batch=args.batch, steps=args.steps, r=args.rank,
                     lora_alpha=alpha, dropout=args.dropout, precision=args.precision, backend=args.backend or "auto",
                     command=cmd.strip(), notes=notes),
        "summary": summary,
        "qkv_x_bytes": x_bytes,
        "qkv_h_bytes": h_bytes,
        "targets": targets,
        "step_ms": times,
    }
    text = _markdown(result)
    with open(os.path.join(out, "train_sam.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "train_sam.md"), "w") as f:
        f.write(text)
    try:
        _plot(result, os.path.join(out, "train_sam.png"))
    except ImportError as exc:
        print(f"note: no PNG plot ({exc}; pip install matplotlib)")
    print(text)
    print(f"written to {out}: train_sam.json, train_sam.md, train_sam.png")
    return 0


def _targets(summary: Dict[str, Dict], x_bytes: Optional[int], h_bytes: Optional[int]) -> List[Dict]:
    """The issue's targets, each with the measured values and whether they hold."""
    out = []
    s = summary
    if "frozen" in s and "lora_fused_fa" in s:
        bound = s["frozen"]["saved_bytes"] + 2 * MIB
        out.append({"target": "LoRA-FA saved <= frozen + 2 MiB", "value": s["lora_fused_fa"]["saved_bytes"],
                    "bound": bound, "holds": s["lora_fused_fa"]["saved_bytes"] <= bound})
    if "frozen" in s and "lora_fused" in s and x_bytes is not None:
        bound = s["frozen"]["saved_bytes"] + x_bytes + h_bytes
        out.append({"target": "lora_fused saved <= frozen + bytes(x of every qkv) + bytes(h)",
                    "value": s["lora_fused"]["saved_bytes"], "bound": bound,
                    "holds": s["lora_fused"]["saved_bytes"] <= bound})
    if "lora_fused" in s and "lora_fused_fa" in s and s["lora_fused"]["median_step_ms"] is not None:
        out.append({"target": "LoRA-FA median step time <= lora_fused's", "value": s["lora_fused_fa"]["median_step_ms"],
                    "bound": s["lora_fused"]["median_step_ms"],
                    "holds": s["lora_fused_fa"]["median_step_ms"] <= s["lora_fused"]["median_step_ms"]})
    return out


def _mib(v) -> str:
    return "-" if v is None else f"{v / MIB:.2f}"


def _markdown(result: Dict) -> str:
    m, s = result["meta"], result["summary"]
    floor = s.get("frozen", {}).get("saved_bytes")
    lines = [
        f"`{m['command']}`",
        "",
        f"segment-anything ImageEncoderViT ({'SAM ViT-B' if m['config'] == 'vit_b' else m['config']} configuration, "
        f"random weights), {m['image_size']} px, batch {m['batch']}, adapters on q and v of every qkv, r={m['r']}, "
        f"lora_alpha={m['lora_alpha']:g}, p={m['dropout']:g}, {m['precision']}, backend {m['backend']}; "
        f"{m['device_name']}; torch {m['torch']}, peft {m['peft']}, commit {m['commit']}; median of {m['steps']} "
        "interleaved steps after one warm-up.",
        "",
        "| variant | saved for backward MiB | over frozen MiB | step ms (median, IQR) | peak MiB (CUDA, above before) | "
        "max_memory_allocated MiB (CUDA) | trainable params |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, r in s.items():
        over = "-" if floor is None else f"{(r['saved_bytes'] - floor) / MIB:+.1f}"
        step = "-" if r["median_step_ms"] is None else f"{r['median_step_ms']:.1f} ({r['iqr_step_ms']:.1f})"
        lines.append(f"| {kind} | {_mib(r['saved_bytes'])} | {over} | {step} | {_mib(r['peak_bytes'])} | "
                     f"{_mib(r['max_memory_allocated'])} | {r['trainable_params']:,} |")
    lines.append("")
    if result["qkv_x_bytes"] is not None:
        lines.append(f"bytes(x) over the {m['config']} encoder's qkv inputs (windows padded): "
                     f"{_mib(result['qkv_x_bytes'])} MiB; bytes(h) (M x 2r): {result['qkv_h_bytes'] / MIB:.2f} MiB.")
        lines.append("")
    for t in result["targets"]:
        unit = (lambda v: f"{v:.1f} ms") if "time" in t["target"] else (lambda v: f"{v / MIB:.1f} MiB")
        lines.append(f"- {t['target']}: {unit(t['value'])} vs {unit(t['bound'])}: "
                     f"**{'holds' if t['holds'] else 'does not hold'}**")
    for note in m.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def _plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    kinds = list(s)
    colors = {"frozen": "0.6", "seeds": "C0", "peft": "C1", "lora_fused": "C2", "lora_fused_fa": "C5"}
    cuda = any(s[k]["max_memory_allocated"] is not None for k in kinds)
    fig, axes = plt.subplots(1, 3 if cuda else 2, figsize=(6 * (3 if cuda else 2), 4.4), squeeze=False)
    ax = axes[0][0]
    ax.bar(kinds, [s[k]["saved_bytes"] / MIB for k in kinds], color=[colors[k] for k in kinds])
    if "frozen" in s:
        ax.axhline(s["frozen"]["saved_bytes"] / MIB, color="black", lw=1, ls="--", label="frozen")
        if result["qkv_x_bytes"] is not None:
            bound = (s["frozen"]["saved_bytes"] + result["qkv_x_bytes"] + result["qkv_h_bytes"]) / MIB
            ax.axhline(bound, color="C2", lw=1, ls=":", label="frozen + x + h")
        ax.axhline(s["frozen"]["saved_bytes"] / MIB + 2, color="C5", lw=1, ls=":", label="frozen + 2 MiB")
        ax.legend(fontsize=8)
    ax.set_ylabel("MiB saved for backward (one forward)")
    ax.set_title("saved for backward (lower is better)")
    ax = axes[0][1]
    ax.bar(kinds, [s[k]["median_step_ms"] or 0 for k in kinds], color=[colors[k] for k in kinds])
    ax.set_ylabel("median ms per training step")
    ax.set_title("step time")
    if cuda:
        ax = axes[0][2]
        ax.bar(kinds, [(s[k]["max_memory_allocated"] or 0) / MIB for k in kinds], color=[colors[k] for k in kinds])
        ax.set_ylabel("MiB")
        ax.set_title("torch.cuda.max_memory_allocated in a step")
    for a in axes[0]:
        a.tick_params(axis="x", labelsize=8, rotation=15)
        a.grid(axis="y", alpha=0.3)
    m = result["meta"]
    report._save_figure(plt, fig, f"SAM image encoder ({m['config']}), {m['image_size']} px, batch {m['batch']}, "
                        f"r={m['r']}, p={m['dropout']:g}, {m['precision']} · {m['device_name']} · commit {m['commit']}",
                        path)


if __name__ == "__main__":
    raise SystemExit(main())
