"""Save only what the needed gradients require: exact saved bytes for every combination of frozen / trainable
adapters, input with or without gradient, dropout on or off, on LoRALinear and LoRAQKV, through both routes of
the op (the eager route and the registered op), and every computed gradient against float64 math built from
the kernel's own mask."""

import pytest
import torch
import torch.nn as nn

from lora_fused import LoRALinear, LoRAQKV, use_backend
from lora_fused.kernels.reference import dropout_keep_mask
from lora_fused.ops.lora_linear import _lora_linear_backward_op, draw_seed

from conftest import assert_close_dtype, naive_lora

M_SHAPE, K, R = (3, 7), 24, 4  # x is (3, 7, 24): M = 21 rows


def _count_saved(fn, exclude):
    """Bytes of every distinct storage ``saved_tensors_hooks`` sees (one-element tensors included),
    parameters excluded, and whether a one-element int64 tensor (the seed) was among them."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, seeds = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
            if t.numel() == 1 and t.dtype == torch.int64:
                seeds.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), bool(seeds), out


class _Dispatch(torch.utils._python_dispatch.TorchDispatchMode):
    """A pass-through dispatch mode: with one active, the module runs through the registered op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _module(cls, p):
    torch.manual_seed(0)
    if cls == "linear":
        m = LoRALinear(K, 20, r=R, lora_dropout=p)
    else:
        m = LoRAQKV(K, 36, r=R, lora_dropout=p, targets="qv")
    nn.init.normal_(m.lora_B)
    return m.train()


@pytest.mark.parametrize("route", ["eager", "op"])
@pytest.mark.parametrize("cls", ["linear", "qkv"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("a_trains,x_grad,w_trains", [
    (True, True, False), (False, True, False), (True, False, False), (False, False, False), (False, True, True),
])
def test_saved_bytes_and_gradients(route, cls, p, a_trains, x_grad, w_trains):
    m = _module(cls, p)
    m.lora_A.requires_grad_(a_trains)
    m.weight.requires_grad_(w_trains)
    x = torch.randn(*M_SHAPE, K).requires_grad_(x_grad)
    M, n_h = 21, m.lora_A.shape[0]

    def forward():
        torch.manual_seed(7)
        with use_backend("torch"):
            if route == "op":
                with _Dispatch():
                    return m(x)
            return m(x)

    nbytes, has_seed, y = _count_saved(forward, exclude=list(m.parameters()))
    keep_x = a_trains or w_trains  # dA and dW need x
    keep_seed = p > 0 and (x_grad or a_trains)  # the mask of dx or dA
    expected = (x.numel() * 4 if keep_x else 0) + M * n_h * 4  # h for dB (B always trains here)
    expected += 8 if keep_seed else 0  # the int64 seed
    assert nbytes == expected
    assert has_seed == keep_seed

    g = torch.randn_like(y)
    (y * g).sum().backward()

    # float64 reference with the mask the kernel drew: the same generator state, the same seed
    torch.manual_seed(7)
    seed = int(draw_seed(x).item())
    keep = dropout_keep_mask(seed, M, K, p, x.device).view(*M_SHAPE, K) if p else None
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in
              (("x", x), ("W", m.weight), ("b", m.bias), ("A", m.lora_A), ("B", m.lora_B))}
    ref = naive_lora(leaves["x"], leaves["W"], leaves["b"], leaves["A"], leaves["B"], m.scaling, keep, p,
                     m.lora_slices())
    assert_close_dtype(y, ref, torch.float32)
    (ref * g.double()).sum().backward()
    computed = {"x": x.grad, "W": m.weight.grad, "b": m.bias.grad, "A": m.lora_A.grad, "B": m.lora_B.grad}
    wanted = {"x": x_grad, "W": w_trains, "b": False, "A": a_trains, "B": True}
    for name, got in computed.items():
        assert (got is not None) == wanted[name], name
        if got is not None:
            assert_close_dtype(got, leaves[name].grad, torch.float32, "grad", msg=f"grad of {name}")


def test_frozen_A_saves_h_and_seed_only_at_any_dropout():
    """LoRA-FA's memory: with A frozen, the saved bytes are M x r plus the 8-byte seed (p > 0) whatever p is."""
    sizes = []
    for p in (0.0, 0.1, 0.5):
        m = _module("linear", p)
        m.lora_A.requires_grad_(False)
        x = torch.randn(64, K, requires_grad=True)
        nbytes, _, _ = _count_saved(lambda m=m, x=x: m(x), exclude=list(m.parameters()))
        sizes.append(nbytes)
    assert sizes == [64 * R * 4, 64 * R * 4 + 8, 64 * R * 4 + 8]


@pytest.mark.parametrize("needs", [[True, False, False, False, True], [False, False, True, False, True],
                                   [True, False, False, False, False], [False, True, True, False, False]])
def test_backward_op_accepts_missing_x_and_h(needs):
    """The registered backward op with x=None (no dA, no dW) and/or h=None (no dB): opcheck, and the
    gradients equal those computed from the full inputs."""
    gen = torch.Generator().manual_seed(1)
    g, x = torch.randn(5, 12, generator=gen), torch.randn(5, 9, generator=gen)
    W, A, B, h = (torch.randn(*s, generator=gen) for s in ((12, 9), (6, 9), (8, 3), (5, 6)))
    seed, slices = torch.tensor([77]), [0, 4, 8, 4]
    full = _lora_linear_backward_op(g, x, W, A, B, h, seed, 0.5, 0.2, slices, "torch", needs)
    x_arg = x if (needs[1] or needs[3]) else None
    h_arg = h if needs[4] else None
    args = (g, x_arg, W, A, B, h_arg, seed, 0.5, 0.2, slices, "torch", needs)
    torch.library.opcheck(_lora_linear_backward_op, args)
    for a, b in zip(_lora_linear_backward_op(*args), full):
        torch.testing.assert_close(a, b)
