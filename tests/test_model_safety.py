"""What users hit on real models: a LoRA-only state dict carries its configuration (torch.load(weights_only=True)
route), wrapped models (DDP, torch.compile) save the names of the model the user means, values that cannot be right
are refused, PEFT Conv adapters are refused clearly, and from_peft models are first-class."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import lora_fused as lf
from lora_fused import LoRALinear, LoRAQKV
from model_helpers import tiny_vit as vit, randomize_adapters as randomize

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
sam_modeling = pytest.importorskip("segment_anything.modeling")
from safetensors import safe_open  # noqa: E402

IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
SAM_IMG = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def sam_encoder(seed=0):
    """segment-anything's ImageEncoderViT, tiny and random (built offline)."""
    torch.manual_seed(seed)
    return sam_modeling.ImageEncoderViT(img_size=32, patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=2,
                                        mlp_ratio=2.0, out_chans=8, window_size=2, global_attn_indexes=(1,)).eval()


def trip(sd, tmp_path):
    """torch.save then torch.load(weights_only=True): the 3D-medical users' route."""
    torch.save(sd, tmp_path / "sd.pt")
    return torch.load(tmp_path / "sd.pt", weights_only=True)


# -- 15.2: a LoRA-only state dict carries its configuration -------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (dict(qkv_targets="qk"), "targets: state dict 'qv', model 'qk'"),
    (dict(lora_alpha=16), "lora_alpha: state dict 8, model 16"),
    (dict(use_rslora=True), "use_rslora: state dict False, model True"),
    (dict(lora_fa=True), "lora_fa: state dict False, model True"),
    (dict(r=2), "r: state dict 4, model 2"),
])
def test_state_dict_refuses_another_configuration(tmp_path, change, match):
    src = sam_encoder()
    lf.inject_lora(src, ["qkv"], qkv_targets="qv", r=4, lora_alpha=8)
    randomize(src)
    sd = trip(lf.lora_state_dict(src), tmp_path)
    options = dict(qkv_targets="qv", r=4, lora_alpha=8)
    options.update(change)
    dst = sam_encoder()
    lf.inject_lora(dst, ["qkv"], **options)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=match) as err:
        lf.load_lora_state_dict(dst, sd)
    assert "blocks.0.attn.qkv" in str(err.value) and isinstance(err.value, RuntimeError)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing loaded
    # the same configuration loads, through the same route
    same = sam_encoder()
    lf.inject_lora(same, ["qkv"], qkv_targets="qv", r=4, lora_alpha=8)
    lf.load_lora_state_dict(same, sd)
    torch.testing.assert_close(same(SAM_IMG), src(SAM_IMG), rtol=0, atol=0)


def test_state_dict_splits_mismatch_and_old_state_dicts(tmp_path):
    src = nn.Sequential(LoRAQKV(8, 24, r=2, targets="qv", splits=(8, 8, 8)))
    dst = nn.Sequential(LoRAQKV(8, 24, r=2, targets="qv", splits=(12, 6, 6)))
    with pytest.raises(ValueError, match=r"splits: state dict \(8, 8, 8\), model \(12, 6, 6\)"):
        lf.load_lora_state_dict(dst, trip(lf.lora_state_dict(src), tmp_path))
    # an older state dict (no lora_config entries) still loads, checked by shape only
    old = {k: v for k, v in lf.lora_state_dict(src).items() if not k.endswith("lora_config")}
    fresh = nn.Sequential(LoRAQKV(8, 24, r=2, targets="qv", splits=(8, 8, 8)))
    lf.load_lora_state_dict(fresh, trip(old, tmp_path))
    assert torch.equal(fresh[0].lora_A, src[0].lora_A)
    # and nn.Module.load_state_dict takes the single-adapter key names, checking the configuration too
    full = trip({"0.weight": src[0].weight, "0.bias": src[0].bias, **lf.lora_state_dict(src)}, tmp_path)
    fresh.load_state_dict(full)
    with pytest.raises(RuntimeError, match="splits"):
        dst.load_state_dict(full)


# -- 15.3: wrapped models ----------------------------------------------------------------------------------------------
@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _saved_names(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), [e["name"] for e in json.loads(f.metadata()["lora_fused.modules"])]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_save_lora_of_ddp_model_writes_plain_names(tmp_path, process_group):
    model = sam_encoder()
    lf.inject_lora(model, ["qkv"], qkv_targets="qv", r=4)
    randomize(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    ref = model(SAM_IMG)
    lf.save_lora(ddp, tmp_path / "a.safetensors")
    keys, names = _saved_names(tmp_path / "a.safetensors")
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and not any(k.startswith("module.") for k in keys)
    assert all(not k.startswith("module.") for k in lf.lora_state_dict(ddp))
    plain = sam_encoder()
    lf.load_lora(plain, tmp_path / "a.safetensors")
    torch.testing.assert_close(plain(SAM_IMG), ref, rtol=0, atol=0)
    # loading into a DDP-wrapped fresh model works too
    wrapped = nn.parallel.DistributedDataParallel(nn.Sequential(sam_encoder()))
    lf.load_lora(wrapped.module[0], tmp_path / "a.safetensors")
    torch.testing.assert_close(wrapped.module[0](SAM_IMG), ref, rtol=0, atol=0)


def test_save_lora_of_compiled_model_and_old_wrapped_names(tmp_path):
    model = vit()
    lf.inject_lora(model, ["qkv", "fc1"], qkv_targets="qv", r=4)
    randomize(model)
    ref = model(IMG)
    compiled = torch.compile(model)
    lf.save_lora(compiled, tmp_path / "c.safetensors")
    _, names = _saved_names(tmp_path / "c.safetensors")
    assert not any("_orig_mod" in n for n in names)
    model.blocks[1] = torch.compile(model.blocks[1])  # a compiled submodule: _orig_mod inside the names
    lf.save_lora(model, tmp_path / "s.safetensors")
    _, inner = _saved_names(tmp_path / "s.safetensors")
    assert inner == names
    for path in ("c.safetensors", "s.safetensors"):
        plain = vit()
        lf.load_lora(plain, tmp_path / path)
        torch.testing.assert_close(plain(IMG), ref, rtol=0, atol=0)
    into_compiled = vit()
    into_compiled.blocks[0] = torch.compile(into_compiled.blocks[0])
    lf.load_lora(torch.compile(into_compiled), tmp_path / "c.safetensors")
    assert isinstance(into_compiled.blocks[0]._orig_mod.attn.qkv, LoRAQKV)
    # a state dict written with wrapper prefixes (older versions) loads into the plain model
    wrapped_sd = {"module." + k: v for k, v in lf.lora_state_dict(model).items()}
    plain = vit()
    lf.inject_lora(plain, ["qkv", "fc1"], qkv_targets="qv", r=4)
    lf.load_lora_state_dict(plain, wrapped_sd)
    torch.testing.assert_close(plain(IMG), ref, rtol=0, atol=0)


# -- 15.6: values that cannot be right -----------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_alpha_refused(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        LoRALinear(8, 8, lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        LoRAQKV(8, 24, lora_alpha=alpha)
    m = vit()
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        lf.inject_lora(m, ["qkv"], lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha must be finite"):
        lf.inject_lora(m, ["qkv"], alpha_pattern={"qkv": alpha})
    assert not any(isinstance(mod, lf.LoRABase) for mod in m.modules())


def test_unusual_values_warn():
    with pytest.warns(UserWarning, match="lora_alpha=0"):
        LoRALinear(8, 8, r=2, lora_alpha=0)
    with pytest.warns(UserWarning, match=r"r=16 exceeds min\(in_features, out_features\)=8"):
        LoRALinear(8, 32, r=16)
    with pytest.warns(UserWarning, match="r=8 exceeds"):
        lf.inject_lora(vit(), ["head"], r=8)  # head: 24 -> 3


def test_api_misuse_raises():
    with pytest.raises(TypeError, match="lora_summary expects an nn.Module"):
        lf.lora_summary("x")
    m = vit()
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lf.mark_only_lora_as_trainable(m)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before


def test_peft_conv_adapter_refused(tmp_path):
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=2, target_modules=["patch_embed.proj", "qkv"]))
    pm.save_pretrained(str(tmp_path / "conv"))
    target = vit()
    with pytest.raises(ValueError, match="Conv LoRA is not supported"):
        lf.load_lora(target, tmp_path / "conv")
    assert not any(isinstance(mod, lf.LoRABase) for mod in target.modules())
    with pytest.raises(ValueError, match="Conv LoRA is not supported"):
        lf.from_peft(pm)


# -- 15.7: from_peft models are first-class ------------------------------------------------------------------------------
def test_from_peft_models_are_first_class(tmp_path):
    torch.manual_seed(5)
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"],
                                                    init_lora_weights=False))
    lf.from_peft(pm)
    ref = pm(IMG)
    params = list(lf.lora_parameters(pm))
    assert len(params) == 8 and params[0] is pm.base_model.model.blocks[0].attn.qkv.lora_A["default"].weight
    summary = lf.lora_summary(pm)
    assert [m.name for m in summary.modules] == [f"blocks.{i}.{k}" for i in range(2) for k in ("attn.qkv", "mlp.fc1")]
    assert summary.modules[0].r == 4 and summary.lora == sum(p.numel() for p in params)
    lf.save_lora(pm, tmp_path / "a.safetensors")
    lf.save_lora(pm, tmp_path / "p", format="peft")
    for path in ("a.safetensors", "p"):
        plain = vit()
        lf.load_lora(plain, tmp_path / path)
        assert isinstance(plain.blocks[0].attn.qkv, LoRALinear)
        torch.testing.assert_close(plain(IMG), ref, rtol=1e-5, atol=1e-5)
    assert set(lf.lora_state_dict(pm)) >= {"blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_config"}
