"""save_lora / load_lora: lora_fused's safetensors format (metadata, atomic write, bad files, rank mismatch) and
PEFT's directory format both ways, with PEFT itself as the oracle."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch


import lora_fused as lf
from lora_fused import LoRALinear, LoRAQKV
from model_helpers import tiny_vit as vit, randomize_adapters

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def injected(seed=0, **kw):
    m = vit(seed)
    kw.setdefault("r", 4)
    lf.inject_lora(m, ["qkv", "fc1"], qkv_targets=kw.pop("qkv_targets", "qv"), **kw)
    randomize_adapters(m)
    return m


# -- lora_fused format -------------------------------------------------------------------------------------------
def test_roundtrip_into_fresh_model_injects_from_metadata(tmp_path, images):
    m = injected(lora_alpha=6, lora_dropout=0.1, use_rslora=True, rank_pattern={"blocks.1.mlp.fc1": 2})
    ref = m(images)
    path = tmp_path / "a.safetensors"
    lf.save_lora(m, path)
    fresh = vit()
    assert not torch.allclose(fresh(images), ref)
    result = lf.load_lora(fresh, path)
    assert result == ([], [])
    torch.testing.assert_close(fresh(images), ref, rtol=0, atol=0)
    qkv = fresh.blocks[0].attn.qkv
    assert isinstance(qkv, LoRAQKV) and qkv.targets == ("q", "v") and qkv.use_rslora and qkv.lora_dropout == 0.1
    assert fresh.blocks[1].mlp.fc1.r == 2 and fresh.blocks[0].mlp.fc1.r == 4
    # loading again into the now-injected model checks the configuration and reloads the weights
    with torch.no_grad():
        for p in lf.lora_parameters(fresh):
            p.zero_()
    lf.load_lora(fresh, path)
    torch.testing.assert_close(fresh(images), ref, rtol=0, atol=0)


def test_metadata_holds_every_module_config(tmp_path):
    m = injected()
    path = tmp_path / "a.safetensors"
    lf.save_lora(m, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["lora_fused.version"] == lf.__version__
    mods = {e["name"]: e for e in json.loads(meta["lora_fused.modules"])}
    assert set(mods) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"}
    q = mods["blocks.0.attn.qkv"]
    assert (q["kind"], q["r"], q["lora_alpha"], q["lora_dropout"], q["use_rslora"], q["targets"], q["splits"]) == (
        "LoRAQKV", 4, 8, 0.0, False, "qv", [24, 24, 24])
    assert mods["blocks.0.mlp.fc1"]["kind"] == "LoRALinear" and mods["blocks.0.mlp.fc1"]["targets"] is None
    adapter_tensors = {k: v for k, v in lf.lora_state_dict(m).items() if not k.endswith(".lora_config")}
    assert keys == set(adapter_tensors)
    tensor_bytes = sum(v.numel() * v.element_size() for v in adapter_tensors.values())
    assert tensor_bytes < os.path.getsize(path) < tensor_bytes + 4096  # adapters + a small header only


def test_save_is_atomic(tmp_path, monkeypatch):
    m = injected()
    path = tmp_path / "a.safetensors"
    lf.save_lora(m, path)
    old = path.read_bytes()
    randomize_adapters(m, seed=7)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        lf.save_lora(m, path)
    monkeypatch.undo()
    assert path.read_bytes() == old  # the old file, intact
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temp file left behind
    lf.save_lora(m, path)
    assert path.read_bytes() != old


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign_pickle", "foreign_safetensors", "garbage",
                                    "bad_metadata", "missing"])
def test_bad_files_raise_value_error_and_leave_model_unchanged(tmp_path, damage):
    m = injected()
    path = tmp_path / "a.safetensors"
    lf.save_lora(m, path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "flipped":  # one byte of tensor data changed: caught by the checksum
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0x55]) + data[-9:])
    elif damage == "foreign_pickle":
        path.write_bytes(pickle.dumps({"lora_A": [1, 2, 3]}))
    elif damage == "foreign_safetensors":
        save_file({"weight": torch.zeros(3)}, str(path))
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "bad_metadata":
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta["lora_fused.modules"] = meta["lora_fused.modules"].replace('"r": 4', '"r": 5', 1)
        save_file(tensors, str(path), metadata=meta)
    elif damage == "missing":
        path = tmp_path / "nope.safetensors"
    for target in (vit(), injected()):
        before = _state(target)
        with pytest.raises(ValueError):
            lf.load_lora(target, path)
        _assert_unchanged(target, before)


def test_rank_mismatch_on_load_is_clear(tmp_path, images):
    src = injected(r=8)
    path = tmp_path / "r8.safetensors"
    lf.save_lora(src, path)
    dst = injected(r=4)
    before = _state(dst)
    with pytest.raises(ValueError, match=r"r: checkpoint 8, model 4.*[Rr]ank .*must match at inference") as err:
        lf.load_lora(dst, path)
    assert isinstance(err.value, RuntimeError)  # LoRAShapeError: both
    _assert_unchanged(dst, before)
    other = injected(qkv_targets="qkv")
    with pytest.raises(ValueError, match="targets: checkpoint 'qv', model 'qkv'"):
        lf.load_lora(other, path)
    alpha = injected(r=8, lora_alpha=16)
    with pytest.raises(ValueError, match="scaling"):
        lf.load_lora(alpha, path)


def test_checkpoint_into_incompatible_model(tmp_path):
    path = tmp_path / "a.safetensors"
    lf.save_lora(injected(), path)
    torch.manual_seed(0)
    wrong = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=12,
                              depth=2, num_heads=2, num_classes=3)
    before = _state(wrong)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv"):
        lf.load_lora(wrong, path)
    _assert_unchanged(wrong, before)
    assert not list(lf.lora_parameters(wrong))


def test_strict_false_on_partially_injected_model(tmp_path):
    src = injected()
    path = tmp_path / "a.safetensors"
    lf.save_lora(src, path)
    dst = vit()
    lf.inject_lora(dst, ["qkv"], qkv_targets="qv", r=4)
    with pytest.raises(RuntimeError, match="fc1"):
        lf.load_lora(dst, path)
    missing, unexpected = lf.load_lora(dst, path, strict=False)
    assert missing == [] and sorted(unexpected) == ["blocks.0.mlp.fc1.lora_A", "blocks.0.mlp.fc1.lora_B",
                                                    "blocks.1.mlp.fc1.lora_A", "blocks.1.mlp.fc1.lora_B"]
    assert torch.equal(dst.blocks[1].attn.qkv.lora_B, src.blocks[1].attn.qkv.lora_B)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no lora_fused adapters"):
        lf.save_lora(vit(), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="format"):
        lf.save_lora(injected(), tmp_path / "a.bin", format="pickle")
    with pytest.raises(ValueError, match="directory"):
        lf.save_lora(injected(), tmp_path)


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    """Saving and loading (both formats) never touches pickle or torch.load."""
    m = injected()

    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    lf.save_lora(m, tmp_path / "a.safetensors")
    lf.save_lora(m, tmp_path / "peft", format="peft")
    lf.load_lora(vit(), tmp_path / "a.safetensors")
    lf.load_lora(vit(), tmp_path / "peft")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        lf.load_lora(vit(), tmp_path / "bin")


# -- PEFT directory format -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("qkv_targets", ["qv", "qkv", "k"])
def test_ours_to_peft_dir_loads_in_peft_with_identical_outputs(tmp_path, images, qkv_targets):
    m = injected(qkv_targets=qkv_targets, lora_alpha=6, rank_pattern={"blocks.1.mlp.fc1": 2})
    ref = m(images)
    lf.save_lora(m, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in keys
    assert "base_model.model.blocks.1.mlp.fc1.lora_B.weight" in keys
    pm = peft.PeftModel.from_pretrained(vit(), str(tmp_path / "peft"))
    assert isinstance(pm.base_model.model.blocks[0].attn.qkv, peft.tuners.lora.Linear)
    torch.testing.assert_close(pm(images), ref, rtol=1e-5, atol=1e-5)
    # and back: load_lora of that directory restores LoRAQKV with the same targets
    fresh = vit()
    lf.load_lora(fresh, tmp_path / "peft")
    assert isinstance(fresh.blocks[0].attn.qkv, LoRAQKV)
    assert fresh.blocks[0].attn.qkv.targets == m.blocks[0].attn.qkv.targets
    assert fresh.blocks[0].attn.qkv.lora_alpha == 6
    torch.testing.assert_close(fresh(images), ref, rtol=1e-6, atol=1e-6)


def test_peft_adapter_dir_to_load_lora(tmp_path, images):
    """A PEFT adapter trained elsewhere (rank/alpha patterns, rslora, a saved head) runs on our modules."""
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc2"], use_rslora=True,
                          rank_pattern={"blocks.1.attn.qkv": 2}, alpha_pattern={"fc2": 5},
                          modules_to_save=["head"], init_lora_weights=False)
    pm = peft.get_peft_model(vit(), cfg)
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].weight.mul_(3)
    ref = pm(images)
    pm.save_pretrained(str(tmp_path / "p"))
    model = vit()
    result = lf.load_lora(model, tmp_path / "p")
    assert result == ([], [])
    assert type(model.blocks[0].attn.qkv) is LoRALinear  # a PEFT adapter over the whole qkv
    assert model.blocks[1].attn.qkv.r == 2 and model.blocks[0].mlp.fc2.lora_alpha == 5
    assert model.blocks[0].attn.qkv.use_rslora
    torch.testing.assert_close(model(images), ref, rtol=1e-5, atol=1e-5)
    # an already-injected model with the wrong rank refuses it, unchanged
    wrong = vit()
    lf.inject_lora(wrong, ["qkv", "fc2"], r=8)
    before = _state(wrong)
    with pytest.raises(ValueError, match="must match at inference"):
        lf.load_lora(wrong, tmp_path / "p")
    _assert_unchanged(wrong, before)


def test_peft_dir_with_unsupported_features_refused(tmp_path):
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True))
    pm.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match="use_dora"):
        lf.load_lora(vit(), tmp_path / "dora")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not a PEFT LoRA config"):
        lf.load_lora(vit(), tmp_path / "ia3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json"):
        lf.load_lora(vit(), tmp_path / "empty")


def test_peft_format_refuses_what_peft_cannot_express(tmp_path):
    m = vit()
    lf.inject_lora(m, ["qkv"], lora_dropout=0.1)
    lf.inject_lora(m, ["fc1"], lora_dropout=0.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        lf.save_lora(m, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()
