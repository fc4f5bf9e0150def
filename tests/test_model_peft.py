"""PEFT as the oracle: same weights → same outputs and gradients, on transformers BERT/ViT and a timm ViT; and
from_peft (PEFT models running on lora_fused's op)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fused as lf
from lora_fused import LoRAQKV

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


class OpCounter(TorchDispatchMode):
    """Records the lora_fused ops that run."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "lora_fused" in str(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def hf_vit(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


def timm_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                             depth=2, num_heads=2, num_classes=3).eval()


IDS = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def out_of(model, inp):
    y = model(inp)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def peft_model(base, targets, **kw):
    torch.manual_seed(9)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)
    return peft.get_peft_model(base, cfg)


def peft_layers(pm):
    return {n[len("base_model.model."):]: m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear)}


def copy_peft_into_ours(pm, ours):
    """Copy every PEFT adapter into the matching lora_fused module (LoRALinear: as is; LoRAQKV: the blocks of
    PEFT's (N, 3r) B, after zeroing PEFT's off-block entries so both compute the same function)."""
    for name, layer in peft_layers(pm).items():
        mine = ours.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            if isinstance(mine, LoRAQKV):
                r, n = mine.r, mine.out_features // 3
                mask = torch.zeros_like(B)
                for i in range(3):
                    mask[i * n:(i + 1) * n, i * r:(i + 1) * r] = 1
                B.mul_(mask)
                mine.lora_A.copy_(A)
                for i, t in enumerate("qkv"):
                    mine.lora_B_for(t).copy_(B[i * n:(i + 1) * n, i * r:(i + 1) * r])
            else:
                mine.lora_A.copy_(A)
                mine.lora_B.copy_(B)


def check_same(pm, ours, inp, qkv=False):
    """Outputs and gradients (adapters and input embeddings/pixels) of PEFT and lora_fused agree."""
    y_ref, y = out_of(pm, inp), out_of(ours, inp)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref, generator=torch.Generator().manual_seed(3))
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    n = 0
    for name, layer in peft_layers(pm).items():
        mine = ours.get_submodule(name)
        gA, gB = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert gA is not None and gA.abs().sum() > 0
        if isinstance(mine, LoRAQKV):
            r, nn_ = mine.r, mine.out_features // 3
            torch.testing.assert_close(mine.lora_A.grad, gA, rtol=1e-4, atol=1e-5)
            blocks = torch.cat([gB[i * nn_:(i + 1) * nn_, i * r:(i + 1) * r] for i in range(3)])
            torch.testing.assert_close(mine.lora_B.grad, blocks, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(mine.lora_A.grad, gA, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.lora_B.grad, gB, rtol=1e-4, atol=1e-5)
        n += 1
    assert n >= 2
    return y


# -- oracle: inject_lora on the same base with PEFT's weights --------------------------------------------------------
@pytest.mark.parametrize("make,inp,targets", [
    (bert, IDS, ["query", "value"]),
    (hf_vit, IMG, ["q_proj", "v_proj", "fc1"]),
    (timm_vit, IMG, ["qkv", "fc1"]),
])
def test_same_outputs_and_grads_as_peft(make, inp, targets):
    base = make()
    ours = copy.deepcopy(base)
    pm = peft_model(base, targets, lora_dropout=0.1)
    pm.eval()
    names = lf.inject_lora(ours, targets, r=4, lora_alpha=8, lora_dropout=0.1)
    assert sorted(names) == sorted(peft_layers(pm))
    copy_peft_into_ours(pm, ours)
    ours.eval()
    y = check_same(pm, ours, inp)
    assert not torch.allclose(y, out_of(make(), inp), atol=1e-3)  # the adapters do something


def test_timm_fused_qkv_lora_qkv_matches_peft_block_adapter():
    """LoRAQKV with targets q, k, v equals PEFT's rank-3r adapter over qkv when B is block diagonal."""
    base = timm_vit()
    ours = copy.deepcopy(base)
    torch.manual_seed(9)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=12, lora_alpha=24, target_modules=["qkv"],
                                                   init_lora_weights=False))
    lf.inject_lora(ours, ["qkv"], qkv_targets="qkv", r=4, lora_alpha=8)
    copy_peft_into_ours(pm, ours)
    check_same(pm, ours, IMG)


def test_sam_style_qv_only_adapters_k_stays_base():
    base = timm_vit()
    x = torch.randn(2, 5, 24)
    k_base = [b.attn.qkv(x)[..., 24:48].detach() for b in base.blocks]
    v_base = [b.attn.qkv(x)[..., 48:].detach() for b in base.blocks]
    m = copy.deepcopy(base)
    lf.inject_lora(m, ["qkv"], qkv_targets="qv", r=4)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.lora_adapters.default.lora_{ab}" for i in range(2) for ab in "AB"}
    opt = torch.optim.SGD(lf.lora_parameters(m), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        m(IMG).pow(2).sum().backward()
        opt.step()
    for b, k0, v0 in zip(m.blocks, k_base, v_base):
        qkv = b.attn.qkv
        assert qkv.targets == ("q", "v") and qkv.lora_B.shape == (48, 4)
        assert qkv.lora_B_for("q").abs().sum() > 0 and qkv.lora_B_for("v").abs().sum() > 0
        q, k, v = qkv.forward_split(x)
        torch.testing.assert_close(k, k0, rtol=0, atol=0)
        assert not torch.allclose(v, v0, atol=1e-4)  # v trained away from the base


# -- from_peft ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,inp,targets", [(bert, IDS, ["query", "value"]), (timm_vit, IMG, ["qkv", "fc2"])])
def test_from_peft_same_outputs_grads_keys(make, inp, targets, tmp_path):
    pm = peft_model(make(), targets)
    fused = copy.deepcopy(pm)
    keys = list(pm.state_dict())
    out = lf.from_peft(fused)
    assert out is fused
    layers = peft_layers(fused)
    assert layers and all(isinstance(m, peft.tuners.lora.Linear) for m in layers.values())
    assert list(fused.state_dict()) == keys
    with OpCounter() as counter:
        y = out_of(fused, inp)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
        (y * g).sum().backward()
    assert counter.ops.count("lora_fused.lora_linear.default") == len(layers)
    assert counter.ops.count("lora_fused.lora_linear_backward.default") == len(layers)
    y_ref = out_of(pm, inp)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    ref_layers = peft_layers(pm)
    for name, layer in layers.items():
        for ab in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, ab)["default"].weight.grad,
                                       getattr(ref_layers[name], ab)["default"].weight.grad, rtol=1e-4, atol=1e-5)
    # disable_adapter → base; save_pretrained → PEFT loads it; merge_and_unload → plain model
    with torch.no_grad():
        with fused.disable_adapter():
            torch.testing.assert_close(out_of(fused, inp), out_of(make(), inp), rtol=1e-5, atol=1e-5)
        fused.save_pretrained(str(tmp_path / "a"))
        again = peft.PeftModel.from_pretrained(make(), str(tmp_path / "a"))
        torch.testing.assert_close(out_of(again, inp), y_ref, rtol=1e-5, atol=1e-5)
        fused.merge_adapter()
        with OpCounter() as counter:
            torch.testing.assert_close(out_of(fused, inp), y_ref, rtol=1e-4, atol=1e-4)
        assert counter.ops == []  # merged: the plain base path
        fused.unmerge_adapter()
        merged = fused.merge_and_unload()
        assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
        torch.testing.assert_close(out_of(merged, inp), y_ref, rtol=1e-4, atol=1e-4)


def test_from_peft_train_mode_dropout_runs_on_our_op():
    pm = peft_model(bert(), ["query"], lora_dropout=0.2)
    lf.from_peft(pm)
    pm.train()
    torch.manual_seed(0)
    a = out_of(pm, IDS)
    torch.manual_seed(0)
    b = out_of(pm, IDS)
    torch.testing.assert_close(a, b)  # reproducible under manual_seed
    pm.eval()
    assert not torch.allclose(a, out_of(pm, IDS))


def _unchanged_classes(pm):
    return {n: type(m) for n, m in pm.named_modules()}


def test_from_peft_refuses_unsupported_features():
    dora = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    before = _unchanged_classes(dora)
    with pytest.raises(ValueError, match="DoRA"):
        lf.from_peft(dora)
    assert _unchanged_classes(dora) == before

    multi = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    multi.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query"]))
    multi.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="active adapters"):
        lf.from_peft(multi)

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1,
                                                          n_head=2, bos_token_id=0, eos_token_id=0))
    fifo = peft.get_peft_model(gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lf.from_peft(fifo)

    emb = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["word_embeddings", "query"]))
    before = _unchanged_classes(emb)
    with pytest.raises(ValueError, match="word_embeddings.*only LoRA on nn.Linear"):
        lf.from_peft(emb)
    assert _unchanged_classes(emb) == before

    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        lf.from_peft(bert())


def test_from_peft_multiple_adapters_set_later_raise_at_forward():
    pm = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    lf.from_peft(pm)
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query"]))
    pm.set_adapter("other")  # one active adapter: still ours
    with OpCounter() as counter:
        out_of(pm, IDS)
    assert counter.ops
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(RuntimeError, match="active adapters"):
        out_of(pm, IDS)


def test_importing_lora_fused_does_not_import_peft():
    code = "import sys, lora_fused; assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_peft_and_inject_on_cuda_match_peft(dtype):
    """On the GPU (the fastest available backend): from_peft and inject_lora against PEFT, outputs and grads.

    float32: element by element. bfloat16: norm-wise, ‖a − ref‖ / ‖ref‖ ≤ 3e-2 — twelve blocks of bf16 rounding
    in two different operation orders (PEFT's separate GEMMs, our fused kernels) drift element by element far
    beyond a GEMM's own 1e-3–1e-2, while a wrong term (a missing scale, a dropped target) moves the norm by more."""
    base = timm_vit().to("cuda", dtype)
    ours = copy.deepcopy(base)
    torch.manual_seed(9)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], init_lora_weights=False)
    pm = peft.get_peft_model(base, cfg, autocast_adapter_dtype=False)
    fused = copy.deepcopy(pm)
    lf.from_peft(fused)
    lf.inject_lora(ours, ["qkv", "fc1"], r=4, lora_alpha=8)
    copy_peft_into_ours(pm, ours)

    def close(a, ref, what):
        a, ref = a.float(), ref.float()
        if dtype == torch.float32:
            atol = 2e-3 * max(1.0, float(ref.abs().max()))
            torch.testing.assert_close(a, ref, rtol=2e-3, atol=atol, msg=lambda m: f"{what}: {m}")
        else:
            rel = ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert rel <= 3e-2, f"{what}: norm-wise relative error {rel:.2e}"

    img = IMG.to("cuda", dtype)
    y_ref, y_fused, y_ours = pm(img), fused(img), ours(img)
    close(y_fused, y_ref, "from_peft output")
    close(y_ours, y_ref, "inject_lora output")
    for y in (y_ref, y_fused, y_ours):
        y.float().square().sum().backward()
    ref_layers, fused_layers = peft_layers(pm), peft_layers(fused)
    for name, layer in ref_layers.items():
        for ab in ("lora_A", "lora_B"):
            g_ref = getattr(layer, ab)["default"].weight.grad
            close(getattr(fused_layers[name], ab)["default"].weight.grad, g_ref, f"from_peft {name}.{ab} grad")
            close(getattr(ours.get_submodule(name), ab).grad, g_ref, f"inject_lora {name}.{ab} grad")
