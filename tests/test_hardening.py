"""Activation checkpointing, autocast, threads, NaN/Inf, a default device set elsewhere: the same numbers under all
of it."""

import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lora_fused
from lora_fused import LoRALinear, LoRAQKV


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = LoRAQKV(16, 48, r=4, lora_dropout=0.3, targets="qv")
        self.proj = LoRALinear(48, 16, r=2, lora_dropout=0.3)
        for m in (self.qkv, self.proj):
            nn.init.normal_(m.lora_B)

    def forward(self, x):
        return self.proj(torch.tanh(self.qkv(x)))


def _grads(model, x, ckpt):
    torch.manual_seed(123)
    x = x.detach().clone().requires_grad_(True)
    y = checkpoint(model, x, **ckpt) if ckpt is not None else model(x)
    y.pow(2).sum().backward()
    out = [x.grad] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return y.detach(), out


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_mask(use_reentrant):
    torch.manual_seed(0)
    model = _Block().train()
    x = torch.randn(3, 5, 16)
    y_ref, g_ref = _grads(model, x, None)
    y_ck, g_ck = _grads(model, x, {"use_reentrant": use_reentrant})
    torch.testing.assert_close(y_ck, y_ref)
    for a, b in zip(g_ck, g_ref):
        torch.testing.assert_close(a, b)


def test_checkpointing_under_compile_with_dropout():
    torch.manual_seed(0)
    model = _Block().train()
    x = torch.randn(2, 4, 16)
    y_ref, g_ref = _grads(model, x, None)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def run(x):
        return checkpoint(model, x, use_reentrant=False)

    torch.manual_seed(123)
    xc = x.clone().requires_grad_(True)
    run(xc).pow(2).sum().backward()
    torch.testing.assert_close(xc.grad, g_ref[0])
    torch.testing.assert_close(model.qkv.lora_A.grad, g_ref[1 + 0])


@pytest.mark.parametrize("cls", [LoRALinear, LoRAQKV])
def test_autocast_bf16_cpu_like_nn_linear(cls):
    m = cls(16, 24, r=4)
    nn.init.normal_(m.lora_B)
    lin = nn.Linear(16, 24)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        assert y.dtype == lin(x).dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.lora_A.grad.dtype == torch.float32
    expected = m.eval()(x).detach()
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


def test_use_backend_is_context_local_across_threads():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name, choice):
        with lora_fused.use_backend(choice):
            barrier.wait()
            seen[name] = lora_fused.get_backend()
            barrier.wait()

    threads = [threading.Thread(target=worker, args=("a", "torch")), threading.Thread(target=worker, args=("b", "auto"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": "torch", "b": "auto"}
    assert lora_fused.get_backend() == "auto"


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_nan_and_inf_propagate_like_nn_linear(p):
    m = LoRALinear(8, 4, r=2, lora_dropout=p).train()
    nn.init.normal_(m.lora_B)
    x = torch.randn(3, 8)
    x[0, 1] = float("nan")
    x[2, 3] = float("inf")
    y = m(x)
    base = nn.functional.linear(x, m.weight, m.bias)
    assert torch.equal(torch.isnan(y[0]), torch.isnan(base[0])) and torch.isnan(y[0]).all()
    assert not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[1]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_like_nn_linear(dtype):
    torch.manual_seed(0)
    m = LoRAQKV(64, 192, r=8, targets="qv", lora_dropout=0.1).cuda()
    nn.init.normal_(m.lora_B, std=0.1)
    lin = nn.Linear(64, 192).cuda()
    x = torch.randn(4, 10, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = m.eval()(x)
        assert y.dtype == lin(x).dtype == dtype
        m.train()(x).float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.lora_A.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), m.eval()(x).detach(), atol=5e-2, rtol=5e-2)


def test_cpu_layers_work_with_the_default_device_set_elsewhere():
    """``torch.set_default_device`` pointing elsewhere (here the meta device) does not move the torch backend's
    CPU caches (the dropout seed buffer, the 0-dim zero, the padded B), made on first use: a fresh process."""
    code = textwrap.dedent("""
        import torch, lora_fused
        torch.manual_seed(0)
        lin = lora_fused.LoRALinear(16, 16, r=4, lora_dropout=0.1).train()
        qkv = lora_fused.LoRAQKV(16, 48, r=4, targets="qv", lora_dropout=0.1).train()
        x = torch.randn(8, 16, requires_grad=True)
        torch.set_default_device("meta")
        for m in (lin, qkv):
            m(x).sum().backward()
            m.eval()
            with torch.no_grad():
                assert m(x).device.type == "cpu"
            m.train()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
