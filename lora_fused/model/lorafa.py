"""LoRA-FA's optimizer (arXiv 2308.03303) for lora_fused models: :func:`create_lorafa_optimizer`.

LoRA-FA freezes ``A`` and trains ``B``. The update ``ΔW = s·ΔB A`` it can make is the projection of full
fine-tuning's gradient onto matrices of that form; the optimizer makes it the best such approximation by
replacing ``B``'s gradient ``g_B = s·G Aᵀ`` (``G`` the gradient of ``W``) with

    ĝ_B = g_B (A Aᵀ + δ I)⁺ / s²,      δ = 1e-8, ⁺ the pseudo-inverse,

per target: for a fused-qkv adapter (``LoRAQKV``) each ``B_t`` (the rows of its projection) is paired with its own
``A_t`` and the adapter's scaling ``s``. ``ĝ_B`` then goes through Hugging Face's AdamW (the ``adamw_hf`` rule that
PEFT's ``LoraFAOptimizer`` uses), as do every other trainable parameter's plain gradients (heads from
``modules_to_save``, biases):

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
    p ← p − lr · √(1 − β₂ᵗ)/(1 − β₁ᵗ) · m / (√v + ε)     (without the two corrections when ``correct_bias=False``)
    p ← p − lr · weight_decay · p                          (decoupled, after the step)

Defaults as PEFT's: ``betas=(0.9, 0.999)``, ``eps=1e-6``, ``correct_bias=True``. PEFT's own function
(``peft.optimizers.create_lorafa_optimizer``) needs a ``PeftModel`` and pairs each ``lora_A`` with the next
``lora_B`` parameter, which cannot express a packed multi-target ``LoRAQKV``; use it for models made by
:func:`~lora_fused.from_peft`, and this one for models made by :func:`~lora_fused.inject_lora` /
:func:`~lora_fused.add_adapter`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._common import check_model, lora_modules, peft_prefix, unwrap

DELTA = 1e-8  # the ridge added to A Aᵀ before its pseudo-inverse (PEFT's value)


class _Projection:
    """How one ``B`` is projected: its adapter's ``A``, the ``(rows of A, rows of B)`` of each target, ``s``."""

    __slots__ = ("lora_A", "blocks", "scaling", "_key", "_inverses")

    def __init__(self, lora_A: torch.Tensor, blocks: Sequence[Tuple[slice, slice]], scaling: float):
        self.lora_A, self.blocks, self.scaling = lora_A, tuple(blocks), float(scaling)
        self._key: Optional[Tuple[int, int]] = None
        self._inverses: List[torch.Tensor] = []

    def inverses(self) -> List[torch.Tensor]:
        """``(A_t A_tᵀ + δ I)⁺`` per target, in float32. ``A`` is frozen, so they are computed once and again
        only when ``A`` has been written to (loaded or replaced) since."""
        A = self.lora_A
        key = (A.data_ptr(), A._version)
        if key != self._key:
            with torch.no_grad():
                A32 = A.detach().float()
                eye = torch.eye(A32.shape[0] // len(self.blocks), device=A32.device, dtype=torch.float32)
                self._inverses = [torch.linalg.pinv(A32[a_rows] @ A32[a_rows].T + DELTA * eye)
                                  for a_rows, _ in self.blocks]
            self._key = key
        return self._inverses

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """``ĝ_B``: each target's rows of ``grad`` times its inverse, over ``s²``; in ``grad``'s dtype."""
        g32 = grad.float()
        out = torch.empty_like(g32)
        for (_, b_rows), inv in zip(self.blocks, self.inverses()):
            out[b_rows] = g32[b_rows] @ inv
        return out.div_(self.scaling ** 2).to(grad.dtype)


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (Hugging Face's ``adamw_hf`` rule) in which every LoRA-FA ``B`` is stepped with its projected gradient
    (see :mod:`lora_fused.model.lorafa`). Made by :func:`create_lorafa_optimizer`; the param group ``"lora_B"``
    holds the adapters' ``B``, the group ``"other"`` everything else that trains (each group has ``lr``,
    ``betas``, ``eps``, ``weight_decay``, ``correct_bias`` and ``name``; LR schedulers work as on any optimizer).
    ``state_dict()`` / ``load_state_dict()`` hold the moments and step counts (per parameter, as torch's AdamW)."""

    def __init__(self, param_groups: List[Dict], projections: Dict[torch.Tensor, _Projection], lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        if not lr >= 0.0:
            raise ValueError(f"create_lorafa_optimizer: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"create_lorafa_optimizer: betas must be in [0, 1), got {tuple(betas)}")
        if not eps >= 0.0:
            raise ValueError(f"create_lorafa_optimizer: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"create_lorafa_optimizer: weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": bool(correct_bias)}
        super().__init__(param_groups, defaults)
        self._projections = projections

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One step; ``closure`` (re-evaluating the loss, with grad enabled) is called first if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("create_lorafa_optimizer: sparse gradients are not supported")
                grad = p.grad
                projection = self._projections.get(p)
                if projection is not None:
                    grad = projection.project(grad)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(eps)
                step_size = lr
                if group["correct_bias"]:
                    t = state["step"]
                    step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if decay > 0.0:
                    p.add_(p, alpha=-lr * decay)
        return loss


def create_lorafa_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, *,
                            betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                            correct_bias: bool = True) -> LoraFAOptimizer:
    """LoRA-FA's optimizer for a model with lora_fused adapters (:func:`~lora_fused.inject_lora`,
    :func:`~lora_fused.add_adapter`): every module's active adapter has its ``B`` stepped with the LoRA-FA
    projection of its gradient (per target for a ``LoRAQKV``, with that adapter's scaling), and every other
    parameter that requires grad (heads from ``modules_to_save``, trained biases) with the same AdamW rule on its
    plain gradient. The math and the defaults are PEFT's ``create_lorafa_optimizer``'s (see
    :mod:`lora_fused.model.lorafa`); the projection is computed in float32.

    As PEFT's function does, this one freezes ``A`` (``requires_grad=False``) of every active adapter. For an
    adapter made with ``lora_fa=True`` that changes nothing; for any other it warns, because ``set_adapter`` and
    ``mark_only_lora_as_trainable`` would make its ``A`` trainable again (make it ``lora_fa=True`` to keep it
    frozen). Modules without the active adapter (they compute their base) take no part.

    Args:
        model: the model (DDP / ``torch.compile`` wrappers are looked through).
        lr: learning rate.  weight_decay: decoupled weight decay, applied after the step (PEFT's placement).
        betas, eps, correct_bias: AdamW's coefficients, ``ε`` added to ``√v``, and whether the step size carries
            Adam's bias corrections.

    Raises:
        TypeError: ``model`` is a PEFT model (use ``peft.optimizers.create_lorafa_optimizer``).
        ValueError: the model has no lora_fused adapter whose ``B`` trains; a hyper-parameter is out of range.
        RuntimeError: an adapter is merged into its base weight (training it would not change the output), or
            the adapters are sharded (FSDP2: the projection needs the whole ``A``).
        Nothing is frozen when it raises.
    """
    check_model(model, "create_lorafa_optimizer")
    if peft_prefix(unwrap(model)):
        raise TypeError("create_lorafa_optimizer: the model is a PEFT model; use peft.optimizers."
                        "create_lorafa_optimizer (it runs on lora_fused's op after from_peft)")
    projections: Dict[torch.Tensor, _Projection] = {}
    to_freeze: List[Tuple[str, torch.Tensor]] = []
    merged = []
    for name, module in lora_modules(model):
        if not module.has_active_adapter():
            continue
        adapter = module.lora_adapters[module.active_adapter]
        if module.merged_adapter is not None:
            merged.append(name)
            continue
        A, B = adapter.lora_A, adapter.lora_B
        if hasattr(A, "full_tensor") or hasattr(B, "full_tensor"):
            raise RuntimeError(f"create_lorafa_optimizer: {name}'s adapter is sharded (FSDP2); the LoRA-FA "
                               "projection needs the whole lora_A on every rank")
        if A.requires_grad:
            to_freeze.append((name, A))
        if B.requires_grad and B not in projections:
            blocks = [(a_rows, b_rows) for _, a_rows, b_rows, _ in adapter.spec.blocks()]
            projections[B] = _Projection(A, blocks, adapter.spec.scaling)
    if merged:
        raise RuntimeError(f"create_lorafa_optimizer: adapters merged into their base weight in {merged}; "
                           "unmerge (or reload) before training")
    if not projections:
        raise ValueError("create_lorafa_optimizer: the model has no lora_fused adapter whose lora_B trains "
                         "(call inject_lora first; a PEFT model uses peft.optimizers.create_lorafa_optimizer)")
    frozen_now = {id(A) for _, A in to_freeze}
    others = [p for p in unwrap(model).parameters()
              if p.requires_grad and p not in projections and id(p) not in frozen_now]
    groups = [{"params": list(projections), "name": "lora_B"}]
    if others:
        groups.append({"params": others, "name": "other"})
    optimizer = LoraFAOptimizer(groups, projections, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                correct_bias=correct_bias)
    if to_freeze:
        for _, A in to_freeze:
            A.requires_grad_(False)
        names = [name for name, _ in to_freeze]
        shown = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
        warnings.warn(f"create_lorafa_optimizer: froze lora_A of adapters that are not LoRA-FA ({shown}), as "
                      "PEFT's LoRA-FA optimizer does; set_adapter or mark_only_lora_as_trainable would make them "
                      "trainable again (inject with lora_fa=True to keep A frozen)", UserWarning, stacklevel=2)
    return optimizer
