"""LoRA-FA (A frozen at its initialisation, B trains): the module keyword, inject_lora, LoraConfig, every path that
sets requires_grad, checkpoints, and PEFT's LoRA-FA optimizer running on lora_fused's op."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lora_fused as lf
from lora_fused import LoRALinear, LoRAQKV
from model_helpers import tiny_vit as vit, trainable

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

IMG = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("cls,kw", [(LoRALinear, {}), (LoRAQKV, {"targets": "qv"})])
def test_module_lora_fa_trains_b_only(cls, kw):
    torch.manual_seed(0)
    m = cls(12, 24, r=2, lora_dropout=0.2, lora_fa=True, **kw).train()
    assert m.lora_fa and not m.lora_A.requires_grad and m.lora_B.requires_grad
    A0 = m.lora_A.detach().clone()
    assert A0.abs().sum() > 0  # A keeps its random (kaiming) initialisation
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 12)).square().sum().backward()
        opt.step()
    assert torch.equal(m.lora_A, A0) and m.lora_A.grad is None and m.lora_B.abs().sum() > 0
    assert "lora_fa=True" in repr(m)


def test_every_requires_grad_path_keeps_a_frozen(tmp_path):
    m = vit()
    lf.inject_lora(m, lf.LoraConfig(["qkv", "fc1"], qkv_targets="qv", lora_fa=True, r=4))
    fa = {f"blocks.{i}.{k}.lora_adapters.default.lora_B" for i in range(2) for k in ("attn.qkv", "mlp.fc1")}
    assert trainable(m) == fa
    lf.mark_only_lora_as_trainable(m)
    assert trainable(m) == fa
    lf.add_adapter(m, "plain", lf.LoraConfig(["fc2"], r=2))  # a plain adapter beside it
    lf.set_adapter(m, "plain")
    assert trainable(m) == {f"blocks.{i}.mlp.fc2.lora_adapters.plain.lora_{ab}" for i in range(2) for ab in "AB"}
    lf.set_adapter(m, "default")
    assert trainable(m) == fa
    # checkpoints record it: the reloaded adapter is LoRA-FA again
    lf.save_lora(m, tmp_path / "fa.safetensors")
    lf.save_lora(m, tmp_path / "p", format="peft", adapter="default")
    for path in ("fa.safetensors", "p"):
        fresh = vit()
        lf.load_lora(fresh, tmp_path / path)
        assert fresh.blocks[0].attn.qkv.lora_fa and not fresh.blocks[0].attn.qkv.lora_A.requires_grad
        assert fresh.blocks[0].mlp.fc1.lora_B.requires_grad
        assert torch.equal(fresh.blocks[0].attn.qkv.lora_A, m.blocks[0].attn.qkv.lora_A)
    sd = lf.lora_state_dict(m)
    other = vit()
    lf.inject_lora(other, ["qkv", "fc1"], qkv_targets="qv", r=4)  # not LoRA-FA
    with pytest.raises(ValueError, match="lora_fa: state dict True, model False"):
        lf.load_lora_state_dict(other, sd)
    with pytest.raises(ValueError, match="lora_fa: checkpoint True, model False"):
        lf.load_lora(other, tmp_path / "fa.safetensors")
    # add_adapter as the model's first adapter, and load_lora_state_dict, keep A frozen too
    first = vit()
    lf.add_adapter(first, "fa", lf.LoraConfig(["qkv"], lora_fa=True))
    lf.load_lora_state_dict(first, {k: v for k, v in lf.lora_state_dict(first).items()})
    assert not first.blocks[0].attn.qkv.lora_A.requires_grad and first.blocks[0].attn.qkv.lora_B.requires_grad


def test_peft_lorafa_optimizer_runs_on_lora_fused():
    """peft.optimizers.create_lorafa_optimizer on a PEFT model running on lora_fused's op (from_peft): A frozen,
    B updated exactly as on PEFT's own forward."""
    from peft.optimizers import create_lorafa_optimizer

    torch.manual_seed(7)
    ref = peft.get_peft_model(vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"],
                                                     init_lora_weights=False))
    fused = copy.deepcopy(ref)
    lf.from_peft(fused)
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    runs = []
    for model in (ref, fused):
        opt = create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-2)
        A0 = [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(IMG), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.equal(p, a) for p, a in zip([p for n, p in model.named_parameters() if "lora_A" in n], A0))
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
        runs.append((losses, [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]))
    assert runs[0][0][-1] < runs[0][0][0]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-6)
    for b_fused, b_ref in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(b_fused, b_ref, rtol=1e-3, atol=1e-5)
