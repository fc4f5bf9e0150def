"""``lora_summary``: parameter counts and the injected modules, with a readable table from ``str()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch.nn as nn

from ..modules import LoRAQKV
from ._common import lora_modules
from .check import AdapterCheck


@dataclass
class LoRAModuleInfo:
    name: str
    kind: str
    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    targets: Optional[str]  # "qv" for a LoRAQKV, None for a LoRALinear (all outputs)
    params: int  # adapter parameters of this module
    merged: bool


@dataclass
class LoRASummary:
    total: int  # all parameters (shared ones once)
    trainable: int  # requires_grad
    lora: int  # adapter parameters (lora_A, lora_B)
    frozen: int  # total - trainable
    modules: List[LoRAModuleInfo] = field(default_factory=list)
    check: Optional[AdapterCheck] = None  # the check_adapters result passed to lora_summary, shown by str()

    def __str__(self) -> str:
        rows = [("module", "kind", "shape", "r", "alpha", "targets", "lora params")]
        for m in self.modules:
            rows.append((m.name, m.kind + (" (merged)" if m.merged else ""), f"{m.in_features}->{m.out_features}",
                         str(m.r), f"{m.lora_alpha:g}", m.targets or "all", f"{m.params:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
        if not self.modules:
            lines.append("(no LoRA modules)")
        pct = lambda n: f"{100.0 * n / self.total:.2f}%" if self.total else "n/a"
        lines += [
            "",
            f"LoRA modules: {len(self.modules)}",
            f"total params:     {self.total:,}",
            f"trainable params: {self.trainable:,} ({pct(self.trainable)})",
            f"lora params:      {self.lora:,} ({pct(self.lora)})",
            f"frozen params:    {self.frozen:,} ({pct(self.frozen)})",
        ]
        if self.check is not None:
            lines += ["", str(self.check)]
        return "\n".join(lines)


def lora_summary(model: nn.Module, check: Optional[AdapterCheck] = None) -> LoRASummary:
    """Counts of ``total`` / ``trainable`` / ``lora`` / ``frozen`` parameters (elements; shared Parameters once)
    and one :class:`LoRAModuleInfo` per injected module, in model order. ``print(lora_summary(model))`` shows a table.
    ``check``: a :func:`~lora_fused.check_adapters` result, kept in ``.check`` and shown below the table."""
    params = list(model.parameters())  # deduplicated by nn.Module
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    infos, lora = [], 0
    for name, m in lora_modules(model):
        n = m.lora_A.numel() + m.lora_B.numel()
        lora += n
        infos.append(LoRAModuleInfo(
            name=name, kind=type(m).__name__, in_features=m.in_features, out_features=m.out_features, r=m.r,
            lora_alpha=m.lora_alpha, targets="".join(m.targets) if isinstance(m, LoRAQKV) else None, params=n,
            merged=bool(m.merged),
        ))
    return LoRASummary(total=total, trainable=trainable, lora=lora, frozen=total - trainable, modules=infos, check=check)
