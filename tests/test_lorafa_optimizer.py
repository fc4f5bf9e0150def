"""``lora_fused.create_lorafa_optimizer``: LoRA-FA's projected update of every active adapter's B (per target for a
packed LoRAQKV) and AdamW for the other trainable parameters, matched step by step against PEFT's
``create_lorafa_optimizer`` on a PEFT twin with identical initial weights, and against the formula in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_fused as lf
from lora_fused import LoRAQKV

from model_helpers import tiny_vit

peft = pytest.importorskip("peft")
pytest.importorskip("timm")
lorafa = pytest.importorskip("peft.optimizers.lorafa")

IMG = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
TARGET = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
STEPS = 4


@pytest.fixture(params=["fp32", "peft-default"])
def peft_projection(request, monkeypatch):
    """PEFT computes the projection under bf16 autocast where bf16 is available; "fp32" turns that off, so the two
    optimizers do the same float32 math and must agree closely; "peft-default" runs PEFT as installed."""
    if request.param == "fp32":
        monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    return request.param


def _tolerance(mode):
    return {"rtol": 1e-3, "atol": 1e-5} if mode == "fp32" else {"rtol": 2e-2, "atol": 2e-4}


def _train(model, opt, forward, steps=STEPS):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = forward(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _vit_loss(model):
    return F.mse_loss(model(IMG), TARGET)


# -- single-target LoRALinear layers, per-layer rank/alpha, a trained head, weight decay --------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_peft_on_plain_layers(peft_projection, weight_decay):
    torch.manual_seed(7)
    patterns = {"rank_pattern": {"fc1": 2}, "alpha_pattern": {"fc1": 6}}
    ref = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"],
                                                          init_lora_weights=False, modules_to_save=["head"],
                                                          **patterns))
    ours = tiny_vit()
    lf.inject_lora(ours, ["qkv", "fc1"], r=4, lora_alpha=8, lora_fa=True, modules_to_save=["head"], **patterns)
    pairs = []  # (ours module, peft layer)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, lf.LoRABase):
                layer = ref.base_model.model.get_submodule(name)
                module.lora_A.copy_(layer.lora_A["default"].weight)
                module.lora_B.copy_(layer.lora_B["default"].weight)
                pairs.append((module, layer))
        # PEFT trains a copy of the head: start ours from the same values
        ours.head.load_state_dict(ref.base_model.model.head.modules_to_save["default"].state_dict())
    assert {m.scaling for m, _ in pairs} == {2.0, 3.0}  # per-layer scaling is exercised
    A0 = [m.lora_A.detach().clone() for m, _ in pairs]
    opt_ref = lorafa.create_lorafa_optimizer(ref, r=4, lora_alpha=8, lr=1e-2, weight_decay=weight_decay)
    opt = lf.create_lorafa_optimizer(ours, lr=1e-2, weight_decay=weight_decay)
    assert [g["name"] for g in opt.param_groups] == ["lora_B", "other"]
    assert opt.param_groups[1]["params"] == [ours.head.weight, ours.head.bias]
    losses_ref = _train(ref, opt_ref, _vit_loss)
    losses = _train(ours, opt, _vit_loss)
    assert losses_ref[-1] < losses_ref[0]
    tol = _tolerance(peft_projection)
    torch.testing.assert_close(losses, losses_ref, **tol)
    for (m, layer), a0 in zip(pairs, A0):
        assert torch.equal(m.lora_A, a0) and not m.lora_A.requires_grad
        assert not torch.equal(m.lora_B, layer.lora_B["default"].weight.new_zeros(m.lora_B.shape))
        torch.testing.assert_close(m.lora_B, layer.lora_B["default"].weight, **tol)
    head_ref = ref.base_model.model.head.modules_to_save["default"]
    torch.testing.assert_close(ours.head.weight, head_ref.weight, **tol)
    torch.testing.assert_close(ours.head.bias, head_ref.bias, **tol)


# -- a packed LoRAQKV (q and v) against PEFT on split q / v linears -------------------------------------------------------
class FusedAttention(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(3 * dim, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.qkv(x)))


class SplitAttention(nn.Module):
    def __init__(self, fused: FusedAttention):
        super().__init__()
        dim = fused.qkv.in_features
        for i, name in enumerate("qkv"):
            lin = nn.Linear(dim, dim)
            with torch.no_grad():
                lin.weight.copy_(fused.qkv.weight[i * dim:(i + 1) * dim])
                lin.bias.copy_(fused.qkv.bias[i * dim:(i + 1) * dim])
            setattr(self, name, lin)
        self.out = copy.deepcopy(fused.out)

    def forward(self, x):
        return self.out(torch.tanh(torch.cat([self.q(x), self.k(x), self.v(x)], -1)))


X = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
Y = torch.randn(32, 3, generator=torch.Generator().manual_seed(4))


def _attn_loss(model):
    return F.mse_loss(model(X), Y)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_per_target_on_a_fused_qkv(peft_projection, use_rslora):
    torch.manual_seed(0)
    fused = FusedAttention()
    split = SplitAttention(fused)
    ref = peft.get_peft_model(split, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q", "v"],
                                                     init_lora_weights=False, use_rslora=use_rslora))
    lf.inject_lora(fused, ["qkv"], qkv_targets="qv", r=3, lora_alpha=5, lora_fa=True, use_rslora=use_rslora)
    qkv = fused.qkv
    assert isinstance(qkv, LoRAQKV) and qkv.spec.targets == ("q", "v")
    with torch.no_grad():
        for t in "qv":
            layer = getattr(ref.base_model.model, t)
            qkv.lora_A_for(t).copy_(layer.lora_A["default"].weight)
            qkv.lora_B_for(t).copy_(layer.lora_B["default"].weight)
    A0 = qkv.lora_A.detach().clone()
    torch.testing.assert_close(fused(X), ref(X))
    opt_ref = lorafa.create_lorafa_optimizer(ref, r=3, lora_alpha=5, lr=5e-3)
    opt = lf.create_lorafa_optimizer(fused, lr=5e-3)
    losses_ref = _train(ref, opt_ref, _attn_loss)
    losses = _train(fused, opt, _attn_loss)
    tol = _tolerance(peft_projection)
    torch.testing.assert_close(losses, losses_ref, **tol)
    assert torch.equal(qkv.lora_A, A0)
    for t in "qv":
        torch.testing.assert_close(qkv.lora_B_for(t), getattr(ref.base_model.model, t).lora_B["default"].weight,
                                   **tol)


# -- the formula in float64, without PEFT ------------------------------------------------------------------------------
def test_one_step_is_the_projected_adamw_step():
    torch.manual_seed(1)
    m = LoRAQKV(12, 18, r=2, lora_alpha=3, targets="qkv", lora_fa=True)
    head = nn.Linear(18, 2)
    model = nn.Sequential(m, head)
    with torch.no_grad():
        m.lora_B.normal_()
    B0, W0, A = m.lora_B.detach().double().clone(), head.weight.detach().double().clone(), m.lora_A.double()
    lr, wd, b1, b2, eps = 0.05, 0.2, 0.8, 0.9, 1e-6
    opt = lf.create_lorafa_optimizer(model, lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    model(torch.randn(7, 12)).square().sum().backward()
    gB, gW = m.lora_B.grad.double(), head.weight.grad.double()
    opt.step()

    def adamw(p0, g):
        mom, var = (1 - b1) * g, (1 - b2) * g * g
        p1 = p0 - lr * math.sqrt(1 - b2) / (1 - b1) * mom / (var.sqrt() + eps)
        return p1 - lr * wd * p1  # decoupled, after the step

    s2 = m.scaling ** 2
    projected = torch.cat([gB[b_rows] @ torch.linalg.pinv(A[a_rows] @ A[a_rows].T + 1e-8 * torch.eye(2, dtype=A.dtype))
                           / s2 for _, a_rows, b_rows, _ in m.spec.blocks()])
    torch.testing.assert_close(m.lora_B.double(), adamw(B0, projected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.double(), adamw(W0, gW), rtol=1e-5, atol=1e-6)
    # the targets were projected with their own A_t: with the A of another target the step differs
    wrong = gB[0:6] @ torch.linalg.pinv(A[2:4] @ A[2:4].T) / s2
    assert not torch.allclose(adamw(B0[0:6], wrong), m.lora_B.double()[0:6], rtol=1e-3, atol=1e-4)


# -- what it trains, what it freezes, what it refuses ------------------------------------------------------------------
def test_freezes_a_of_standard_adapters_with_a_warning_and_leaves_other_adapters_alone():
    model = tiny_vit()
    lf.inject_lora(model, ["qkv"], qkv_targets="qv", r=4)
    lf.add_adapter(model, "other", lf.LoraConfig(["fc1"], r=2))
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_A.requires_grad
    other = [p.detach().clone() for p in lf.lora_parameters(model, "other")]
    with pytest.warns(UserWarning, match="froze lora_A of adapters that are not LoRA-FA"):
        opt = lf.create_lorafa_optimizer(model, lr=1e-2)
    assert not qkv.lora_A.requires_grad and qkv.lora_B.requires_grad
    assert [len(g["params"]) for g in opt.param_groups] == [2]  # the two qkv B's; nothing else trains
    _train(model, opt, _vit_loss, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(lf.lora_parameters(model, "other"), other))

    fa = tiny_vit()
    lf.inject_lora(fa, ["qkv"], qkv_targets="qv", r=4, lora_fa=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.create_lorafa_optimizer(fa, lr=1e-2)


def test_refusals_change_nothing():
    with pytest.raises(ValueError, match="no lora_fused adapter"):
        lf.create_lorafa_optimizer(tiny_vit(), lr=1e-3)
    pm = peft.get_peft_model(tiny_vit(), peft.LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(TypeError, match="peft.optimizers.create_lorafa_optimizer"):
        lf.create_lorafa_optimizer(pm, lr=1e-3)
    model = tiny_vit()
    lf.inject_lora(model, ["qkv", "fc1"], r=2)
    model.blocks[1].mlp.fc1.merge()
    with pytest.raises(RuntimeError, match="merged"):
        lf.create_lorafa_optimizer(model, lr=1e-3)
    assert model.blocks[0].attn.qkv.lora_A.requires_grad  # not frozen by the failed call
    model.blocks[1].mlp.fc1.unmerge()
    with pytest.raises(ValueError, match="betas"):
        lf.create_lorafa_optimizer(model, lr=1e-3, betas=(1.0, 0.9))
    assert model.blocks[0].attn.qkv.lora_A.requires_grad


def test_state_dict_round_trip_continues_identically():
    def make():
        model = tiny_vit()
        lf.inject_lora(model, ["qkv"], qkv_targets="qv", r=4, lora_fa=True, modules_to_save=["head"])
        return model, lf.create_lorafa_optimizer(model, lr=1e-2, weight_decay=0.01)

    a, opt_a = make()
    _train(a, opt_a, _vit_loss, steps=2)
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if saved and loaded
    _train(a, opt_a, _vit_loss, steps=2)
    _train(b, opt_b, _vit_loss, steps=2)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
