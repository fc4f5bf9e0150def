"""The Triton kernels' in-kernel dropout: one mask per seed, shared by forward and backward, statistically sound."""


import pytest
import torch

from lora_fused.ops.lora_linear import _lora_linear_op

from conftest import assert_keep_statistics, assert_neighbours_uncorrelated

pytest.importorskip("triton")
import triton  # noqa: E402

from lora_fused.kernels.reference.dropout import keep_threshold_u16  # noqa: E402
from lora_fused.kernels.triton import dropout_mask, triton_dropout_keep_mask  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in __import__("lora_fused").available_backends(), reason="Triton backend unavailable here"
)


def test_reproducible_per_seed_and_seeds_differ():
    a = triton_dropout_keep_mask(2024, 40, 70, 0.3)
    b = triton_dropout_keep_mask(torch.tensor([2024]), 40, 70, 0.3)
    c = triton_dropout_keep_mask(2025, 40, 70, 0.3)
    assert torch.equal(a, b)
    # two independent masks of rate 0.3 disagree on 2·0.3·0.7 = 42 % of the elements
    assert 0.35 < (a != c).float().mean().item() < 0.49
    high = triton_dropout_keep_mask(2024 + 2**40, 40, 70, 0.3)  # the high 32 bits of the seed matter too
    assert (a != high).float().mean().item() > 0.35


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_kept_fraction_within_statistical_bounds(p):
    M, K = 96, 160
    keep = triton_dropout_keep_mask(99, M, K, p)
    assert_keep_statistics(keep, p)


def test_neighbouring_decisions_are_uncorrelated():
    keep = triton_dropout_keep_mask(5, 64, 128, 0.5)
    assert_neighbours_uncorrelated(keep)


def test_mask_is_a_function_of_position_not_of_tiling():
    """Every kernel tiles differently; the mask must not depend on the tile shape."""
    seed = torch.tensor([31337])
    M, K = 37, 75
    ref = triton_dropout_keep_mask(seed, M, K, 0.4)
    for bm, bk in ((16, 8), (32, 64), (64, 16)):
        out = torch.empty(M, K, dtype=torch.int8)
        grid = (triton.cdiv(M, bm), triton.cdiv(K, bk))
        dropout_mask._keep_mask_kernel[grid](seed, out, M, K, keep_threshold_u16(0.4), BLOCK_M=bm, BLOCK_K=bk)
        assert torch.equal(out.bool(), ref), (bm, bk)
    # fewer rows: the same decisions at the same (row, col)
    assert torch.equal(triton_dropout_keep_mask(seed, 20, K, 0.4), ref[:20])


def test_forward_h_uses_exactly_the_exported_mask():
    """h = x̂ Aᵀ with A = identity rows reads the dropped input back: it must equal keep∘x/(1-p) exactly."""
    M, K, p = 23, 40, 0.35
    x = torch.randn(M, K)
    W = torch.zeros(8, K)
    A = torch.zeros(K, K)  # T·r = K = 40 ≤ 128, B has r = 40 columns
    A[torch.arange(K), torch.arange(K)] = 1.0
    B = torch.zeros(8, K)
    seed = torch.tensor([8])
    _, h = _lora_linear_op(x, W, None, A, B, seed, 1.0, p, [0, 8], "triton")
    keep = triton_dropout_keep_mask(seed, M, K, p)
    torch.testing.assert_close(h, torch.where(keep, x / (1 - p), torch.zeros_like(x)), atol=1e-6, rtol=1e-6)


def test_backward_regenerates_the_forward_mask():
    """dA = dhᵀ x̂ and dx's low-rank term read the mask in backward: with s·gB = 1 they expose it directly."""
    M, K, N, p = 18, 24, 1, 0.4
    x = torch.randn(M, K, requires_grad=True)
    W = torch.zeros(N, K)
    A = torch.randn(1, K, requires_grad=True)
    B = torch.ones(N, 1, requires_grad=True)
    seed = torch.tensor([4242])
    y, _ = _lora_linear_op(x, W, None, A, B, seed, 1.0, p, [0, N], "triton")
    y.sum().backward()
    keep = triton_dropout_keep_mask(seed, M, K, p).float() / (1 - p)
    torch.testing.assert_close(x.grad, keep * A.detach(), atol=1e-5, rtol=1e-5)       # dx = m/(1-p)∘(1·A)
    torch.testing.assert_close(A.grad, (keep * x.detach()).sum(0, keepdim=True), atol=1e-4, rtol=1e-4)
    # and a different seed gives a different gradient (the mask is not ignored)
    x.grad = None
    y2, _ = _lora_linear_op(x, W, None, A, B, torch.tensor([4243]), 1.0, p, [0, N], "triton")
    y2.sum().backward()
    assert not torch.allclose(x.grad, keep * A.detach())


def test_seed_is_read_on_device_not_synced(monkeypatch):
    """The kernels take the seed tensor itself: .item() is never called on it."""
    def boom(self):
        raise AssertionError(".item() called on a tensor")

    x = torch.randn(9, 16, requires_grad=True)
    W, A, B = torch.randn(8, 16), torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    seed = torch.tensor([5])
    monkeypatch.setattr(torch.Tensor, "item", boom)
    y, _ = _lora_linear_op(x, W, None, A, B, seed, 1.0, 0.2, [0, 8], "triton")
    y.sum().backward()


def _philox_words(c0, c1, key):
    """Philox-4x32-10 of counters (c0, c1, 0, 0) (int64 tensors holding uint32) under a 64-bit key, vectorized over
    the counters (Salmon et al. 2011: multipliers 0xD2511F53, 0xCD9E8D57; key bumps 0x9E3779B9, 0xBB67AE85)."""
    m32 = 0xFFFFFFFF
    x = [c0, c1, torch.zeros_like(c0), torch.zeros_like(c0)]
    k0, k1 = key & m32, (key >> 32) & m32
    for _ in range(10):
        p0 = 0xD2511F53 * x[0]
        p1 = 0xCD9E8D57 * x[2]
        x = [((p1 >> 32) ^ x[1] ^ k0) & m32, p1 & m32, ((p0 >> 32) ^ x[3] ^ k1) & m32, p0 & m32]
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return x


def test_mask_is_the_documented_philox_formula():
    """keep[row, col] = half (col % 2) of Philox word (col % 8) // 2 at counter (col // 8, row) ≥ round(p·65536):
    checks the packed-bit generation and both unpackings (blocked and MMA layouts share one definition) against
    plain arithmetic, independent of the kernels' code."""
    seed, p, M, K = 0x0123_4567_89AB_CDEF, 0.37, 11, 70
    rows = torch.arange(M).view(M, 1).expand(M, K)
    cols = torch.arange(K).view(1, K).expand(M, K)
    words = _philox_words(cols // 8, rows, seed)
    lane = cols % 8
    w = torch.stack(words, -1).gather(-1, (lane // 2).unsqueeze(-1)).squeeze(-1)
    u16 = (w >> (16 * (lane % 2))) & 0xFFFF
    want = u16 >= keep_threshold_u16(p)
    assert torch.equal(triton_dropout_keep_mask(torch.tensor([seed]), M, K, p), want)
