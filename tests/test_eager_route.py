"""The eager route of the op (no torch.library dispatch when nothing traces the call): it is taken when it
should be and only then, it computes exactly what the registered op computes, the backend choice it caches
follows use_backend/set_backend/LORA_FUSED_BACKEND, and the torch backend's on-device (hashed) mask."""

import importlib
import math
from unittest import mock

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear, LoRAQKV
from lora_fused.backends import get_backend_impl
from lora_fused.kernels.reference import hashed_keep_mask, lora_linear_backward_ref, lora_linear_forward_ref

from conftest import assert_close_dtype, assert_neighbours_uncorrelated, naive_lora

op_module = importlib.import_module("lora_fused.ops.lora_linear")


class _Dispatch(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _module(cls, p=0.2):
    torch.manual_seed(0)
    if cls == "linear":
        m = LoRALinear(12, 10, r=3, lora_dropout=p)
    else:
        m = LoRAQKV(12, 30, r=3, lora_dropout=p, targets="qv")
    nn.init.normal_(m.lora_B)
    return m.train()


def _step(m, x, seed=3):
    torch.manual_seed(seed)
    y = m(x)
    y.pow(2).sum().backward()
    grads = (x.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone())
    x.grad = m.lora_A.grad = m.lora_B.grad = None
    return (y.detach(), *grads)


@pytest.mark.parametrize("cls", ["linear", "qkv"])
def test_eager_route_skips_the_registered_op_and_matches_it(cls):
    m = _module(cls)
    x = torch.randn(2, 5, 12, requires_grad=True)
    boom = mock.Mock(side_effect=AssertionError("the registered op was called in plain eager mode"))
    with mock.patch.object(op_module, "_lora_linear_op", boom), \
            mock.patch.object(op_module, "_lora_linear_backward_op", boom):
        eager = _step(m, x)
        m.eval()
        with torch.no_grad():
            eager_eval = m(x)
        m.train()
    with _Dispatch():  # an active dispatch mode sends the call through the registered op
        via_op = _step(m, x)
    for a, b in zip(eager, via_op):
        assert torch.equal(a, b)  # same backend functions, same seed: bitwise equal
    m.eval()
    with _Dispatch(), torch.no_grad():
        assert torch.equal(m(x), eager_eval)


def test_registered_op_is_used_under_a_dispatch_mode():
    m = _module("linear")
    calls = []
    real = op_module._lora_linear_op

    def spy(*args):
        calls.append(1)
        return real(*args)

    with mock.patch.object(op_module, "_lora_linear_op", spy), _Dispatch():
        m(torch.randn(4, 12))
    assert calls == [1]


def test_backend_choice_follows_use_backend_set_backend_and_env(monkeypatch):
    """The cached choice is keyed by the requested name: switching takes effect on the next call."""
    if "triton" not in lora_fused.available_backends():
        pytest.skip("Triton is not available here")
    import lora_fused.backends as backends

    m = _module("linear", p=0.0)
    x = torch.randn(3, 12)
    ran = []
    for name in ("torch", "triton"):
        impl = get_backend_impl(name)
        monkeypatch.setattr(impl, "forward", lambda *a, _f=impl.forward, _n=name: (ran.append(_n), _f(*a))[1])
    m(x)  # auto: torch on CPU
    with lora_fused.use_backend("triton"):
        m(x)
    m(x)
    lora_fused.set_backend("triton")
    m(x)
    monkeypatch.setattr(backends, "_process_default", None)
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    m(x)
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    m(x)
    assert ran == ["torch", "triton", "torch", "triton", "triton", "torch"]
    monkeypatch.setenv("LORA_FUSED_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown lora_fused backend 'nope'"):
        m(x)


def test_named_backend_that_rejects_the_tensors_raises_on_every_call():
    m = _module("linear", p=0.0).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    if "triton" not in lora_fused.available_backends():
        pytest.skip("Triton is not available here")
    with lora_fused.use_backend("triton"):
        for _ in range(2):  # the second call hits the cache and still raises
            with pytest.raises(RuntimeError, match="'triton' cannot run these tensors: dtype torch.float64"):
                m(x)


def test_parameter_modified_in_place_before_backward_raises():
    m = _module("linear", p=0.0)
    y = m(torch.randn(3, 12, requires_grad=True))
    with torch.no_grad():
        m.lora_B.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_is_refused():
    m = _module("linear", p=0.0)
    x = torch.randn(3, 12, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=False)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(m(x).sum(), x, create_graph=True)
    assert gx.shape == x.shape


# ----------------------------------------------------------------------------- hashed mask (non-CPU devices)
def test_hashed_mask_is_a_pure_function_of_seed_and_position():
    s = torch.tensor([123456789012345])
    a = hashed_keep_mask(s, 40, 70, 0.3)
    assert torch.equal(a, hashed_keep_mask(s.clone(), 40, 70, 0.3))
    assert not torch.equal(a, hashed_keep_mask(s + 1, 40, 70, 0.3))
    assert not torch.equal(a, hashed_keep_mask(s + 2**40, 40, 70, 0.3))  # the high 32 bits matter
    assert torch.equal(hashed_keep_mask(s, 20, 70, 0.3), a[:20])  # row-major positions: a prefix is a prefix


def _mix32_py(v):
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x31848BAB) & 0xFFFFFFFF
    return v ^ (v >> 16)


def test_hashed_mask_follows_its_documented_formula():
    """u = mix(mix(i_lo ^ s_lo) ^ i_hi ^ s_hi) mod 2**16, kept when u >= round(p·65536): element by element."""
    from lora_fused.kernels.reference.dropout import keep_threshold_u16

    seed, rows, cols, p = 0x1234_5678_9ABC_DEF, 5, 7, 0.4
    keep = hashed_keep_mask(torch.tensor([seed]), rows, cols, p)
    s_lo, s_hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for i in range(rows * cols):
        u = _mix32_py(_mix32_py(i ^ s_lo) ^ (i >> 32) ^ s_hi) & 0xFFFF
        assert bool(keep.view(-1)[i]) == (u >= keep_threshold_u16(p)), i


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_hashed_mask_statistics(p):
    from lora_fused.kernels.reference.dropout import keep_threshold_u16

    keep = hashed_keep_mask(torch.tensor([2024]), 300, 400, p)
    q = 1 - keep_threshold_u16(p) / 65536
    sigma = math.sqrt(q * (1 - q) / keep.numel())
    assert abs(keep.float().mean().item() - q) < 5 * sigma
    for sub in (keep[:, :7], keep[:9]):  # no stuck rows or columns
        assert abs(sub.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / sub.numel())
    if p == 0.5:
        assert_neighbours_uncorrelated(keep)


@pytest.mark.parametrize("slices", [[0, 9], [0, 3, 6, 3]])
def test_reference_kernels_with_a_seed_tensor_use_the_hashed_mask(slices):
    """What the torch backend runs on a GPU (the seed stays a device tensor): gradients vs float64."""
    gen = torch.Generator().manual_seed(5)
    T, r, M, K, N = len(slices) // 2, 2, 6, 11, 9
    x, W, b = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    A, B = torch.randn(T * r, K, generator=gen), torch.randn(sum(slices[1::2]), r, generator=gen)
    seed, p = torch.tensor([99]), 0.3
    y, h = lora_linear_forward_ref(x, W, b, A, B, 0.5, p, seed, slices)
    g = torch.randn(M, N, generator=gen)
    grads = lora_linear_backward_ref(g, x, W, A, B, h, 0.5, p, seed, slices, [True, True, True, True, True])
    keep = hashed_keep_mask(seed, M, K, p)
    leaves = [t.double().requires_grad_(True) for t in (x, W, b, A, B)]
    ref = naive_lora(*leaves, 0.5, keep, p, slices)
    assert_close_dtype(y, ref, torch.float32)
    (ref * g.double()).sum().backward()
    for got, leaf in zip(grads, leaves):
        assert_close_dtype(got, leaf.grad, torch.float32, "grad")


def test_adapter_on_another_device_raises_on_the_fast_path():
    """The eager fast path compares devices too: a meta adapter on a CPU input would otherwise run without error
    (meta kernels accept the mix) and return nonsense."""
    for train in (True, False):
        m = _module("linear").train(train)
        m.lora_adapters["default"].lora_A = nn.Parameter(torch.empty(m.lora_A.shape, device="meta"))
        with pytest.raises(lora_fused.LoRADtypeError, match="another device"):
            m(torch.randn(4, 12))
