"""Named adapters (add / set / active / names / disable / delete / unload), per-adapter layouts in one model, only the
active adapter computing and training, saving and loading by name (both formats, PEFT's multi-adapter layout),
merged modules, modules_to_save, from_peft with several adapters. PEFT is the oracle where it has the feature."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fused as lf
from lora_fused import LoRALinear, LoRAQKV
from model_helpers import tiny_vit as vit, randomize_adapters as randomize, trainable

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


class OpCounter(TorchDispatchMode):
    """Counts every op that runs (lora_fused ops and aten ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def two_task_model():
    """default: q and v of each qkv (r=4); det: plain LoRA on qkv and fc1 (r=2, alpha 6, dropout 0.1)."""
    m = vit()
    lf.inject_lora(m, lf.LoraConfig(["qkv"], qkv_targets="qv", r=4))
    lf.add_adapter(m, "det", lf.LoraConfig(["qkv", "fc1"], r=2, lora_alpha=6, lora_dropout=0.1))
    randomize(m, "default", seed=1)
    randomize(m, "det", seed=2)
    return m


# -- one model, several adapters ---------------------------------------------------------------------------------------
def test_add_set_active_names_and_only_active_trains():
    m = two_task_model()
    assert lf.adapter_names(m) == ["default", "det"] and lf.active_adapter(m) == "default"
    qkv = m.blocks[0].attn.qkv
    assert isinstance(qkv, LoRAQKV) and qkv.adapter_names == ["default", "det"]
    assert qkv.targets == ("q", "v") and qkv.r == 4
    assert type(m.blocks[0].mlp.fc1) is LoRALinear and m.blocks[0].mlp.fc1.adapter_names == ["det"]
    assert trainable(m) == {f"blocks.{i}.attn.qkv.lora_adapters.default.lora_{ab}" for i in range(2) for ab in "AB"}
    y_default = m(IMG)
    lf.set_adapter(m, "det")
    assert lf.active_adapter(m) == "det"
    assert qkv.targets is None and qkv.r == 2 and qkv.lora_alpha == 6 and qkv.lora_dropout == 0.1
    assert qkv.lora_A is qkv.lora_adapters["det"].lora_A and qkv.lora_A.shape == (2, 24)
    assert trainable(m) == {f"blocks.{i}.{mod}.lora_adapters.det.lora_{ab}"
                            for i in range(2) for mod in ("attn.qkv", "mlp.fc1") for ab in "AB"}
    y_det = m(IMG)
    assert not torch.allclose(y_det, y_default, atol=1e-3)
    lf.set_adapter(m, "default")
    torch.testing.assert_close(m(IMG), y_default, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter 'seg'.*default.*det"):
        lf.set_adapter(m, "seg")
    with pytest.raises(ValueError, match="already carr"):
        lf.add_adapter(m, "det", lf.LoraConfig(["fc1"]))


def test_disable_adapters_computes_the_base_and_restores():
    m = two_task_model()
    base = vit()(IMG)
    y = m(IMG)
    with lf.disable_adapters(m):
        torch.testing.assert_close(m(IMG), base, rtol=0, atol=0)
    torch.testing.assert_close(m(IMG), y, rtol=0, atol=0)


def test_set_adapter_matches_peft_outputs_and_grads():
    """Two adapters of different ranks and targets, PEFT as the oracle: same weights → same outputs and gradients
    for each active adapter."""
    torch.manual_seed(9)
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"],
                                                    init_lora_weights=False))
    pm.add_adapter("det", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["qkv", "fc2"], init_lora_weights=False))
    ours = vit()
    lf.inject_lora(ours, lf.LoraConfig(["qkv"], r=4, lora_alpha=8))
    lf.add_adapter(ours, "det", lf.LoraConfig(["qkv", "fc2"], r=2, lora_alpha=6))
    layers = {n[len("base_model.model."):]: mod for n, mod in pm.named_modules() if isinstance(mod, peft.tuners.lora.Linear)}
    with torch.no_grad():
        for name, layer in layers.items():
            mine = ours.get_submodule(name)
            for a in layer.lora_A:
                mine.lora_adapters[a].lora_A.copy_(layer.lora_A[a].weight)
                mine.lora_adapters[a].lora_B.copy_(layer.lora_B[a].weight)
    for adapter in ("det", "default", "det"):
        pm.set_adapter(adapter)
        lf.set_adapter(ours, adapter)
        y_ref, y = pm(IMG), ours(IMG)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y_ref.square().sum().backward()
        y.square().sum().backward()
        for name, layer in layers.items():
            if adapter not in layer.lora_A:
                continue
            mine = ours.get_submodule(name).lora_adapters[adapter]
            torch.testing.assert_close(mine.lora_A.grad, layer.lora_A[adapter].weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.lora_B.grad, layer.lora_B[adapter].weight.grad, rtol=1e-4, atol=1e-5)
        peft_trainable = {n.replace("base_model.model.", "").replace(f".{adapter}.weight", "")
                          for n, p in pm.named_parameters() if p.requires_grad}
        ours_trainable = {n.replace(f".lora_adapters.{adapter}", "") for n in trainable(ours)}
        assert ours_trainable == peft_trainable
        pm.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)


def test_inactive_adapters_do_no_work():
    """The forward of a model holding two adapters runs exactly the ops of the same model holding one."""
    one = vit()
    lf.inject_lora(one, ["qkv", "fc1"], qkv_targets="qv", r=4)
    two = copy.deepcopy(one)
    lf.add_adapter(two, "other", lf.LoraConfig(["qkv", "fc1", "fc2"], r=8))
    runs = []
    for model in (one, two):
        model.train()
        with OpCounter() as counter:
            model(IMG).sum().backward()
        runs.append(counter.ops)
    assert runs[0] == runs[1]
    assert runs[0].count("lora_fused.lora_linear.default") == 4


def test_delete_adapter_and_unload():
    m = two_task_model()
    lf.set_adapter(m, "det")
    lf.delete_adapter(m, "det")
    assert lf.adapter_names(m) == ["default"] and lf.active_adapter(m) == "default"
    assert type(m.blocks[0].mlp.fc1) is nn.Linear  # held only det: a plain Linear again
    assert trainable(m) == {f"blocks.{i}.attn.qkv.lora_adapters.default.lora_{ab}" for i in range(2) for ab in "AB"}
    with pytest.raises(ValueError, match="no adapter 'det'"):
        lf.delete_adapter(m, "det")
    weight = m.blocks[0].attn.qkv.weight
    m.blocks[0].attn.qkv.merge()
    out = lf.unload_lora(m)
    assert out is m and not any(isinstance(mod, lf.LoRABase) for mod in m.modules())
    assert m.blocks[0].attn.qkv.weight is weight  # the original Parameter, unmerged
    torch.testing.assert_close(m(IMG), vit()(IMG), rtol=1e-5, atol=1e-5)


def test_merge_lora_merges_the_active_adapter():
    m = two_task_model()
    lf.set_adapter(m, "det")
    ref = m(IMG)
    merged = lf.merge_lora(m, inplace=False)
    assert not any(isinstance(mod, lf.LoRABase) for mod in merged.modules())
    torch.testing.assert_close(merged(IMG), ref, rtol=1e-4, atol=1e-4)


def test_bad_adapter_names():
    m = vit()
    for bad in ("", "a.b", "_x", "keys", 3):
        with pytest.raises(ValueError, match="adapter name"):
            lf.add_adapter(m, bad, lf.LoraConfig(["qkv"]))
    assert not any(isinstance(mod, lf.LoRABase) for mod in m.modules())


# -- merged modules: refuse or unmerge first, never a corrupted base weight ----------------------------------------------
def test_loading_into_a_merged_module_unmerges_first():
    """An 8x8 layer: a new state dict loaded into a merged module is loaded after unmerging, so the output is the
    new adapter's and the base weight is intact (not left holding the old delta)."""
    torch.manual_seed(0)
    m = LoRALinear(8, 8, r=2, lora_alpha=4)
    nn.init.normal_(m.lora_B)
    w0 = m.weight.detach().clone()
    holder = nn.Sequential()
    holder.add_module("lin", m)
    m.merge()
    new = {k: (v * 3 if not k.endswith("lora_config") else v) for k, v in lf.lora_state_dict(holder).items()}
    with pytest.warns(UserWarning, match="unmerging adapter 'default' before loading"):
        lf.load_lora_state_dict(holder, new)
    assert not m.merged
    torch.testing.assert_close(m.weight, w0, rtol=0, atol=1e-6)
    x = torch.randn(3, 8)
    expected = nn.functional.linear(x, w0, m.bias) + m.scaling * x @ new["lin.lora_A"].t() @ new["lin.lora_B"].t()
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_switching_adding_loading_on_merged_modules_unmerge(tmp_path):
    m = two_task_model()
    w0 = m.blocks[0].attn.qkv.weight.detach().clone()
    lf.save_lora(m, tmp_path / "default.safetensors", adapter="default")
    for action in ("set", "add", "load"):
        for mod in m.modules():
            if isinstance(mod, lf.LoRABase) and mod.has_active_adapter() and not mod.merged:
                mod.merge()
        assert m.blocks[0].attn.qkv.merged
        with pytest.warns(UserWarning, match="unmerging"):
            if action == "set":
                lf.set_adapter(m, "det")
                lf.set_adapter(m, "default")
            elif action == "add":
                lf.add_adapter(m, "more", lf.LoraConfig(["qkv"], r=1))
            else:
                lf.load_lora(m, tmp_path / "default.safetensors")  # into the merged adapter
        assert not m.blocks[0].attn.qkv.merged
        torch.testing.assert_close(m.blocks[0].attn.qkv.weight, w0, rtol=0, atol=1e-6)


# -- save and load by name ---------------------------------------------------------------------------------------------
def test_save_and_load_by_name_into_a_fresh_model(tmp_path):
    m = two_task_model()
    ref = {}
    for name in ("default", "det"):
        lf.set_adapter(m, name)
        ref[name] = m(IMG)
    lf.save_lora(m, tmp_path / "det.safetensors")  # the active one
    lf.save_lora(m, tmp_path / "default.safetensors", adapter="default")
    fresh = vit()
    lf.load_lora(fresh, tmp_path / "default.safetensors")
    lf.load_lora(fresh, tmp_path / "det.safetensors", adapter_name="det")
    assert lf.adapter_names(fresh) == ["default", "det"] and lf.active_adapter(fresh) == "default"
    for name in ("default", "det"):
        lf.set_adapter(fresh, name)
        torch.testing.assert_close(fresh(IMG), ref[name], rtol=0, atol=0)
    # loading again into an existing name checks the configuration
    with pytest.raises(ValueError, match="r: checkpoint 4, model 2"):
        lf.load_lora(fresh, tmp_path / "default.safetensors", adapter_name="det")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        lf.save_lora(fresh, tmp_path / "x.safetensors", adapter="nope")


def test_multi_adapter_peft_layout_from_peft_save_pretrained(tmp_path):
    torch.manual_seed(3)
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"],
                                                    init_lora_weights=False))
    pm.add_adapter("seg", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["fc1"], init_lora_weights=False))
    ref = {}
    for name in ("default", "seg"):
        pm.set_adapter(name)
        ref[name] = pm(IMG)
    pm.save_pretrained(str(tmp_path / "p"))
    assert os.path.isfile(tmp_path / "p" / "seg" / "adapter_config.json")
    model = vit()
    assert lf.load_lora(model, tmp_path / "p") == ([], [])
    assert lf.adapter_names(model) == ["default", "seg"] and lf.active_adapter(model) == "default"
    for name in ("default", "seg"):
        lf.set_adapter(model, name)
        torch.testing.assert_close(model(IMG), ref[name], rtol=1e-5, atol=1e-5)
    # one adapter of the layout, by name
    one = vit()
    lf.load_lora(one, tmp_path / "p", adapter_name="seg")
    assert lf.adapter_names(one) == ["seg"]


def test_multi_adapter_peft_layout_to_peft(tmp_path):
    m = two_task_model()
    ref = {}
    for name in ("default", "det"):
        lf.set_adapter(m, name)
        ref[name] = m(IMG)
    lf.save_lora(m, tmp_path / "p", format="peft")
    cfg = json.loads((tmp_path / "p" / "det" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 6 and cfg["lora_dropout"] == 0.1
    pm = peft.PeftModel.from_pretrained(vit(), str(tmp_path / "p"))
    pm.load_adapter(str(tmp_path / "p" / "det"), adapter_name="det")
    pm.eval()
    for name in ("default", "det"):
        pm.set_adapter(name)
        torch.testing.assert_close(pm(IMG), ref[name], rtol=1e-5, atol=1e-5)
    back = vit()
    lf.load_lora(back, tmp_path / "p")
    assert isinstance(back.blocks[0].attn.qkv, LoRAQKV) and back.blocks[0].attn.qkv.targets == ("q", "v")
    for name in ("default", "det"):
        lf.set_adapter(back, name)
        torch.testing.assert_close(back(IMG), ref[name], rtol=1e-6, atol=1e-6)
    # one adapter by name goes to the top of its directory, loadable by PEFT directly
    lf.save_lora(m, tmp_path / "only_det", format="peft", adapter="det")
    pm2 = peft.PeftModel.from_pretrained(vit(), str(tmp_path / "only_det")).eval()
    torch.testing.assert_close(pm2(IMG), ref["det"], rtol=1e-5, atol=1e-5)


# -- modules_to_save ---------------------------------------------------------------------------------------------------
def test_modules_to_save_train_save_and_restore(tmp_path):
    m = vit()
    lf.inject_lora(m, ["qkv"], qkv_targets="qv", modules_to_save=["head"])
    assert {"head.weight", "head.bias"} <= trainable(m)
    randomize(m)
    with torch.no_grad():
        m.head.weight.normal_()
    ref = m(IMG)
    lf.save_lora(m, tmp_path / "a.safetensors")
    lf.save_lora(m, tmp_path / "p", format="peft")
    for path in (tmp_path / "a.safetensors", tmp_path / "p"):
        fresh = vit()
        lf.load_lora(fresh, path)
        torch.testing.assert_close(fresh.head.weight, m.head.weight, rtol=0, atol=0)
        torch.testing.assert_close(fresh(IMG), ref, rtol=1e-6, atol=1e-6)
        lf.mark_only_lora_as_trainable(fresh)  # the restored head is saved with the adapter: it keeps training
        assert {"head.weight", "head.bias"} <= trainable(fresh)
    pm = peft.PeftModel.from_pretrained(vit(), str(tmp_path / "p")).eval()  # PEFT restores the head too
    torch.testing.assert_close(pm(IMG), ref, rtol=1e-5, atol=1e-5)


def test_modules_to_save_follow_the_active_adapter():
    m = vit()
    m.head2 = nn.Linear(24, 5)
    lf.inject_lora(m, ["qkv"], modules_to_save=["head"])
    lf.add_adapter(m, "other", lf.LoraConfig(["fc1"], modules_to_save=["head2"]))
    assert "head.weight" in trainable(m) and "head2.weight" not in trainable(m)
    lf.set_adapter(m, "other")
    assert "head2.weight" in trainable(m) and "head.weight" not in trainable(m)
    with pytest.raises(ValueError, match="already saved with adapter 'default'"):
        lf.add_adapter(m, "third", lf.LoraConfig(["fc2"], modules_to_save=["head"]))
    assert "third" not in lf.adapter_names(m)
    with pytest.raises(ValueError, match="no module of the model is named"):
        lf.add_adapter(m, "third", lf.LoraConfig(["fc2"], modules_to_save=["classifier"]))


# -- from_peft with several adapters -----------------------------------------------------------------------------------
def test_from_peft_keeps_every_adapter_and_follows_set_adapter():
    torch.manual_seed(4)
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["qkv", "fc1"], init_lora_weights=False))
    ref = copy.deepcopy(pm)
    lf.from_peft(pm)
    assert lf.adapter_names(pm) == ["default", "b"]
    for name in ("b", "default"):
        lf.set_adapter(pm, name)  # PEFT's set_adapter
        ref.set_adapter(name)
        assert lf.active_adapter(pm) == name
        with OpCounter() as counter:
            y = pm(IMG)
        assert counter.ops.count("lora_fused.lora_linear.default") == (4 if name == "b" else 2)
        torch.testing.assert_close(y, ref(IMG), rtol=1e-5, atol=1e-5)
    with lf.disable_adapters(pm):
        torch.testing.assert_close(pm(IMG), vit()(IMG), rtol=1e-5, atol=1e-5)


# -- all or nothing, compile, PEFT models ----------------------------------------------------------------------------------
def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def test_failed_add_and_load_change_nothing(tmp_path):
    m = two_task_model()
    before = _snapshot(m)
    with pytest.raises(ValueError, match="r must be"):  # the second matched module fails, after the first planned
        lf.add_adapter(m, "bad", lf.LoraConfig(["qkv", "fc2"], rank_pattern={"blocks.1.mlp.fc2": 0}))
    with pytest.raises(ValueError, match="modules_to_save"):
        lf.add_adapter(m, "bad", lf.LoraConfig(["fc2"], modules_to_save=["blocks.0.mlp.fc2"]))
    assert _snapshot(m)[0] == before[0]
    # a PEFT directory of two adapters whose second does not fit: neither is loaded
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    pm.add_adapter("wide", peft.LoraConfig(r=2, target_modules=["fc2"], modules_to_save=["head"]))
    pm.save_pretrained(str(tmp_path / "p"))
    other = vit()
    other.head = nn.Linear(24, 7)  # the saved head does not fit
    before = _snapshot(other)
    with pytest.raises(ValueError, match="head.weight"):
        lf.load_lora(other, tmp_path / "p")
    after = _snapshot(other)
    assert after[0] == before[0] and after[2] == before[2]
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())


def test_compiled_model_follows_set_adapter():
    m = two_task_model()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for name in ("default", "det", "default"):
        lf.set_adapter(m, name)
        torch.testing.assert_close(compiled(IMG), m(IMG))


def test_peft_models_take_adapters_through_peft():
    pm = peft.get_peft_model(vit(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(TypeError, match="PEFT model.*add_adapter"):
        lf.inject_lora(pm, ["qkv"])
    with pytest.raises(TypeError, match="PEFT model"):
        lf.add_adapter(pm, "x", lf.LoraConfig(["qkv"]))
