"""LoraConfig (JSON round trip, PEFT conversion with PEFT as the oracle), PEFT's rank/alpha pattern rule,
qkv_targets as a string or a mapping (never ignored), presets."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import lora_fused as lf
from lora_fused import LoraConfig, LoRAQKV
from model_helpers import tiny_vit as vit

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")


# -- JSON ------------------------------------------------------------------------------------------------------------------
def test_json_round_trip():
    cfg = LoraConfig(target_modules=["qkv", "fc1"], r=4, lora_alpha=6.5, lora_dropout=0.1, use_rslora=True,
                     qkv_targets={"qkv": "vq"}, qkv_splits=(24, 24, 24), exclude_modules=r"blocks\.0\..*",
                     rank_pattern={"fc1": 2}, alpha_pattern={r"blocks\.1\..*": 3.0}, bias="lora_only",
                     modules_to_save=["head"], adapter_dtype=torch.float32, lora_fa=True)
    assert cfg.qkv_targets == {"qkv": "qv"}
    text = json.dumps(cfg.to_dict())
    again = LoraConfig.from_dict(json.loads(text))
    assert again == cfg and again.adapter_dtype is torch.float32 and again.qkv_splits == (24, 24, 24)
    with pytest.raises(ValueError, match="callable"):
        LoraConfig(target_modules=lambda n, m: True).to_dict()
    with pytest.raises(ValueError, match="unknown fields.*'rank'"):
        LoraConfig.from_dict({"rank": 4})


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r must be"), ({"lora_alpha": float("nan")}, "finite"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"bias": "some"}, "bias"), ({"qkv_targets": "qx"}, "unknown qkv target"), ({"rank_pattern": {"a": 0}}, "r must"),
    ({"adapter_dtype": "int8"}, "adapter_dtype"), ({"rank_pattern": [1]}, "dict"),
])
def test_config_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoraConfig(["qkv"], **kwargs)


def test_inject_takes_a_config_and_refuses_mixing():
    m = vit()
    names = lf.inject_lora(m, LoraConfig(["qkv"], qkv_targets="qv", r=2, lora_alpha=4))
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and m.blocks[0].attn.qkv.r == 2
    with pytest.raises(TypeError, match="not both.*'r'"):
        lf.inject_lora(vit(), LoraConfig(["qkv"]), r=4)
    with pytest.raises(ValueError, match="no target_modules"):
        lf.inject_lora(vit(), LoraConfig())


# -- PEFT conversion: PEFT as the oracle -------------------------------------------------------------------------------------
def _peft_layers(pm):
    return {n[len("base_model.model."):]: mod for n, mod in pm.named_modules() if isinstance(mod, peft.tuners.lora.Linear)}


def test_from_peft_config_adapts_what_peft_adapts():
    """Same modules, ranks and alphas as PEFT's get_peft_model, including regex pattern keys PEFT applies."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["qkv", "fc1", "fc2"],
                          exclude_modules=["blocks.2.mlp.fc2"],
                          rank_pattern={r".*\.1\.attn\.qkv": 2, "fc2": 6},
                          alpha_pattern={r"blocks\.[02]\.mlp\.fc\d": 3})
    pm = peft.get_peft_model(vit(depth=3), cfg)
    ours = vit(depth=3)
    names = lf.inject_lora(ours, LoraConfig.from_peft(cfg))
    layers = _peft_layers(pm)
    assert sorted(names) == sorted(layers)
    for name, layer in layers.items():
        mine = ours.get_submodule(name)
        assert (mine.r, mine.lora_alpha, mine.lora_dropout) == (layer.r["default"], layer.lora_alpha["default"], 0.05)
        assert mine.scaling == pytest.approx(layer.scaling["default"])
    assert ours.blocks[1].attn.qkv.r == 2 and ours.blocks[0].attn.qkv.r == 4  # the regex key applied


def test_to_peft_round_trip_and_refusals():
    cfg = LoraConfig(["fc1", "qkv"], r=4, lora_alpha=8, rank_pattern={"fc1": 2}, modules_to_save=["head"],
                     bias="all", use_rslora=True)  # sorted: PEFT keeps target_modules as a set
    pc = cfg.to_peft()
    assert isinstance(pc, peft.LoraConfig) and pc.r == 4 and pc.rank_pattern == {"fc1": 2} and pc.bias == "all"
    assert LoraConfig.from_peft(pc) == cfg
    for bad, match in ((dict(qkv_targets="qv"), "qkv_targets"), (dict(lora_fa=True), "lora_fa"),
                       (dict(adapter_dtype=torch.float32), "adapter_dtype")):
        with pytest.raises(ValueError, match=match):
            cfg.replace(**bad).to_peft()
    for bad, match in ((dict(use_dora=True), "use_dora"), (dict(layers_to_transform=[0]), "layers_to_transform"),
                       (dict(init_lora_weights="gaussian"), "init_lora_weights"),
                       (dict(target_modules="all-linear"), "all-linear")):
        kwargs = dict(r=4, target_modules=["qkv"])
        kwargs.update(bad)
        with pytest.raises(ValueError, match=match):
            LoraConfig.from_peft(peft.LoraConfig(**kwargs))


# -- PEFT's pattern rule ---------------------------------------------------------------------------------------------------
def test_pattern_rule_is_peft_s():
    """A regex key matches at a component boundary (PEFT's get_pattern_key); the first key wins; unused keys warn."""
    from peft.utils.other import get_pattern_key

    from lora_fused.model._common import pattern_matches

    names = ["blocks.0.attn.qkv", "blocks.10.attn.qkv", "blocks.1.mlp.fc1", "encoder.blocks.1.attn.qkv"]
    keys = ["qkv", r"blocks\.1\..*", r".*\.1\.attn\.qkv", "attn.qkv", "kv", "1.attn.qkv", r"blocks\.\d\.attn\.qkv"]
    for name in names:
        for key in keys:
            assert pattern_matches(key, name) == (get_pattern_key([key], name) == key), (key, name)
    with pytest.warns(UserWarning, match="rank_pattern.*nonexistent"):
        lf.inject_lora(vit(), ["qkv"], rank_pattern={"nonexistent": 2})


# -- qkv_targets ---------------------------------------------------------------------------------------------------------
class Attn(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.to_qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.to_qkv(x).chunk(3, -1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


def test_qkv_targets_mapping_names_any_fused_module():
    m = nn.Sequential(Attn(), Attn())
    x = torch.randn(2, 4, 12)
    ref = m(x)
    names = lf.inject_lora(m, ["to_qkv", "out"], qkv_targets={"to_qkv": "qv"}, r=2)
    assert len(names) == 4
    qkv = m[0].to_qkv
    assert isinstance(qkv, LoRAQKV) and qkv.targets == ("q", "v") and type(m[0].out) is lf.LoRALinear
    torch.testing.assert_close(m(x), ref)


def test_qkv_targets_is_never_ignored():
    """qkv_targets="qv" does not apply to a module named to_qkv: an error, not a LoRALinear adapting q, k and v."""
    m = nn.Sequential(Attn())
    with pytest.raises(ValueError, match="qkv_targets='qv' applies to modules named 'qkv'.*to_qkv"):
        lf.inject_lora(m, ["to_qkv"], qkv_targets="qv")
    assert type(m[0].to_qkv) is nn.Linear
    with pytest.raises(ValueError, match=r"qkv_targets keys \['Wqkv'\] match none"):
        lf.inject_lora(m, ["to_qkv"], qkv_targets={"to_qkv": "v", "Wqkv": "qv"})
    assert type(m[0].to_qkv) is nn.Linear


# -- presets -----------------------------------------------------------------------------------------------------------
def test_presets_registry():
    assert {"minimal", "standard", "full", "sam_qv"} <= set(lf.presets())
    cfg = LoraConfig.preset("standard", r=4)
    assert cfg.r == 4 and LoraConfig.preset("standard").r == 8  # overrides do not leak into the registry
    with pytest.raises(ValueError, match="unknown preset 'nope'.*minimal"):
        LoraConfig.preset("nope")
    lf.register_preset("test_tiny", LoraConfig(["fc1"], r=1))
    try:
        assert LoraConfig.preset("test_tiny").r == 1
        with pytest.raises(ValueError, match="exists"):
            lf.register_preset("test_tiny", LoraConfig(["fc2"]))
        with pytest.raises(TypeError):
            lf.register_preset("x", {"r": 2})
    finally:
        from lora_fused.config import _PRESETS

        _PRESETS.pop("test_tiny", None)


@pytest.mark.parametrize("name,expected", [
    ("minimal", {"attn.qkv": ("LoRAQKV", 4, 8, ("q", "v"))}),
    ("sam_qv", {"attn.qkv": ("LoRAQKV", 4, 4, ("q", "v"))}),
    ("standard", {"attn.qkv": ("LoRALinear", 8, 16, None), "attn.proj": ("LoRALinear", 8, 16, None)}),
    ("full", {k: ("LoRALinear", 16, 32, None) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}),
])
def test_builtin_presets_on_timm_vit(name, expected):
    m = vit()
    names = lf.inject_lora(m, LoraConfig.preset(name))
    assert names == [f"blocks.{i}.{k}" for i in range(2) for k in expected]
    for n in names:
        mod = m.get_submodule(n)
        kind, r, alpha, targets = expected[n.split(".", 2)[2]]  # "blocks.0.attn.qkv" -> "attn.qkv"
        assert (type(mod).__name__, mod.r, mod.lora_alpha) == (kind, r, alpha)
        assert getattr(mod, "targets", None) == targets
