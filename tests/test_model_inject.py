"""inject_lora, mark_only_lora_as_trainable, lora_parameters / lora_state_dict / load_lora_state_dict,
merge_lora, torch.export of a merged model, lora_summary, and an end-to-end training run (pure torch models)."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn as nn

import lora_fused as lf
from lora_fused import LoRALinear, LoRAQKV
from model_helpers import randomize_adapters


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(att @ v)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Encoder(nn.Module):
    """A SAM/ViT-style encoder: blocks with a fused qkv Linear, and a head."""

    def __init__(self, d=16, depth=4, n_out=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def encoder(seed=0, **kw):
    torch.manual_seed(seed)
    return Encoder(**kw)


# -- inject_lora targeting ---------------------------------------------------------------------------------------
def test_regex_is_full_match_and_returns_model_order():
    m = encoder()
    names = lf.inject_lora(m, r"blocks\.(0|1|2)\..*qkv", r=4)
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.2.attn.qkv"]
    assert isinstance(m.blocks[0].attn.qkv, LoRALinear) and not isinstance(m.blocks[3].attn.qkv, LoRALinear)
    # full match: "qkv" alone matches nothing (names are dotted paths)
    with pytest.raises(ValueError, match="matched no module"):
        lf.inject_lora(encoder(), "qkv")


def test_list_uses_peft_suffix_rule_and_exclude():
    m = encoder()
    names = lf.inject_lora(m, ["qkv", "mlp.2"], exclude_modules=["blocks.1.attn.qkv"])
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.2", "blocks.1.mlp.2", "blocks.2.attn.qkv",
                     "blocks.2.mlp.2", "blocks.3.attn.qkv", "blocks.3.mlp.2"]
    # a suffix must end at a '.' boundary: "kv" does not match "qkv"
    with pytest.raises(ValueError):
        lf.inject_lora(encoder(), ["kv"])


def test_callable_stage_prefixes():
    stages = ("blocks.2.", "blocks.3.")
    m = encoder()
    names = lf.inject_lora(m, lambda n, mod: isinstance(mod, nn.Linear) and n.startswith(stages), r=2)
    assert names == [f"blocks.{i}.{s}" for i in (2, 3) for s in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]


def test_rank_and_alpha_pattern_first_match_wins():
    m = encoder()
    lf.inject_lora(m, ["qkv", "proj"], r=4, lora_alpha=8, rank_pattern={"blocks.0.attn.qkv": 2, "qkv": 6},
                   alpha_pattern={"proj": 3})
    assert m.blocks[0].attn.qkv.r == 2 and m.blocks[1].attn.qkv.r == 6 and m.blocks[0].attn.proj.r == 4
    assert m.blocks[0].attn.proj.lora_alpha == 3 and m.blocks[0].attn.qkv.lora_alpha == 8
    assert m.blocks[0].attn.proj.scaling == pytest.approx(3 / 4)


def test_unused_pattern_warns():
    with pytest.warns(UserWarning, match="rank_pattern"):
        lf.inject_lora(encoder(), ["qkv"], rank_pattern={"nonexistent": 2})


def test_qkv_targets_sam_style_only_q_and_v():
    m = encoder()
    names = lf.inject_lora(m, ["qkv", "proj"], qkv_targets="vq", r=4)
    qkv = m.blocks[0].attn.qkv
    assert isinstance(qkv, LoRAQKV) and qkv.targets == ("q", "v")
    assert type(m.blocks[0].attn.proj) is LoRALinear  # non-qkv matches stay LoRALinear
    assert qkv.lora_A.shape == (8, 16) and qkv.lora_B.shape == (32, 4)
    with pytest.raises(KeyError):
        qkv.lora_A_for("k")
    assert len(names) == 8


def test_fresh_injection_computes_the_base_model():
    m = encoder()
    x = torch.randn(2, 5, 16)
    ref = m(x)
    lf.inject_lora(m, ["qkv", "mlp.0"], qkv_targets="qv")
    torch.testing.assert_close(m(x), ref)


# -- inject_lora errors --------------------------------------------------------------------------------------------
def test_matched_non_linear_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"blocks\.0\.attn \(Attention\)"):
        lf.inject_lora(encoder(), ["attn"])
    with pytest.raises(TypeError, match="norm"):
        lf.inject_lora(encoder(), r".*\.(norm|qkv)")


def test_nothing_matched_lists_linear_names():
    with pytest.raises(ValueError) as err:
        lf.inject_lora(encoder(depth=2), ["query"])
    msg = str(err.value)
    assert "blocks.0.attn.qkv" in msg and "head" in msg and "blocks.1.mlp.2" in msg


def test_nothing_matched_is_shortened_for_big_models():
    with pytest.raises(ValueError) as err:
        lf.inject_lora(encoder(depth=40), ["query"])
    msg = str(err.value)
    assert "blocks.*.attn.qkv (x40)" in msg and "161 nn.Linear modules" in msg
    assert len(msg) < 600 and "blocks.17.attn.qkv" not in msg


def test_already_injected_is_a_value_error_and_model_unchanged():
    m = encoder()
    lf.inject_lora(m, ["qkv"])
    before = {n: type(mod) for n, mod in m.named_modules()}
    with pytest.raises(ValueError, match="already"):
        lf.inject_lora(m, ["qkv", "proj"])
    assert {n: type(mod) for n, mod in m.named_modules()} == before
    # other modules can still be added
    assert lf.inject_lora(m, ["proj"])[0] == "blocks.0.attn.proj"


def test_errors_leave_model_unchanged():
    m = encoder()
    with pytest.raises(TypeError):
        lf.inject_lora(m, r"blocks\.0\..*")  # matches the Block, LayerNorm, … as well as Linears
    assert not list(lf.lora_parameters(m))
    with pytest.raises(ValueError, match="r must be"):
        lf.inject_lora(m, ["qkv"], rank_pattern={"blocks.3.attn.qkv": 0})
    assert not list(lf.lora_parameters(m))
    with pytest.raises(ValueError, match="targets"):
        lf.inject_lora(m, ["qkv"], qkv_targets="qx")
    with pytest.raises(TypeError, match="target_modules"):
        lf.inject_lora(m, 3)


def test_multihead_attention_out_proj_refused():
    m = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        lf.inject_lora(m, ["out_proj"])


# -- trainable / state dict -------------------------------------------------------------------------------------
def test_freeze_and_mark_only_lora_as_trainable():
    m = encoder()
    lf.inject_lora(m, ["qkv"], qkv_targets="qv")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.lora_adapters.default.lora_{ab}" for i in range(4) for ab in "AB"}
    lf.mark_only_lora_as_trainable(m, bias="lora_only", modules_to_save=["head"])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"blocks.0.attn.qkv.bias", "head.weight", "head.bias"} <= trainable
    assert "blocks.0.attn.proj.bias" not in trainable and "blocks.0.attn.qkv.weight" not in trainable
    lf.mark_only_lora_as_trainable(m, bias="all")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.proj.bias" in trainable and "blocks.0.norm.bias" in trainable
    assert "head.weight" not in trainable
    with pytest.raises(ValueError, match="bias"):
        lf.mark_only_lora_as_trainable(m, bias="some")
    with pytest.raises(ValueError, match="classifier"):
        lf.mark_only_lora_as_trainable(m, modules_to_save=["classifier"])
    m2 = encoder()
    lf.inject_lora(m2, ["qkv"], freeze=False)
    assert m2.head.weight.requires_grad and not m2.blocks[0].attn.qkv.weight.requires_grad


def test_lora_parameters_and_state_dict():
    m = encoder()
    lf.inject_lora(m, ["qkv", "mlp.0"], qkv_targets="qv", r=2)
    params = list(lf.lora_parameters(m))
    assert len(params) == 16 and params[0] is m.blocks[0].attn.qkv.lora_A
    sd = lf.lora_state_dict(m)
    assert list(sd)[:6] == ["blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B", "blocks.0.attn.qkv.lora_config",
                            "blocks.0.mlp.0.lora_A", "blocks.0.mlp.0.lora_B", "blocks.0.mlp.0.lora_config"]
    assert all(not v.requires_grad for v in sd.values())
    assert sd["blocks.0.attn.qkv.lora_A"].shape == (4, 16)


def test_load_lora_state_dict_strict_names_every_offender():
    src, dst = encoder(), encoder()
    lf.inject_lora(src, ["qkv"], r=4)
    lf.inject_lora(dst, ["qkv"], r=4, rank_pattern={"blocks.1.attn.qkv": 2})
    randomize_adapters(src)
    sd = dict(lf.lora_state_dict(src))
    del sd["blocks.3.attn.qkv.lora_B"]
    sd["blocks.9.attn.qkv.lora_A"] = torch.zeros(4, 16)
    before = {k: v.clone() for k, v in lf.lora_state_dict(dst).items()}
    with pytest.raises(RuntimeError) as err:
        lf.load_lora_state_dict(dst, sd)
    msg = str(err.value)
    for key in ("blocks.3.attn.qkv.lora_B", "blocks.9.attn.qkv.lora_A", "blocks.1.attn.qkv.lora_A",
                "blocks.1.attn.qkv.lora_B"):
        assert key in msg
    assert "rank must match" in msg
    for k, v in lf.lora_state_dict(dst).items():  # nothing loaded
        assert torch.equal(v, before[k])
    # non-strict still refuses the shape mismatch …
    with pytest.raises(RuntimeError, match="blocks.1.attn.qkv"):
        lf.load_lora_state_dict(dst, sd, strict=False)
    # … and without it returns the missing / unexpected keys after loading the rest
    del sd["blocks.1.attn.qkv.lora_A"], sd["blocks.1.attn.qkv.lora_B"]
    missing, unexpected = lf.load_lora_state_dict(dst, sd, strict=False)
    assert sorted(missing) == ["blocks.1.attn.qkv.lora_A", "blocks.1.attn.qkv.lora_B", "blocks.3.attn.qkv.lora_B"]
    assert unexpected == ["blocks.9.attn.qkv.lora_A"]
    assert torch.equal(dst.blocks[0].attn.qkv.lora_B, src.blocks[0].attn.qkv.lora_B)


# -- merge / export / summary ----------------------------------------------------------------------------------------
def test_merge_lora_inplace_and_copy():
    m = encoder()
    lf.inject_lora(m, ["qkv", "mlp.2"], qkv_targets="qv", r=3)
    randomize_adapters(m)
    x = torch.randn(2, 5, 16)
    ref = m(x)
    merged = lf.merge_lora(m, inplace=False)
    assert merged is not m
    assert not any(isinstance(mod, lf.LoRABase) for mod in merged.modules())
    assert type(merged.blocks[0].attn.qkv) is nn.Linear
    assert isinstance(m.blocks[0].attn.qkv, LoRAQKV) and not m.blocks[0].attn.qkv.merged  # original untouched
    torch.testing.assert_close(merged(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    assert merged.blocks[0].attn.qkv.weight.data_ptr() != m.blocks[0].attn.qkv.weight.data_ptr()
    out = lf.merge_lora(m)
    assert out is m and not any(isinstance(mod, lf.LoRABase) for mod in m.modules())
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_merge_lora_bf16_uses_float32_math():
    m = encoder().to(torch.bfloat16)
    lf.inject_lora(m, ["qkv"], r=4)
    randomize_adapters(m)
    qkv = m.blocks[0].attn.qkv
    expected = (qkv.weight.float() + qkv.scaling * qkv.lora_B.float() @ qkv.lora_A.float()).to(torch.bfloat16)
    lf.merge_lora(m)
    assert m.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert torch.equal(m.blocks[0].attn.qkv.weight, expected)


def test_merged_model_exports_with_torch_export():
    m = encoder(depth=2).eval()
    lf.inject_lora(m, ["qkv", "proj"], qkv_targets="qv", r=2)
    randomize_adapters(m)
    x = torch.randn(2, 5, 16)
    ref = m(x)
    merged = lf.merge_lora(m, inplace=False)
    ep = torch.export.export(merged, (x,))
    assert "lora_fused" not in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), ref, rtol=1e-5, atol=1e-5)


def test_lora_summary():
    m = encoder()
    lf.inject_lora(m, ["qkv", "mlp.0"], qkv_targets="qv", r=2, lora_alpha=4)
    s = lf.lora_summary(m)
    total = sum(p.numel() for p in m.parameters())
    per_qkv = 2 * 2 * 16 + 32 * 2
    per_mlp = 2 * 16 + 32 * 2
    assert s.total == total and s.lora == 4 * (per_qkv + per_mlp)
    assert s.trainable == s.lora and s.frozen == total - s.lora
    assert [x.name for x in s.modules][:2] == ["blocks.0.attn.qkv", "blocks.0.mlp.0"]
    assert s.modules[0].targets == "qv" and s.modules[0].r == 2 and s.modules[0].lora_alpha == 4
    assert s.modules[1].targets is None and s.modules[1].params == per_mlp
    text = str(s)
    assert "blocks.0.attn.qkv" in text and "LoRAQKV" in text and f"{s.trainable:,}" in text
    assert re.search(r"trainable params:\s+[\d,]+ \(\d+\.\d\d%\)", text)
    empty = lf.lora_summary(encoder())
    assert empty.lora == 0 and empty.modules == [] and "no LoRA modules" in str(empty)


# -- end to end ------------------------------------------------------------------------------------------------------------
def test_end_to_end_training_sam_style(tmp_path):
    """Inject (q and v of each qkv), freeze, train a few steps: loss drops, only adapters change, k stays the
    base, the checkpoint is a few KB and reloads into a fresh model."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 16)
    y = (x.mean(1)[:, :3] > 0).long().argmax(1)
    m = encoder(seed=3, depth=2)
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    base_k = [b.attn.qkv(x)[..., 16:32].detach() for b in m.blocks]
    lf.inject_lora(m, ["qkv"], qkv_targets="qv", r=4, lora_alpha=8)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
    lossf = nn.CrossEntropyLoss()
    m.train()
    with torch.no_grad():
        first = lossf(m(x), y).item()
    for _ in range(15):
        opt.zero_grad()
        loss = lossf(m(x), y)
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        last = lossf(m(x), y).item()
    assert last < first * 0.8
    state = m.state_dict()
    for k, v in base_state.items():
        assert torch.equal(state[k], v), k  # base weights and everything else unchanged
    changed = [k for k in state if k not in base_state]
    assert sorted(changed) == sorted(k.replace(".lora_", ".lora_adapters.default.lora_")
                                     for k in lf.lora_state_dict(m) if not k.endswith("lora_config"))
    for b, k0 in zip(m.blocks, base_k):
        qkv = b.attn.qkv
        assert qkv.targets == ("q", "v")
        assert qkv.lora_B_for("q").abs().sum() > 0 and qkv.lora_B_for("v").abs().sum() > 0
        torch.testing.assert_close(qkv(x)[..., 16:32], k0)  # k is exactly the base
    path = tmp_path / "adapter.safetensors"
    lf.save_lora(m, path)
    assert os.path.getsize(path) < 16 * 1024
    fresh = encoder(seed=3, depth=2)
    lf.load_lora(fresh, path)
    fresh.eval()
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_qkv_splits_for_grouped_query_attention():
    m = nn.Sequential()
    m.add_module("attn", nn.Module())
    m.attn.qkv = nn.Linear(16, 32)  # q 16, k 8, v 8
    with pytest.raises(ValueError, match="attn.qkv"):
        lf.inject_lora(m, ["qkv"], qkv_targets="qv")  # 32 is not three equal parts
    assert type(m.attn.qkv) is nn.Linear
    lf.inject_lora(m, ["qkv"], qkv_targets="qv", qkv_splits=(16, 8, 8), r=2)
    qkv = m.attn.qkv
    assert qkv.splits == (16, 8, 8) and qkv.lora_B.shape == (24, 2) and qkv.lora_B_for("v").shape == (8, 2)
    randomize_adapters(m)
    x = torch.randn(3, 16)
    base = nn.functional.linear(x, qkv.weight, qkv.bias)
    out = qkv(x)
    torch.testing.assert_close(out[:, 16:24], base[:, 16:24], rtol=0, atol=0)
    expected_v = base[:, 24:] + qkv.scaling * (x @ qkv.lora_A_for("v").t()) @ qkv.lora_B_for("v").t()
    torch.testing.assert_close(out[:, 24:], expected_v, rtol=1e-5, atol=1e-5)
