"""Triton backend numerics (interpreter on CPU): forward and every gradient against the float64 reference built
from the Triton kernels' own keep mask, fp32 and fp16, odd shapes, qkv target subsets, GQA splits."""

import pytest
import torch

from lora_fused.ops.lora_linear import _lora_linear_op

from conftest import assert_close_dtype, naive_lora

pytest.importorskip("triton")
from lora_fused.kernels.triton import triton_dropout_keep_mask  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in __import__("lora_fused").available_backends(), reason="Triton backend unavailable here"
)


def _make(M, K, N, r, T, n_lora, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    x = mk(M, K)
    W = mk(N, K, scale=K ** -0.5)
    b = mk(N) if bias else None
    A = mk(T * r, K, scale=K ** -0.5)
    B = mk(n_lora, r, scale=0.5)
    return x, W, b, A, B


def _check(M, K, N, r, dtype, p, slices, bias=True, needs=(True, True, True, True, True), seed_val=1234,
           x_override=None):
    """Run the op with backend "triton" (fwd + bwd through autograd) and compare with the float64 reference."""
    T = len(slices) // 2
    x, W, b, A, B = _make(M, K, N, r, T, sum(slices[1::2]), dtype, bias)
    if x_override is not None:
        x = x_override(x)
    seed = torch.tensor([seed_val], dtype=torch.int64) if p > 0 else None
    leaves = [x, W, b, A, B]
    for t, need in zip(leaves, needs):
        if t is not None:
            t.requires_grad_(need)
    y, h = _lora_linear_op(x, W, b, A, B, seed, 0.75, p, list(slices), "triton")
    assert y.dtype == dtype and y.shape == (M, N) and h.shape == (M, T * r)
    keep = triton_dropout_keep_mask(seed, M, K, p) if p > 0 else None
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in leaves]
    ref = naive_lora(*ref_leaves, 0.75, keep, p, slices)
    assert_close_dtype(y, ref, dtype, "out", msg=f"y {dtype}")
    xd = ref_leaves[0].detach() if keep is None else ref_leaves[0].detach() * keep / (1 - p)
    h_ref = xd @ ref_leaves[3].detach().t()
    assert_close_dtype(h, h_ref, dtype, "out", msg="h")
    if not any(t is not None and t.requires_grad for t in leaves):
        return
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(g)
    ref.backward(g.double())
    for name, t, rt in zip("x W b A B".split(), leaves, ref_leaves):
        if t is None:
            continue
        if t.requires_grad:
            assert t.grad is not None and t.grad.dtype == dtype and t.grad.shape == t.shape, name
            assert_close_dtype(t.grad, rt.grad, dtype, "grad", msg=f"d{name} {dtype} p={p} slices={slices}")
        else:
            assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_all_gradients_odd_shapes(dtype, p):
    _check(33, 37, 100, 5, dtype, p, [0, 100])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rank_one_no_bias(dtype):
    _check(19, 24, 40, 1, dtype, 0.1, [0, 40], bias=False)


def test_rank_128_dense():
    """The largest supported rank: BLOCK_R = 128, one R-block."""
    _check(20, 40, 24, 128, torch.float32, 0.2, [0, 24])


def test_three_targets_of_rank_64_use_two_r_blocks():
    """T·r = 192 > 128: the down/dA kernels take two R-blocks, the dx kernel loops over T·r."""
    _check(18, 35, 48, 64, torch.float32, 0.2, [0, 16, 16, 16, 32, 16])


@pytest.mark.parametrize("needs", [
    (False, False, False, True, True),    # frozen input: adapters only (first layer)
    (True, False, False, False, False),   # only dx (adapters frozen)
    (False, False, False, True, False),   # only dA
    (False, False, False, False, True),   # only dB
    (True, True, True, False, False),     # base unfrozen, adapters frozen
])
def test_gradient_subsets(needs):
    _check(21, 30, 36, 3, torch.float32, 0.25, [0, 36], needs=needs)


QKV_SUBSETS = ["q", "k", "v", "qk", "qv", "kv", "qkv"]


def _qkv_slices(splits, targets):
    from lora_fused.ops.lora_qkv import qkv_lora_slices

    return qkv_lora_slices(splits, tuple(targets))


@pytest.mark.parametrize("targets", QKV_SUBSETS)
def test_qkv_every_target_subset(targets):
    # 3 × 26 outputs: the interpreter's BLOCK_N = 32 tiles straddle both the q|k and the k|v boundary
    splits = (26, 26, 26)
    _check(17, 29, 78, 3, torch.float32, 0.2, _qkv_slices(splits, targets))


@pytest.mark.parametrize("targets,dtype", [("qv", torch.float16), ("qkv", torch.float32), ("kv", torch.float32)])
def test_qkv_gqa_split(targets, dtype):
    splits = (40, 10, 10)  # grouped-query attention: k, v smaller than q, boundaries mid-tile
    _check(15, 33, 60, 4, dtype, 0.15, _qkv_slices(splits, targets))


def test_m_zero():
    x, W, b, A, B = _make(0, 12, 10, 2, 1, 10, torch.float32)
    for t in (x, A, B, W, b):
        t.requires_grad_()
    y, h = _lora_linear_op(x, W, b, A, B, torch.tensor([3]), 0.5, 0.2, [0, 10], "triton")
    assert y.shape == (0, 10) and h.shape == (0, 2)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    for t in (A, B, W, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_non_contiguous_input():
    """A strided view of x (every other column of a wider tensor): kernels honour strides."""
    wide = torch.randn(13, 42)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    _check(13, 21, 30, 2, torch.float32, 0.2, [0, 30], x_override=lambda _: x.detach())


def test_transposed_input():
    _check(16, 24, 20, 3, torch.float16, 0.0, [0, 20], x_override=lambda x: x.t().contiguous().t())


def test_3d_input_through_functional_op():
    """(B, S, K) input through lora_fused.ops.lora_linear with dropout: same result as the reference with
    the mask of the seed the op draws from torch's generator."""
    import lora_fused
    from lora_fused.ops.lora_linear import draw_seed

    x, W, b, A, B = _make(2 * 7, 19, 11, 2, 1, 11, torch.float32)
    x3 = x.view(2, 7, 19).requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    with lora_fused.use_backend("triton"):
        torch.manual_seed(11)
        y = lora_fused.ops.lora_linear(x3, W, b, A, B, 0.5, dropout_p=0.3, training=True)
        y.pow(2).sum().backward()
    torch.manual_seed(11)
    seed = draw_seed(x)
    keep = triton_dropout_keep_mask(seed, 14, 19, 0.3)
    ref_x, ref_A, ref_B = (t.detach().double().requires_grad_() for t in (x3, A, B))
    ref = naive_lora(ref_x.view(14, 19), W.double(), b.double(), ref_A, ref_B, 0.5, keep, 0.3)
    assert y.shape == (2, 7, 11)
    assert_close_dtype(y.reshape(14, 11), ref, torch.float32)
    ref.pow(2).sum().backward()
    for t, rt in ((x3, ref_x), (A, ref_A), (B, ref_B)):
        assert_close_dtype(t.grad, rt.grad, torch.float32, "grad")


def test_tf32_follows_torch_flag():
    from lora_fused.kernels.triton._common import dot_precision

    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_op_accepts_nd_input_like_the_torch_backend():
    """The op is called with 2-D x by the modules, but an N-D x (as the fuzz tests pass) works on every backend."""
    x, W, b, A, B = _make(6, 13, 9, 2, 1, 9, torch.float32)
    x3 = x.view(2, 3, 13).requires_grad_()
    A.requires_grad_()
    seed = torch.tensor([9])
    y, h = _lora_linear_op(x3, W, b, A, B, seed, 0.5, 0.2, [0, 9], "triton")
    assert y.shape == (2, 3, 9) and h.numel() == 12 and h.shape[-1] == 2  # h: (M, T·r), the op flattens x
    y.sum().backward()
    keep = triton_dropout_keep_mask(seed, 6, 13, 0.2)
    rx, rA = x.double().requires_grad_(), A.detach().double().requires_grad_()
    ref = naive_lora(rx, W.double(), b.double(), rA, B.double(), 0.5, keep, 0.2)
    ref.sum().backward()
    assert_close_dtype(y.reshape(6, 9), ref, torch.float32)
    assert x3.grad.shape == (2, 3, 13)
    assert_close_dtype(x3.grad.reshape(6, 13), rx.grad, torch.float32, "grad")
    assert_close_dtype(A.grad, rA.grad, torch.float32, "grad")
