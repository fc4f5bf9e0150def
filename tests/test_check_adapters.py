"""Adapters a model bypasses: the warning of inject_lora and check_adapters, on real models (PyTorch's
TransformerEncoder, timm BEiT / EVA / Swin V2 / ViT with random weights, offline)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import lora_fused as lf

timm = pytest.importorskip("timm")


def _randomize_B(model: nn.Module, seed: int = 0) -> None:
    """Nonzero lora_B everywhere, so an adapter that computes changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lf.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_transformer_encoder_layer_warns_and_check_names_the_eval_bypass():
    enc = _encoder()
    with pytest.warns(UserWarning, match=r"layers\.0\.linear1.*fast path"):
        names = lf.inject_lora(enc, ["linear1", "linear2"], r=4)
    _randomize_B(enc)
    x = torch.randn(2, 5, 32)
    merged = lf.merge_lora(enc, inplace=False).eval()

    enc.eval()
    with torch.no_grad():
        bypassed = enc(x)
        expected = merged(x)
    assert (bypassed - expected).abs().max() > 1e-2  # PyTorch's fast path ignored the adapters

    check = lf.check_adapters(enc, x)
    assert check.unused == names
    status = {(u.name, u.mode): u.status for u in check.results}
    assert all(status[(n, "train")] == "ok" for n in names)
    assert all(status[(n, "eval")] == "not called" for n in names)
    assert "fast path" in str(check) and "not called" in str(check)
    with pytest.raises(RuntimeError, match=r"layers\.1\.linear2"):
        lf.check_adapters(enc, x, strict=True)

    # The remedy the message names: without the fast path, eval computes the adapters.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert lf.check_adapters(enc, x, modes=("eval",)).ok
        with torch.no_grad():
            torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("arch", ["beit", "eva", "swinv2"])
def test_timm_attention_reading_qkv_weight_is_named(arch):
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    model = {
        "beit": lambda: Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3),
        "eva": lambda: Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, qkv_bias=True),
        "swinv2": lambda: SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                            num_heads=(2, 2), num_classes=3),
    }[arch]()
    with torch.no_grad():  # like trained weights: no zero-initialised layer (Swin V2's post-norms) hides a change
        for p in model.parameters():
            if not p.any():
                p.fill_(1.0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        base = model(x)
    with pytest.warns(UserWarning, match=r"F\.linear\(x, weight=self\.qkv\.weight.*qkv_bias_separate"):
        names = lf.inject_lora(model, ["qkv"], qkv_targets="qv", r=2)
    _randomize_B(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base)  # the adapters are bypassed: the base model's output

    check = lf.check_adapters(model, x)
    assert check.unused == names and len(names) == 2
    assert all(u.status == "not called" for u in check.results)

    # The remedy the message names (timm's own switch): qkv(x) is called, the adapters take part.
    for m in model.modules():
        if hasattr(m, "qkv_bias_separate"):
            m.qkv_bias_separate = True
    assert lf.check_adapters(model, x).ok
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), base)


def test_vit_that_calls_its_qkv_passes_without_warning():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.inject_lora(model, ["qkv", "fc1"], qkv_targets="qv", r=2)
    check = lf.check_adapters(model, torch.randn(2, 3, 32, 32))
    assert check.ok and check.unused == []
    assert len(check.results) == 2 * 4  # 4 modules, 2 modes
    text = str(lf.lora_summary(model, check=check))
    assert "adapter check (train, eval): 4 LoRA modules, 0 took no part" in text


class _Discards(nn.Module):
    """Calls one adapter but throws its output away; the other is used."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.ignored = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        self.ignored(x)
        return {"logits": self.norm(self.used(x)), "aux": [x.sum()]}


def test_called_but_unused_adapter_is_no_gradient_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = _Discards()
    lf.inject_lora(model, ["used", "ignored"], r=2, lora_dropout=0.1)
    model.train()
    model.norm.eval()
    stats = [b.clone() for b in model.buffers()]
    x = torch.randn(4, 8)
    rng = torch.get_rng_state()
    check = lf.check_adapters(model, x)
    assert check.unused == ["ignored"]
    assert {u.status for u in check.results if u.name == "ignored"} == {"no gradient"}
    assert {u.status for u in check.results if u.name == "used"} == {"ok"}
    # training flags, BatchNorm statistics, RNG, .grad and the modules' forward are as before
    assert model.training and not model.norm.training and model.used.training
    for before, after in zip(stats, model.buffers()):
        assert torch.equal(before, after)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert "forward" not in model.used.__dict__


def test_check_without_backward_and_frozen_adapters():
    model = _Discards()
    lf.inject_lora(model, ["used", "ignored"], r=2)
    for p in lf.lora_parameters(model):
        p.requires_grad_(False)
    check = lf.check_adapters(model, torch.randn(4, 8), modes=("eval",))
    assert check.ok and all(u.reached is None for u in check.results)  # nothing trains: only calls are checked
    with pytest.raises(ValueError, match="modes"):
        lf.check_adapters(model, torch.randn(4, 8), modes=("test",))
    with pytest.raises(TypeError, match="nn.Module"):
        lf.check_adapters("model")


def test_transformers_model_output_keyword_inputs_and_a_compiled_wrapper():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100)
    model = transformers.BertModel(cfg)
    names = lf.inject_lora(model, ["query", "value"], r=2)
    compiled = torch.compile(model)  # looked through: the check runs the wrapped model eagerly
    check = lf.check_adapters(compiled, input_ids=torch.tensor([[1, 7, 9, 2]]))
    assert check.ok and sorted({u.name for u in check.results}) == sorted(names)
    assert all(u.reached for u in check.results)  # the gradient of a ModelOutput's tensors reached every adapter


def test_transformer_decoder_layer_calls_its_linears():
    """nn.TransformerDecoderLayer has no fused eval path for its feed-forward: no warning, adapters used."""
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.inject_lora(dec, ["linear1", "linear2"], r=2)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        lf.inject_lora(dec, ["self_attn.out_proj"], r=2)
    assert lf.check_adapters(dec, torch.randn(2, 5, 32), torch.randn(2, 7, 32)).ok


def test_timm_attention_on_its_calling_branch_gives_no_warning():
    """timm's BEiT calls qkv(x) without separate q/v biases, or with qkv_bias_separate: nothing to warn about."""
    from timm.models.beit import Beit

    for qkv_bias, separate in ((False, False), (True, True)):
        model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, qkv_bias=qkv_bias)
        for block in model.blocks:
            block.attn.qkv_bias_separate = separate
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lf.inject_lora(model, ["qkv"], qkv_targets="qv", r=2)
        assert lf.check_adapters(model, torch.randn(1, 3, 32, 32)).ok
