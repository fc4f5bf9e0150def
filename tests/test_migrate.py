"""migrate_lora_qkv: SAM fine-tuning's hand-written ``_LoRA_qkv`` wrapper → ``LoRAQKV(targets="qv")``, on
segment-anything's ImageEncoderViT (a small config, random weights, offline)."""

from __future__ import annotations

import copy
import io
from functools import partial

import pytest
import torch
import torch.nn as nn

import lora_fused as lf

sam_modeling = pytest.importorskip("segment_anything.modeling")


class _LoRA_qkv(nn.Module):
    """The wrapper as SAM fine-tuning code writes it: the original qkv Linear plus bias-free low-rank Linears for
    q and v, their outputs added in place into the first and last ``dim`` channels (scaling 1, no dropout)."""

    def __init__(self, qkv, linear_a_q, linear_b_q, linear_a_v, linear_b_v):
        super().__init__()
        self.qkv = qkv
        self.linear_a_q = linear_a_q
        self.linear_b_q = linear_b_q
        self.linear_a_v = linear_a_v
        self.linear_b_v = linear_b_v
        self.dim = qkv.in_features

    def forward(self, x):
        qkv = self.qkv(x)  # (B, H, W, 3·dim) in SAM's image encoder
        new_q = self.linear_b_q(self.linear_a_q(x))
        new_v = self.linear_b_v(self.linear_a_v(x))
        qkv[:, :, :, : self.dim] += new_q
        qkv[:, :, :, -self.dim :] += new_v
        return qkv


def _encoder(seed=0):
    torch.manual_seed(seed)
    return sam_modeling.ImageEncoderViT(
        img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2, out_chans=16, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=2, global_attn_indexes=(1,),
    )


def _wrap(encoder, r=4, seed=1):
    """Put a ``_LoRA_qkv`` on every block's qkv, with nonzero values (as after training); freeze the rest."""
    gen = torch.Generator().manual_seed(seed)
    encoder.requires_grad_(False)
    for blk in encoder.blocks:
        qkv = blk.attn.qkv
        dim = qkv.in_features
        parts = [nn.Linear(dim, r, bias=False), nn.Linear(r, dim, bias=False),
                 nn.Linear(dim, r, bias=False), nn.Linear(r, dim, bias=False)]
        with torch.no_grad():
            for p in parts:
                p.weight.copy_(torch.randn(p.weight.shape, generator=gen) * 0.2)
        blk.attn.qkv = _LoRA_qkv(qkv, *parts)
    return encoder


def test_model_migrates_in_place_with_equal_outputs_and_gradients():
    seeds = _wrap(_encoder())
    x = torch.randn(2, 3, 64, 64)
    ours = copy.deepcopy(seeds)
    names = lf.migrate_lora_qkv(ours)
    ours_before = {n: ours.get_submodule(n).lora_B_for("q").detach().clone() for n in names}
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    for name in names:
        m = ours.get_submodule(name)
        assert isinstance(m, lf.LoRAQKV) and m.targets == ("q", "v") and m.r == 4 and m.scaling == 1.0
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        f"{n}.lora_adapters.default.{p}" for n in names for p in ("lora_A", "lora_B")]

    y_seeds, y_ours = seeds(x), ours(x)
    torch.testing.assert_close(y_ours, y_seeds, atol=1e-5, rtol=1e-5)
    # one SGD step on each: equal gradients give equal adapters afterwards
    g = torch.randn_like(y_seeds)
    for model, y in ((seeds, y_seeds), (ours, y_ours)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        y.backward(g)
        opt.step()
    for name in names:
        old, new = seeds.get_submodule(name), ours.get_submodule(name)
        for t in "qv":
            torch.testing.assert_close(new.lora_A_for(t), getattr(old, f"linear_a_{t}").weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(new.lora_B_for(t), getattr(old, f"linear_b_{t}").weight, atol=1e-5, rtol=1e-4)
        assert not torch.equal(new.lora_B_for("q"), ours_before[name])


def test_state_dict_converts_and_loads_into_an_injected_encoder():
    seeds = _wrap(_encoder())
    x = torch.randn(1, 3, 64, 64)
    expected = seeds(x)
    buf = io.BytesIO()
    torch.save(seeds.state_dict(), buf)  # the seeds' checkpoint, loaded the safe way
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert "blocks.0.attn.qkv.qkv.weight" in sd and "blocks.0.attn.qkv.linear_b_v.weight" in sd

    new_sd = lf.migrate_lora_qkv(sd)
    assert not any("linear_" in k or ".qkv.qkv." in k for k in new_sd)
    assert list(new_sd)[0] == list(sd)[0]  # other keys kept, in order

    fresh = _encoder(seed=5)  # different random base: everything comes from the checkpoint
    lf.inject_lora(fresh, ["qkv"], qkv_targets="qv", r=4, lora_alpha=4)
    fresh.load_state_dict(new_sd, strict=True)
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)
    adapters = lf.lora_state_dict(fresh)
    assert set(adapters) == {f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in ("lora_A", "lora_B", "lora_config")}


def test_errors_name_the_module_and_leave_the_model_as_it_was():
    with pytest.raises(ValueError, match="no _LoRA_qkv-style module"):
        lf.migrate_lora_qkv(_encoder())
    with pytest.raises(ValueError, match="linear_a_q.weight"):
        lf.migrate_lora_qkv({"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        lf.migrate_lora_qkv([1, 2])

    sd = _wrap(_encoder()).state_dict()
    del sd["blocks.1.attn.qkv.linear_b_v.weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv: missing blocks\.1\.attn\.qkv\.linear_b_v\.weight"):
        lf.migrate_lora_qkv(sd)

    broken = _wrap(_encoder())
    broken.blocks[1].attn.qkv.linear_b_v = nn.Linear(4, 7, bias=False)  # not the v width... but fits in N
    broken.blocks[1].attn.qkv.linear_a_v = nn.Linear(48, 3, bias=False)  # rank 3 != rank 4 of q
    before = copy.deepcopy(broken.state_dict())
    flags = [p.requires_grad for p in broken.parameters()]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.linear_a_v has shape \(3, 48\), expected \(4, 48\)"):
        lf.migrate_lora_qkv(broken)
    assert all(isinstance(b.attn.qkv, _LoRA_qkv) for b in broken.blocks)
    assert flags == [p.requires_grad for p in broken.parameters()]
    assert all(torch.equal(before[k], v) for k, v in broken.state_dict().items())
