"""``lora_summary``: parameter counts and the injected modules, with a readable table from ``str()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch.nn as nn

from ._common import check_model, lora_layers
from .check import AdapterCheck


@dataclass
class LoRAModuleInfo:
    name: str
    kind: str  # the module's class ("LoRALinear", "LoRAQKV"; "peft lora.Linear" for a from_peft layer)
    in_features: int
    out_features: int
    r: int  # of the active adapter (0 when the module does not hold it)
    lora_alpha: float
    targets: Optional[str]  # "qv" for a LoRAQKV, None for a LoRALinear (all outputs)
    params: int  # parameters of the module's active adapter
    merged: bool
    adapters: List[str] = field(default_factory=list)  # every adapter the module holds
    lora_fa: bool = False


@dataclass
class LoRASummary:
    total: int  # all parameters (shared ones once)
    trainable: int  # requires_grad
    lora: int  # adapter parameters (lora_A, lora_B) of every adapter
    frozen: int  # total - trainable
    modules: List[LoRAModuleInfo] = field(default_factory=list)
    adapters: List[str] = field(default_factory=list)  # adapter names, in the order they were added
    active_adapter: Optional[str] = None
    check: Optional[AdapterCheck] = None  # the check_adapters result passed to lora_summary, shown by str()

    def __str__(self) -> str:
        rows = [("module", "kind", "shape", "r", "alpha", "targets", "lora params")]
        for m in self.modules:
            kind = m.kind + (" (merged)" if m.merged else "") + (" (LoRA-FA)" if m.lora_fa else "")
            rows.append((m.name, kind, f"{m.in_features}->{m.out_features}", str(m.r) if m.r else "-",
                         f"{m.lora_alpha:g}" if m.r else "-", m.targets or "all", f"{m.params:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
        if not self.modules:
            lines.append("(no LoRA modules)")
        pct = lambda n: f"{100.0 * n / self.total:.2f}%" if self.total else "n/a"  # noqa: E731
        lines += [
            "",
            f"LoRA modules: {len(self.modules)}",
        ]
        if self.adapters:
            lines.append(f"adapters: {', '.join(self.adapters)} (active: {self.active_adapter})")
        lines += [
            f"total params:     {self.total:,}",
            f"trainable params: {self.trainable:,} ({pct(self.trainable)})",
            f"lora params:      {self.lora:,} ({pct(self.lora)})",
            f"frozen params:    {self.frozen:,} ({pct(self.frozen)})",
        ]
        if self.check is not None:
            lines += ["", str(self.check)]
        return "\n".join(lines)


def lora_summary(model: nn.Module, check: Optional[AdapterCheck] = None) -> LoRASummary:
    """Counts of ``total`` / ``trainable`` / ``lora`` / ``frozen`` parameters (elements; shared Parameters once;
    ``lora`` counts every adapter) and one :class:`LoRAModuleInfo` per LoRA module (describing its active adapter),
    in model order. Works on models from :func:`~lora_fused.inject_lora` and :func:`~lora_fused.from_peft`.
    ``print(lora_summary(model))`` shows a table. ``check``: a :func:`~lora_fused.check_adapters` result, kept in
    ``.check`` and shown below the table. ``TypeError`` for something that is not an ``nn.Module``."""
    check_model(model, "lora_summary")
    params = list(model.parameters())  # deduplicated by nn.Module
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    infos, lora, names, active = [], 0, [], set()
    for view in lora_layers(model):
        for adapter in view.adapter_names:
            lora += sum(t.numel() for t in view.tensors(adapter))
            if adapter not in names:
                names.append(adapter)
        name = view.active
        if name is not None:
            active.add(name)
        spec = view.spec(name) if name is not None else None
        base = view.module.get_base_layer() if view.is_peft else view.module
        infos.append(LoRAModuleInfo(
            name=view.name, kind="peft lora.Linear" if view.is_peft else type(view.module).__name__,
            in_features=base.in_features,
            out_features=base.out_features, r=spec.r if spec else 0, lora_alpha=spec.lora_alpha if spec else 0,
            targets="".join(spec.targets) if spec and spec.targets else None,
            params=sum(t.numel() for t in view.tensors(name)) if name is not None else 0,
            merged=view.merged, adapters=view.adapter_names, lora_fa=bool(spec and spec.lora_fa),
        ))
    return LoRASummary(total=total, trainable=trainable, lora=lora, frozen=total - trainable, modules=infos,
                       adapters=names, active_adapter=active.pop() if len(active) == 1 else None, check=check)
