"""The "triton" backend inside the package: dispatch and reasons, lazy import, saved-for-backward bytes, opcheck,
torch.compile(fullgraph=True), and the modules (LoRALinear / LoRAQKV) running on it."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear, LoRAQKV
from lora_fused.backends import get_backend_impl, select_backend
from lora_fused.ops.lora_linear import _lora_linear_backward_op, _lora_linear_op

from conftest import assert_close_dtype, assert_compiled_train_matches_eager, saved_tensor_bytes

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    "triton" not in lora_fused.available_backends(), reason="Triton backend unavailable here"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lazy_import_and_reason_without_interpreter():
    """One fresh interpreter (imports are slow here) with TRITON_INTERPRET=0: importing and using lora_fused does
    not load the Triton kernels, and without a GPU the backend says why it is unavailable.
    (torch._dynamo itself imports the triton package when installed; our kernels load on first use only.)"""
    code = (
        "import sys, torch, lora_fused; m = lora_fused.LoRALinear(4, 4); m(torch.randn(2, 4)); "
        "print(any(k.startswith('lora_fused.kernels.triton') for k in sys.modules)); "
        "from lora_fused.backends import unavailable_reason; print(unavailable_reason('triton'))"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    loaded, reason = out.stdout.strip().splitlines()
    assert loaded == "False"
    if torch.cuda.is_available():
        assert reason == "None"
    else:
        assert "no CUDA GPU" in reason and "TRITON_INTERPRET" in reason


def test_reject_reasons_name_dtype_device_and_rank():
    impl = get_backend_impl("triton")
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    assert impl.reject_reason(x, W, A, B) is None
    assert "float64" in impl.reject_reason(x.double(), W.double(), A.double(), B.double())
    assert "bfloat16" in impl.reject_reason(*(t.bfloat16() for t in (x, W, A, B)))
    assert "rank" in impl.reject_reason(x, W, torch.randn(129, 8), torch.randn(6, 129))
    assert "targets" in impl.reject_reason(x, W, torch.randn(8, 8), torch.randn(6, 2))
    assert "lora_A" in impl.reject_reason(x, W, A.half(), B)
    meta = torch.randn(4, 8, device="meta")
    assert "device" in impl.reject_reason(meta, W.to("meta"), A.to("meta"), B.to("meta"))
    with pytest.raises(RuntimeError, match="'triton' cannot run these tensors: dtype torch.float64"):
        select_backend("triton", x.double(), W.double(), A.double(), B.double())


def test_auto_does_not_pick_triton_on_cpu():
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    assert get_backend_impl("triton").auto_device_types == ("cuda",)
    assert select_backend("auto", x, W, A, B).name in ("torch", "cuda")


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("cls", ["linear", "qkv"])
def test_saved_bytes_are_x_plus_h(p, cls):
    M, K, N, r = 3 * 10, 24, 36, 4
    if cls == "linear":
        m, n_h = LoRALinear(K, N, r=r, lora_dropout=p), r
    else:
        m, n_h = LoRAQKV(K, N, r=r, lora_dropout=p, targets="qv"), 2 * r
    nn.init.normal_(m.lora_B)
    m.train()
    x = torch.randn(3, 10, K, requires_grad=True)
    with lora_fused.use_backend("triton"):
        saved, y = saved_tensor_bytes(lambda: m(x), exclude=list(m.parameters()))
        assert saved == x.numel() * 4 + M * n_h * 4
        y.sum().backward()
    assert x.grad is not None and m.lora_A.grad is not None and m.lora_B.grad is not None


def _op_args(M, K, N, r, T, slices, p, bias):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    x, W, A, B = mk(M, K), mk(N, K), mk(T * r, K), mk(sum(slices[1::2]), r)
    b = mk(N) if bias else None
    return x, W, b, A, B, (torch.tensor([77]) if p else None)


@pytest.mark.parametrize("p,bias,slices,T", [(0.0, True, [0, 12], 1), (0.2, False, [0, 4, 8, 4], 2)])
def test_opcheck_with_triton_backend(p, bias, slices, T):
    x, W, b, A, B, seed = _op_args(5, 9, 12, 3, T, slices, p, bias)
    torch.library.opcheck(_lora_linear_op, (x, W, b, A, B, seed, 0.5, p, slices, "triton"))
    g, h = torch.randn(5, 12), torch.randn(5, 3 * T)
    torch.library.opcheck(
        _lora_linear_backward_op,
        (g, x.detach(), W.detach(), A.detach(), B.detach(), h, seed, 0.5, p, slices, "triton",
         [True, False, bias, True, True]),
    )


def test_compile_fullgraph_train_with_dropout_matches_eager():
    m = LoRALinear(20, 14, r=3, lora_dropout=0.25)
    nn.init.normal_(m.lora_B)
    assert_compiled_train_matches_eager(m, torch.randn(2, 5, 20), seed=3, backend="triton")


def test_modules_match_torch_backend_in_eval():
    """Without dropout the function is backend-independent: Triton vs torch backend through the modules."""
    torch.manual_seed(0)
    lin = LoRALinear(26, 18, r=4)
    qkv = LoRAQKV(26, 30, r=2, targets="qv", splits=(10, 10, 10))
    for m in (lin, qkv):
        for p in m.parameters():
            if p.requires_grad:
                nn.init.normal_(p)
        x = torch.randn(3, 7, 26, requires_grad=True)
        with lora_fused.use_backend("torch"):
            y_ref = m(x)
            gx_ref, = torch.autograd.grad(y_ref.sum(), x)
        with lora_fused.use_backend("triton"):
            y = m(x)
            gx, = torch.autograd.grad(y.sum(), x)
        assert_close_dtype(y, y_ref.double(), torch.float32)
        assert_close_dtype(gx, gx_ref.double(), torch.float32, "grad")


def test_fp16_module_with_dropout_reproducible_under_manual_seed():
    m = LoRALinear(24, 16, r=4, lora_dropout=0.2, dtype=torch.float16).train()
    nn.init.normal_(m.lora_B)
    x = torch.randn(12, 24, dtype=torch.float16)
    with lora_fused.use_backend("triton"):
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(1)
        b = m(x)
        c = m(x)  # the generator moved on: a new seed, a new mask
    assert torch.equal(a, b) and not torch.equal(a, c)
