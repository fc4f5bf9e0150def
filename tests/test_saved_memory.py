"""Save only what the needed gradients require, on the torch backend: LoRA-FA's bytes at any dropout rate, and the
registered backward op with x and/or h missing. (Exact saved bytes and gradients for every combination, on every
backend, both routes: test_saved_memory_backends.py.)"""

import pytest
import torch
import torch.nn as nn

from lora_fused import LoRALinear, LoRAQKV
from lora_fused.ops.lora_linear import _lora_linear_backward_op

from test_saved_memory_backends import context_seeds, count_saved

M_SHAPE, K, R = (3, 7), 24, 4  # x is (3, 7, 24): M = 21 rows


def _module(cls, p):
    torch.manual_seed(0)
    if cls == "linear":
        m = LoRALinear(K, 20, r=R, lora_dropout=p)
    else:
        m = LoRAQKV(K, 36, r=R, lora_dropout=p, targets="qv")
    nn.init.normal_(m.lora_B)
    return m.train()


def test_frozen_A_saves_h_and_seed_only_at_any_dropout():
    """LoRA-FA's memory: with A frozen, the saved bytes are M x r, and the seed (p > 0) whatever p is: on this
    CPU eager route a Python int on the autograd context, no tensor."""
    sizes, seeds = [], []
    for p in (0.0, 0.1, 0.5):
        m = _module("linear", p)
        m.lora_A.requires_grad_(False)
        x = torch.randn(64, K, requires_grad=True)
        nbytes, tensor_seeds, y = count_saved(lambda m=m, x=x: m(x), exclude=list(m.parameters()))
        sizes.append(nbytes)
        seeds.append((tensor_seeds, context_seeds(y)))
    assert sizes == [64 * R * 4] * 3
    assert seeds == [(0, 0), (0, 1), (0, 1)]


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
