"""Fine-tune a small ViT with LoRA on q and v (SAM style): PEFT next to lora_fused, same seed, same data.

    python benchmarks/train_vit.py --steps 20                 # CPU (112 px, batch 8), a few minutes
    python benchmarks/train_vit.py --device cuda --steps 200  # GPU: step time and peak memory

The encoder is timm's ``vit_tiny_patch16_224`` architecture built with ``pretrained=False`` (a small
hand-written ViT with the same fused-qkv attention when timm is not installed), with a 10-class head, on a
synthetic task: each class is a fixed random smooth pattern, each image that pattern plus noise.

Both runs start from the same frozen encoder and the same adapter values, train the adapters and the head with
AdamW on the same batches, interleaved step by step (so machine noise hits both alike):

* ``lora_fused``: every ``attn.qkv`` becomes ``LoRAQKV.from_linear(qkv, targets="qv")``.
* ``peft``: PEFT cannot put adapters on the q and v slices of a fused qkv (peft PR #1705 was closed), so with
  ``--peft-mode split`` (default) every ``attn.qkv`` is split into three linears ``q``, ``k``, ``v`` holding the
  same weights (outputs concatenated) and PEFT targets ``q`` and ``v``: the same function as ours, so at p=0 the
  two loss curves agree up to float rounding. ``--peft-mode qkv`` instead puts PEFT's adapter on the whole fused
  qkv (adapters on k too, more parameters, a different function: curves then differ).

Reported: median step time; on CUDA the peak allocated memory of a step above the resident model; on every
device the bytes autograd saves for backward in one forward (parameters excluded); the loss curves (PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, report  # noqa: E402


# ----------------------------------------------------------------------------------------------- models
class MiniAttention(nn.Module):
    """timm-style attention with one fused ``qkv`` linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MiniBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MiniAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MiniViT(nn.Module):
    """A ViT-Tiny-sized encoder (dim 192, 12 blocks, 3 heads, patch 16) with a class token and a head."""

    def __init__(self, img_size: int, num_classes: int, dim: int = 192, depth: int = 12, heads: int = 3, patch: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[MiniBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build_encoder(kind: str, img_size: int, num_classes: int) -> nn.Module:
    if kind in ("timm", "auto"):
        try:
            import timm

            return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, num_classes=num_classes)
        except ImportError:
            if kind == "timm":
                raise
    return MiniViT(img_size, num_classes)


class SplitQKV(nn.Module):
    """A fused qkv linear split into ``q``, ``k``, ``v`` linears (same weights); returns ``cat(q, k, v)``."""

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        d = qkv.out_features // 3
        for i, name in enumerate("qkv"):
            lin = nn.Linear(qkv.in_features, d, bias=qkv.bias is not None,
                            device=qkv.weight.device, dtype=qkv.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(qkv.weight[i * d:(i + 1) * d])
                if qkv.bias is not None:
                    lin.bias.copy_(qkv.bias[i * d:(i + 1) * d])
            setattr(self, name, lin)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def qkv_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if name.endswith("attn.qkv") and isinstance(m, nn.Linear)]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def make_lora_fused(base: nn.Module, r: int, alpha: float, p: float) -> nn.Module:
    from lora_fused import LoRAQKV

    model = copy.deepcopy(base)
    model.requires_grad_(False)
    for name, qkv in qkv_modules(model):
        _set(model, name, LoRAQKV.from_linear(qkv, targets="qv", r=r, lora_alpha=alpha, lora_dropout=p))
    model.get_submodule("head").requires_grad_(True)
    return model


def make_peft(base: nn.Module, r: int, alpha: float, p: float, mode: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    if mode == "split":
        for name, qkv in qkv_modules(model):
            _set(model, name, SplitQKV(qkv))
        targets = r".*attn\.qkv\.(q|v)"
    else:
        targets = r".*attn\.qkv"
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=targets, bias="none"))
    inner = pm.base_model.model
    inner.get_submodule("head").requires_grad_(True)
    return inner


def copy_adapters(ours: nn.Module, peft_model: nn.Module, mode: str) -> None:
    """Give PEFT's adapters the values of ours (same init, so the runs are the same function at p=0)."""
    peft_qkv = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, m in ours.named_modules():
            if not name.endswith("attn.qkv") or not hasattr(m, "lora_A_for"):
                continue
            if mode == "split":
                for t in "qv":
                    layer = peft_qkv[f"{name}.{t}"]
                    layer.lora_A["default"].weight.copy_(m.lora_A_for(t))
                    layer.lora_B["default"].weight.copy_(m.lora_B_for(t))
            else:
                layer = peft_qkv[name]
                layer.lora_A["default"].weight.copy_(m.lora_A_for("q"))
    # Both heads start from the base head (deep copies of it): nothing to copy.


# ----------------------------------------------------------------------------------------------- data
class SyntheticTask:
    """Class c's images: a fixed random smooth pattern (8x8 upsampled) plus Gaussian noise; fixed per step."""

    def __init__(self, num_classes: int, img_size: int, seed: int, noise: float = 1.0):
        gen = torch.Generator().manual_seed(seed + 100)
        low = torch.randn(num_classes, 3, 8, 8, generator=gen)
        self.templates = F.interpolate(low, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.num_classes, self.seed, self.noise = num_classes, seed, noise

    def batch(self, step: int, batch: int):
        gen = torch.Generator().manual_seed(self.seed + 1000 + step)
        y = torch.randint(0, self.num_classes, (batch,), generator=gen)
        x = self.templates[y] + self.noise * torch.randn(batch, *self.templates.shape[1:], generator=gen)
        return x, y


# ----------------------------------------------------------------------------------------------- run
def trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def add_run_args(ap: argparse.ArgumentParser, prefix: str) -> None:
    """The options every training example shares: --device, --backend, --seed, --threads, --out."""
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if visible)")
    ap.add_argument("--backend", default=None, help="lora_fused backend (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help=f"output directory (default benchmarks/results/{prefix}-<device>-<date>/)")


def setup_run(args: argparse.Namespace):
    """Applies --threads; returns ``(device, is_cuda)``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or harness.best_device()
    return device, torch.device(device).type == "cuda"


def measured_step(step: Callable[[], object], is_cuda: bool):
    """Runs ``step()`` once: ``(its result, ms, CUDA peak allocated above what was allocated before it, CUDA
    absolute peak)``; the peaks are None off CUDA."""
    if is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = step()
    if is_cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    if not is_cuda:
        return out, ms, None, None
    peak = int(torch.cuda.max_memory_allocated())
    return out, ms, peak - before, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    ap.add_argument("--image-size", type=int, default=None, help="default 112 on CPU (50 tokens), 224 on CUDA")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                    help="fp32, or bf16 autocast (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--rank", "-r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="default 2*r")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (default 0: the curves must agree)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--model", default="auto", choices=["auto", "timm", "mini"],
                    help="timm vit_tiny (auto: when timm imports) or the hand-written mini ViT")
    ap.add_argument("--peft-mode", default="split", choices=["split", "qkv"],
                    help="split: PEFT on q and v of split linears (same function); qkv: PEFT on the whole fused qkv")
    add_run_args(ap, "train")
    args = ap.parse_args(argv)
    device, is_cuda = setup_run(args)
    batch = args.batch or (64 if is_cuda else 8)
    args.image_size = args.image_size or (224 if is_cuda else 112)
    precision = args.precision or ("bf16" if is_cuda else "fp32")
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    out = args.out or os.path.join(
        harness.REPO_ROOT, "benchmarks", "results",
        "train-" + os.path.basename(harness.default_out_dir(device)),
    )
    os.makedirs(out, exist_ok=True)
    if harness.peft_available() is not None:
        print(f"peft is not importable ({harness.peft_available()}): nothing to compare against; exiting")
        return 2

    import lora_fused

    torch.manual_seed(args.seed)
    base = build_encoder(args.model, args.image_size, 10).to(device)
    base_kind = "timm vit_tiny_patch16_224" if not isinstance(base, MiniViT) else "mini ViT (dim 192, depth 12)"
    base.requires_grad_(False)
    torch.manual_seed(args.seed + 1)
    ours = make_lora_fused(base, args.rank, alpha, args.dropout)
    theirs = make_peft(base, args.rank, alpha, args.dropout, args.peft_mode)
    copy_adapters(ours, theirs, args.peft_mode)
    del base
    models: Dict[str, nn.Module] = {"lora_fused": ours, "peft": theirs}
    for m in models.values():
        m.train()
    opts = {k: torch.optim.AdamW(trainable(m), lr=args.lr, weight_decay=0.0) for k, m in models.items()}
    n_train = {k: sum(p.numel() for p in trainable(m)) for k, m in models.items()}
    task = SyntheticTask(10, args.image_size, args.seed)
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    backend_ctx = (lambda: lora_fused.use_backend(args.backend)) if args.backend else contextlib.nullcontext

    # Saved-for-backward bytes of one forward (parameters and buffers excluded).
    x0, _ = task.batch(0, batch)
    x0 = x0.to(device)
    saved = {}
    for k, m in models.items():
        frozen = list(m.parameters()) + list(m.buffers())
        with amp, backend_ctx():
            saved[k] = harness.saved_bytes(lambda: m(x0), exclude=frozen)

    losses: Dict[str, List[float]] = {k: [] for k in models}
    times: Dict[str, List[float]] = {k: [] for k in models}
    peaks: Dict[str, List[int]] = {k: [] for k in models}
    print(f"train_vit: {base_kind} at {args.image_size}px, batch {batch}, {args.steps} steps, {precision}, "
          f"r={args.rank}, alpha={alpha:g}, p={args.dropout:g}, device {harness.device_name(device)}; "
          f"PEFT mode: {args.peft_mode}; trainable params: " + ", ".join(f"{k} {v}" for k, v in n_train.items()))
    try:
        from tqdm import tqdm

        steps = tqdm(range(args.steps), desc="train_vit", unit="step", file=sys.stderr, disable=None)
    except ImportError:
        steps = range(args.steps)
    for step in steps:
        x, y = task.batch(step, batch)
        x, y = x.to(device), y.to(device)
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for k in order:
            m, opt = models[k], opts[k]
            torch.manual_seed(args.seed + 10_000 + step)  # the same dropout seeds for both (masks still differ)

            def train_step():
                with amp, backend_ctx():
                    loss = F.cross_entropy(m(x).float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            loss, ms, peak, _ = measured_step(train_step, is_cuda)
            if is_cuda:
                peaks[k].append(peak)
            times[k].append(ms)
            losses[k].append(float(loss.detach()))

    skip = min(3, max(0, args.steps - 1))  # first steps include warm-up (allocator, kernels' compilation)
    summary = {}
    for k in models:
        ts = times[k][skip:] or times[k]
        summary[k] = {
            "median_step_ms": statistics.median(ts),
            "iqr_step_ms": (statistics.quantiles(ts, n=4)[2] - statistics.quantiles(ts, n=4)[0]) if len(ts) > 1 else 0.0,
            "saved_bytes": saved[k],
            "peak_bytes": statistics.median(peaks[k][skip:] or peaks[k]) if peaks[k] else None,
            "trainable_params": n_train[k],
            "final_loss": losses[k][-1],
        }
    diff = max(abs(a - b) for a, b in zip(losses["lora_fused"], losses["peft"]))
    env = harness.environment(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    result = {
        "meta": dict(env, model=base_kind, image_size=args.image_size, batch=batch, steps=args.steps,
                     precision=precision, r=args.rank, lora_alpha=alpha, dropout=args.dropout,
                     peft_mode=args.peft_mode, lr=args.lr, seed=args.seed,
                     command="python benchmarks/train_vit.py " + " ".join(sys.argv[1:] if argv is None else argv)),
        "summary": summary,
        "max_abs_loss_diff": diff,
        "losses": losses,
        "step_ms": times,
        "peak_bytes": peaks,
    }

    # Steps alternate between the two runs, so the per-step ratio cancels slow drifts of a busy machine.
    paired = [a / b for a, b in zip(times["lora_fused"][skip:], times["peft"][skip:]) if b > 0]
    ratio_t = statistics.median(paired) if paired else float("nan")
    result["paired_step_ratio_median"] = ratio_t
    ratio_s = summary["lora_fused"]["saved_bytes"] / max(1, summary["peft"]["saved_bytes"])
    lines = [
        "| | step ms (median, IQR) | saved for backward MiB | peak MiB (CUDA) | trainable | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for k, s in summary.items():
        pk = f"{s['peak_bytes'] / 2**20:.1f}" if s["peak_bytes"] is not None else "-"
        lines.append(f"| {k} | {s['median_step_ms']:.1f} ({s['iqr_step_ms']:.1f}) | {s['saved_bytes'] / 2**20:.1f} | "
                     f"{pk} | {s['trainable_params']} | {s['final_loss']:.4f} |")
    text = "\n".join(lines)
    text += (f"\n\nlora_fused / peft: step time {ratio_t:.3f}x (median of per-step ratios), saved activations {ratio_s:.3f}x"
             + (f", peak {summary['lora_fused']['peak_bytes'] / summary['peft']['peak_bytes']:.3f}x" if is_cuda else "")
             + f"; max |loss difference| over {args.steps} steps: {diff:.2e}"
             + (" (p=0, split PEFT: the same function, so this is float rounding)" if args.dropout == 0 and args.peft_mode == "split" else
                " (not expected to be small: different dropout masks or a different function)"))
    with open(os.path.join(out, "train_vit.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        _plot(result, os.path.join(out, "train_vit.png"))
    except ImportError as exc:
        print(f"note: no PNG plot ({exc}; pip install matplotlib)")
    with open(os.path.join(out, "train_vit.md"), "w") as f:
        f.write(f"{result['meta']['command']}\n\n{base_kind}, {env['device_name']}, {precision}, batch {batch}, "
                f"{args.image_size}px, r={args.rank}, p={args.dropout:g}, PEFT mode {args.peft_mode}, commit {env['commit']}\n\n"
                + text + "\n")
    print(text)
    print(f"written to {out}: train_vit.json, train_vit.png, train_vit.md")
    return 0


def _plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, ls in zip(result["losses"], ["-", "--"]):
        axes[0].plot(result["losses"][k], ls, label=k)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_title(f"loss (max |diff| {result['max_abs_loss_diff']:.1e})")
    axes[0].legend()
    for k in result["step_ms"]:
        axes[1].plot(result["step_ms"][k], label=k)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("ms per step")
    axes[1].set_title("step time")
    axes[1].legend()
    names = list(result["summary"])
    mem_key = "peak_bytes" if result["summary"][names[0]]["peak_bytes"] is not None else "saved_bytes"
    axes[2].bar(names, [result["summary"][k][mem_key] / 2**20 for k in names], color=["C0", "C1"])
    axes[2].set_ylabel("MiB")
    axes[2].set_title("peak allocated per step (CUDA)" if mem_key == "peak_bytes" else "saved for backward (one forward)")
    m = result["meta"]
    report._save_figure(plt, fig, f"{m['model']} · {m['device_name']} · {m['precision']} · batch {m['batch']} · "
                        f"r={m['r']} · p={m['dropout']:g} · PEFT {m['peft_mode']}", path)


if __name__ == "__main__":
    raise SystemExit(main())
