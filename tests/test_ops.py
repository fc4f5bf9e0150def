"""The registered ops: opcheck, torch.compile(fullgraph=True), saved-for-backward bytes, backend errors."""

import os

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear, LoRAQKV
from lora_fused.ops.lora_linear import _lora_linear_backward_op, _lora_linear_op

from conftest import assert_compiled_train_matches_eager, naive_lora, saved_tensor_bytes


def _op_args(M, K, N, r, dtype, p, slices, bias=True, T=1):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    n_lora = sum(slices[1::2])
    x, W = mk(M, K).requires_grad_(), mk(N, K).requires_grad_()
    b = mk(N).requires_grad_() if bias else None
    A, B = mk(T * r, K).requires_grad_(), mk(n_lora, r).requires_grad_()
    seed = torch.tensor([77]) if p else None
    return x, W, b, A, B, seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p,bias", [(0.0, True), (0.2, False)])
@pytest.mark.parametrize("slices,T", [([0, 12], 1), ([0, 4, 8, 4], 2)])
def test_opcheck_forward_and_backward(dtype, p, bias, slices, T):
    x, W, b, A, B, seed = _op_args(5, 9, 12, 3, dtype, p, slices, bias, T)
    torch.library.opcheck(_lora_linear_op, (x, W, b, A, B, seed, 0.5, p, slices, "torch"))
    g = torch.randn(5, 12, dtype=dtype)
    h = torch.randn(5, 3 * T, dtype=dtype)
    for needs in ([True, True, bias, True, True], [True, False, False, True, True], [False, False, False, True, False]):
        torch.library.opcheck(
            _lora_linear_backward_op,
            (g, x.detach(), W.detach(), A.detach(), B.detach(), h, seed, 0.5, p, slices, "torch", needs),
        )


def test_public_functional_op_matches_math():
    x, W, b, A, B, _ = _op_args(4, 6, 5, 2, torch.float64, 0, [0, 5])
    y = lora_fused.ops.lora_linear(x, W, b, A, B, 0.25)
    torch.testing.assert_close(y, naive_lora(x, W, b, A, B, 0.25))
    Wq = torch.randn(9, 6, dtype=torch.float64)
    Ak, Bk = torch.randn(2, 6, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    yq = lora_fused.ops.lora_qkv(x, Wq, None, Ak, Bk, 0.5, targets="k")
    expected = x @ Wq.t()
    expected[:, 3:6] += 0.5 * (x @ Ak.t()) @ Bk.t()
    torch.testing.assert_close(yq, expected)
    with pytest.raises(ValueError, match="expected lora_A"):
        lora_fused.ops.lora_qkv(x, Wq, None, Ak, Bk, 0.5, targets="kv")


def _compile_train_check(make):
    torch.manual_seed(0)
    m = make()
    nn.init.normal_(m.lora_B)
    assert_compiled_train_matches_eager(m, torch.randn(3, 7, m.in_features))


def test_compile_fullgraph_lora_linear_train_with_dropout():
    _compile_train_check(lambda: LoRALinear(24, 40, r=4, lora_dropout=0.1))


def test_compile_fullgraph_lora_qkv_train_with_dropout():
    _compile_train_check(lambda: LoRAQKV(24, 48, r=4, lora_dropout=0.1, targets="qv", splits=(16, 16, 16)))


def test_compile_inductor_fullgraph_runs_and_matches_at_p0():
    torch.manual_seed(0)
    m = LoRAQKV(16, 48, r=2, lora_dropout=0.1, targets="qv")
    nn.init.normal_(m.lora_B)
    x = torch.randn(2, 5, 16, requires_grad=True)
    cm = torch.compile(m, fullgraph=True)
    cm(x).sum().backward()  # train mode with dropout through Inductor
    m.eval()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


def _peft_layer(K, N, r, p):
    peft = pytest.importorskip("peft")

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(K, N)), peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=p, target_modules=["0"]))
    model.train()
    return model


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("cls", ["linear", "qkv"])
def test_saved_bytes_are_x_plus_h_and_below_peft(p, cls):
    M, K, N, r = 4 * 50, 64, 96, 8
    if cls == "linear":
        m = LoRALinear(K, N, r=r, lora_dropout=p)
        n_h = r
    else:
        m = LoRAQKV(K, N, r=r, lora_dropout=p, targets="qv")
        n_h = 2 * r
    m.train()
    x = torch.randn(4, 50, K, requires_grad=True)
    ours, y = saved_tensor_bytes(lambda: m(x), exclude=list(m.parameters()))
    assert ours == x.numel() * 4 + M * n_h * 4
    y.sum().backward()
    if cls == "linear":
        layer = _peft_layer(K, N, r, p)
        peft_bytes, _ = saved_tensor_bytes(lambda: layer(x), exclude=list(layer.parameters()))
        # At p=0 PEFT also saves only x and x Aᵀ (its dropout is an Identity): the floor. With dropout it
        # also keeps the dropped copy of x (and the mask), which we regenerate instead.
        assert ours < peft_bytes if p > 0 else ours == peft_bytes


def test_saved_bytes_without_input_grad():
    """The frozen-input case (first layer): still x and h only."""
    m = LoRALinear(32, 16, r=4, lora_dropout=0.1).train()
    x = torch.randn(10, 32)
    ours, _ = saved_tensor_bytes(lambda: m(x), exclude=list(m.parameters()))
    assert ours == x.numel() * 4 + 10 * 4 * 4


def test_named_backend_that_cannot_run_raises_with_reason():
    for name in ("cuda", "triton"):
        if name in lora_fused.available_backends():
            continue
        with pytest.raises(RuntimeError, match=f"'{name}' is not available: .+"):
            lora_fused.set_backend(name)
        with pytest.raises(RuntimeError, match="not available"):
            with lora_fused.use_backend(name):
                pass
    with pytest.raises(ValueError, match="unknown lora_fused backend"):
        lora_fused.set_backend("fast")


def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    assert lora_fused.get_backend() == "torch"
    monkeypatch.setenv("LORA_FUSED_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown lora_fused backend 'nope'"):
        lora_fused.get_backend()
    lora_fused.set_backend("torch")
    assert lora_fused.get_backend() == "torch"


def test_backward_runs_on_the_forward_backend_outside_the_context():
    """The requested backend travels with the op, so a backward outside ``use_backend`` uses it too."""
    m = LoRALinear(8, 8, r=2, lora_dropout=0.5).train()
    nn.init.normal_(m.lora_B)
    x = torch.randn(4, 8, requires_grad=True)
    with lora_fused.use_backend("torch"):
        torch.manual_seed(0)
        y = m(x)
    y.sum().backward()
    torch.manual_seed(0)
    x2 = x.detach().clone().requires_grad_(True)
    m(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_info_runs(capsys):
    from lora_fused import info

    info.main()
    out = capsys.readouterr().out
    assert "torch" in out and "backends" in out and "CUDA extension" in out


def test_import_is_light():
    """``import lora_fused`` imports neither Triton, Dynamo, PEFT nor transformers."""
    import subprocess
    import sys

    code = ("import sys, lora_fused; bad = [m for m in ('triton', 'torch._dynamo', 'peft', 'transformers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_auto_picks_the_cuda_backend_only_where_validated(monkeypatch):
    """By default "auto" may pick the CUDA kernels on sm_90 only; LORA_FUSED_CUDA_AUTO=1 adds every GPU, =0 none."""
    from lora_fused.backends import cuda_backend, get_backend_impl

    env = os.environ.get("LORA_FUSED_CUDA_AUTO", "").strip()
    assert get_backend_impl("cuda").auto_device_types == (() if env == "0" else ("cuda",))
    be = cuda_backend.CudaBackend()
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(cuda_backend, "_AUTO_ENV", "")
    for cap, skipped in (((9, 0), False), ((8, 0), True), ((8, 9), True), ((10, 0), True)):
        monkeypatch.setattr(cuda_backend, "_capability", lambda index, c=cap: c)
        reason = be.auto_skip_reason(dev)
        assert (reason is not None) == skipped, (cap, reason)
        if skipped:
            assert f"{cap[0]}.{cap[1]}" in reason and "LORA_FUSED_CUDA_AUTO=1" in reason
    monkeypatch.setattr(cuda_backend, "_AUTO_ENV", "1")
    assert be.auto_skip_reason(dev) is None
    assert be.auto_skip_reason(torch.device("cpu")) is None
