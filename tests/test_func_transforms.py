"""The layers under torch.func transforms (grad, vmap, jvp): plain PyTorch operations with the torch backend's
mask, against eager autograd on the same seeds."""

import importlib

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

import lora_fused
from lora_fused import LoRALinear, LoRAQKV

op_module = importlib.import_module("lora_fused.ops.lora_linear")


def _layer(cls, p):
    torch.manual_seed(0)
    m = LoRALinear(16, 24, r=4, lora_dropout=p) if cls == "linear" else LoRAQKV(16, 24, r=4, targets="qv",
                                                                               lora_dropout=p)
    torch.nn.init.normal_(m.lora_B)
    return m.double().train()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("cls", ["linear", "qkv"])
def test_func_grad_matches_eager_autograd_with_the_same_mask(cls, p):
    m = _layer(cls, p)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    trainable = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}

    def loss(params, xx):
        return (functional_call(m, params, (xx,)) ** 2).sum()

    torch.manual_seed(7)
    got = grad(loss, argnums=(0, 1))(trainable, x)
    x_eager = x.clone().requires_grad_()
    torch.manual_seed(7)  # the same generator state: the same seed, so the same mask
    (m(x_eager) ** 2).sum().backward()
    named = dict(m.named_parameters())
    assert set(got[0]) == {"lora_adapters.default.lora_A", "lora_adapters.default.lora_B"}
    for name, g in got[0].items():
        torch.testing.assert_close(g, named[name].grad, msg=name)
    torch.testing.assert_close(got[1], x_eager.grad)


def test_vmap_and_jvp_in_eval_match_the_layer():
    m = _layer("qkv", 0.3).eval()
    xb = torch.randn(6, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(vmap(m)(xb), torch.stack([m(x) for x in xb]))
    v = torch.randn(5, 16, dtype=torch.float64)
    _, tangent = jvp(m, (xb[0],), (v,))
    torch.testing.assert_close(tangent, m(v) - m(torch.zeros_like(v)))  # the layer is affine in x


def test_per_sample_gradients_with_vmap_of_grad():
    m = _layer("linear", 0.0)
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    xb, tb = torch.randn(4, 3, 16, dtype=torch.float64), torch.randn(4, 3, 24, dtype=torch.float64)

    def loss(pp, x, t):
        return ((functional_call(m, pp, (x,)) - t) ** 2).mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, xb, tb)
    for i in range(4):
        one = grad(loss)(params, xb[i], tb[i])
        for name in params:
            torch.testing.assert_close(per_sample[name][i], one[name])


def test_vmap_dropout_follows_randomness():
    m = _layer("linear", 0.5)
    xb = torch.randn(3, 5, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(m)(xb)
    torch.manual_seed(3)
    same = vmap(m, randomness="same")(xb)
    for i in range(3):  # one mask for every sample: what the eager layer draws from the same state
        torch.manual_seed(3)
        torch.testing.assert_close(same[i], m(xb[i]))
    assert not torch.equal(same[0], m.eval()(xb[0]))  # dropout was active


def test_a_named_backend_other_than_torch_says_why(monkeypatch):
    m = _layer("linear", 0.0)
    monkeypatch.setattr(op_module, "requested_backend", lambda: "triton")
    with pytest.raises(lora_fused.BackendUnavailableError, match="torch.func transforms"):
        grad(lambda x: m(x).sum())(torch.randn(2, 16, dtype=torch.float64))
