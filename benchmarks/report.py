"""Outputs of the suite: CSV, JSON, a markdown table, a console table and PNG plots."""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Sequence

# Every result row has exactly these keys, in this order (CSV header and JSON row keys).
ENV_COLUMNS = ["device", "device_name", "dtype", "torch", "triton", "peft", "lora_fused", "commit", "date", "threads"]
CASE_COLUMNS = [
    "op", "shape", "M", "K", "N", "r", "lora_alpha", "method", "backend", "p", "mode",
    "median_ms", "iqr_ms", "min_ms", "reps", "ratio_to_floor", "ratio_to_floor_paired",
    "saved_bytes", "saved_ratio_to_floor", "saved_over_x", "peak_bytes", "peak_ratio_to_floor",
    "rel_err_vs_plain", "note",
]
SCHEMA = ENV_COLUMNS + CASE_COLUMNS

FILES = {"csv": "results.csv", "json": "results.json", "md": "results.md", "time_png": "time_ratio.png",
         "mem_png": "memory.png"}


def complete_rows(rows: Sequence[Dict], env: Dict[str, str]) -> List[Dict]:
    out = []
    for row in rows:
        full = {k: env.get(k, "") for k in ENV_COLUMNS}
        full.update({k: row.get(k) for k in CASE_COLUMNS})
        out.append(full)
    return out


def write_csv(rows: Sequence[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCHEMA)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SCHEMA})


def write_json(rows: Sequence[Dict], meta: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "schema": SCHEMA, "rows": list(rows)}, f, indent=1)


def _label(row: Dict) -> str:
    m = row["method"]
    return f"{m}[{row['backend']}]" if row.get("backend") else m


def _f(v, spec: str, empty: str = "-") -> str:
    return empty if v is None or v == "" else format(v, spec)


def _mib(v) -> str:
    return "-" if v is None or v == "" else f"{v / 2**20:.2f}"


def groups(rows: Sequence[Dict]):
    """Rows grouped by (op, shape, mode), in first-seen order."""
    seen: Dict[tuple, List[Dict]] = {}
    for row in rows:
        seen.setdefault((row["op"], row["shape"], row["mode"]), []).append(row)
    return seen


def markdown(rows: Sequence[Dict], meta: Dict) -> str:
    from .host_overhead import is_host_row, markdown as host_markdown

    host_lines = host_markdown(rows)
    rows = [r for r in rows if not is_host_row(r)]
    lines = []
    if meta:
        lines.append(
            f"Device: **{meta.get('device_name', '?')}** · dtype {meta.get('dtype', '?')} · r={meta.get('r', '?')} "
            f"(alpha {meta.get('lora_alpha', '?')}) · torch {meta.get('torch', '?')} · triton {meta.get('triton', '?')} "
            f"· peft {meta.get('peft', '?')} · commit {meta.get('commit', '?')} · {meta.get('date', '?')}"
        )
        lines.append("")
        if meta.get("command"):
            lines.append(f"Command: `{meta['command']}`")
            lines.append("")
        for note in meta.get("notes", []):
            lines.append(f"- {note}")
        if meta.get("notes"):
            lines.append("")
    show_peak = any(r.get("peak_bytes") not in (None, "") for r in rows)
    summary = headline(rows)
    if summary:
        lines.append("Summary (fwd+bwd at the largest p):")
        lines.append("")
        lines += [f"- {s}" for s in summary]
        lines.append("")
    for (op, shape, mode), rs in groups(rows).items():
        r0 = rs[0]
        lines.append(f"### {op} · {shape} ({r0['M']}x{r0['K']}->{r0['N']}) · {mode}")
        lines.append("")
        head = ["method", "p", "median ms", "IQR ms", "x floor", "x floor (paired)"]
        if mode == "fwd+bwd":
            head += ["saved MiB", "saved / x"]
        if show_peak:
            head += ["peak MiB", "peak x floor"]
        head += ["rel err vs plain (p=0)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rs:
            cells = [_label(r), "-" if r["method"] == "floor" else f"{r['p']:g}", _f(r["median_ms"], ".2f"),
                     _f(r["iqr_ms"], ".2f"), _f(r["ratio_to_floor"], ".3f"), _f(r.get("ratio_to_floor_paired"), ".3f")]
            if mode == "fwd+bwd":
                cells += [_mib(r.get("saved_bytes")), _f(r.get("saved_over_x"), ".3f")]
            if show_peak:
                cells += [_mib(r.get("peak_bytes")), _f(r.get("peak_ratio_to_floor"), ".3f")]
            cells += [_f(r.get("rel_err_vs_plain"), ".1e")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "median/IQR: milliseconds per call over the timed repetitions (methods interleaved round-robin). "
        "x floor: median over the frozen nn.Linear's median in the same mode (fwd+bwd floor: gradient to x only); "
        "x floor (paired): the median over repetitions of time / floor's time in the same repetition (steadier on a "
        "busy machine). "
        "saved: bytes autograd keeps for backward (distinct storages, parameters excluded; the floor keeps none); "
        "saved / x: that over bytes(x). peak (CUDA): peak allocated memory of one call above what was allocated "
        "before it. rel err: max |out - plain| / max |plain| of the eval forward at p=0."
    )
    if host_lines:
        lines += [""] + host_lines
    return "\n".join(lines) + "\n"


def console_table(rows: Sequence[Dict]) -> str:
    from .host_overhead import is_host_row

    rows = [r for r in rows if not is_host_row(r)]
    out = []
    show_peak = any(r.get("peak_bytes") not in (None, "") for r in rows)
    hdr = f"{'op':<7}{'shape':<12}{'mode':<9}{'method':<30}{'p':>5}{'median ms':>11}{'IQR':>9}{'x floor':>9}{'paired':>8}{'saved MiB':>11}{'/x':>7}"
    if show_peak:
        hdr += f"{'peak MiB':>10}{'x floor':>9}"
    out.append(hdr)
    out.append("-" * len(hdr))
    for (op, shape, mode), rs in groups(rows).items():
        for r in rs:
            line = (
                f"{op:<7}{shape:<12}{mode:<9}{_label(r):<30}{('-' if r['method'] == 'floor' else format(r['p'], 'g')):>5}"
                f"{_f(r['median_ms'], '.2f'):>11}{_f(r['iqr_ms'], '.2f'):>9}{_f(r['ratio_to_floor'], '.3f'):>9}"
                f"{_f(r.get('ratio_to_floor_paired'), '.3f'):>8}"
                f"{_mib(r.get('saved_bytes')):>11}{_f(r.get('saved_over_x'), '.2f'):>7}"
            )
            if show_peak:
                line += f"{_mib(r.get('peak_bytes')):>10}{_f(r.get('peak_ratio_to_floor'), '.3f'):>9}"
            out.append(line)
        out.append("")
    return "\n".join(out)


def _series_label(r: Dict) -> str:
    return _label(r) if r["method"] == "floor" else f"{_label(r)} p={r['p']:g}"


def plot(rows: Sequence[Dict], out_dir: str, title: str = "") -> List[str]:
    """``time_ratio.png`` (time / floor per shape and method, one panel per mode) and ``memory.png``
    (saved-for-backward MiB per method; on CUDA also the peak of fwd+bwd). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .host_overhead import is_host_row

    rows = [r for r in rows if not is_host_row(r)]
    written = []
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(7 * max(1, len(modes)), 4.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rs = [r for r in rows if r["mode"] == mode and r["method"] != "floor"]
        _grouped_bars(ax, rs, "ratio_to_floor", lambda v: v)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_ylabel("time / floor (frozen nn.Linear)")
        ax.set_title(f"{mode}: time relative to the floor (lower is better)")
    written.append(_save_figure(plt, fig, title, os.path.join(out_dir, FILES["time_png"])))

    train = [r for r in rows if r["mode"] == "fwd+bwd"]
    has_peak = any(r.get("peak_bytes") not in (None, "") for r in train)
    ncols = 2 if has_peak else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.8), squeeze=False)
    _grouped_bars(axes[0][0], train, "saved_bytes", lambda v: v / 2**20)
    axes[0][0].set_ylabel("MiB saved for backward")
    axes[0][0].set_title("fwd+bwd: saved-for-backward memory (lower is better)")
    if has_peak:
        _grouped_bars(axes[0][1], train, "peak_bytes", lambda v: v / 2**20)
        axes[0][1].set_ylabel("MiB, peak allocated in fwd+bwd")
        axes[0][1].set_title("fwd+bwd: CUDA peak allocated memory")
    written.append(_save_figure(plt, fig, title, os.path.join(out_dir, FILES["mem_png"])))
    return written


_COLORS = {"floor": "0.6", "plain": "C0", "peft": "C1", "lora_fused[torch]": "C2", "lora_fused[triton]": "C3",
           "lora_fused[cuda]": "C4", "lora_fused_fa[torch]": "C5", "lora_fused_fa[triton]": "C6",
           "lora_fused_fa[cuda]": "C7", "lora_fused_2adapters[torch]": "C8", "lora_fused_2adapters[triton]": "C9",
           "lora_fused_2adapters[cuda]": "0.3"}


def _save_figure(plt, fig, title, path):
    """Title, lay out, write ``path`` and close ``fig``; returns ``path``."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grouped_bars(ax, rows: Sequence[Dict], key: str, tf) -> None:
    cases = []
    for r in rows:
        c = f"{r['op']}\n{r['shape']}"
        if c not in cases:
            cases.append(c)
    series = []
    for r in rows:
        s = _series_label(r)
        if s not in series:
            series.append(s)
    if not cases or not series:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs, ys = [], []
        for j, c in enumerate(cases):
            for r in rows:
                if f"{r['op']}\n{r['shape']}" == c and _series_label(r) == s and r.get(key) not in (None, ""):
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(tf(r[key]))
        r0 = next(r for r in rows if _series_label(r) == s)
        ax.bar(xs, ys, width=width, label=s, color=_COLORS.get(_label(r0), None),
               hatch="//" if (r0["method"] != "floor" and r0["p"] > 0) else None, edgecolor="white")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)


def headline(rows: Sequence[Dict]) -> List[str]:
    """One line per (op, shape) at fwd+bwd with the largest p: ratios to the floor and saved / x per method."""
    from .host_overhead import is_host_row

    lines = []
    for (op, shape, mode), rs in groups([r for r in rows if not is_host_row(r)]).items():
        if mode != "fwd+bwd":
            continue
        pmax = max(r["p"] for r in rs)
        parts = []
        for r in rs:
            if r["method"] == "floor" or r["p"] != pmax:
                continue
            if r.get("ratio_to_floor") is None:
                parts.append(f"{_label(r)} {r.get('note') or 'no result'}")
                continue
            parts.append(f"{_label(r)} {r['ratio_to_floor']:.2f}x floor, saves {_f(r.get('saved_over_x'), '.2f')}x bytes(x)")
        lines.append(f"{op} {shape} fwd+bwd p={pmax:g}: " + "; ".join(parts))
    return lines
