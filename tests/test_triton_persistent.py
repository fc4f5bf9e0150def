"""The Triton kernels at the kernel/backend level under the interpreter: the persistent TMA kernels (sm_90 path)
and the pointer-based kernels (sm_80 path) on ragged shapes, fp32 and fp16, p = 0 and p > 0, every gradient
against float64 math with the kernels' own mask; deterministic reductions; x / h = None; the TF32 API."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_dtype, naive_lora

pytest.importorskip("triton")
from lora_fused.backends import get_backend_impl  # noqa: E402
from lora_fused.kernels.triton import _common, lora_linear, triton_dropout_keep_mask  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in __import__("lora_fused").available_backends(), reason="Triton backend unavailable here"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = (True, False, False, True, True)  # dx, dW, db, dA, dB


def _leaves(M, K, N, r, slices, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    T = len(slices) // 2
    return mk(M, K), mk(N, K, scale=K ** -0.5), mk(N), mk(T * r, K, scale=K ** -0.5), mk(sum(slices[1::2]), r)


@pytest.fixture(params=["tma", "pointer"])
def path(request, monkeypatch):
    """Run with the persistent TMA kernels or force the pointer kernels; record which forward ran."""
    monkeypatch.setenv("LORA_FUSED_TRITON_TMA", "1" if request.param == "tma" else "0")
    calls = []
    for name in ("lora_fwd_persistent", "lora_bwd_persistent", "lora_down", "lora_bwd_dx"):
        real = getattr(lora_linear, name)
        monkeypatch.setattr(lora_linear, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return request.param, calls


def _run_and_check(M, K, N, r, slices, dtype, p, needs=ALL, scaling=0.75):
    x, W, b, A, B = _leaves(M, K, N, r, slices, dtype)
    seed = torch.tensor([97531], dtype=torch.int64) if p > 0 else None
    impl = get_backend_impl("triton")
    y, h = impl.forward(x, W, b, A, B, scaling, p, seed, slices)
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = impl.backward(g, x, W, A, B, h, scaling, p, seed, slices, needs)
    keep = triton_dropout_keep_mask(seed, M, K, p) if p > 0 else None
    ref_leaves = [t.double().requires_grad_() for t in (x, W, b, A, B)]
    ref = naive_lora(*ref_leaves, scaling, keep, p, slices)
    ref.backward(g.double())
    assert_close_dtype(y, ref, dtype, "out", msg="y")
    xd = x.double() if keep is None else x.double() * keep / (1 - p)
    assert_close_dtype(h, xd @ A.double().t(), dtype, "out", msg="h")
    for name, got, need, rt in zip("x W b A B".split(), grads, needs, ref_leaves):
        if need:
            assert got is not None and got.shape == rt.shape and got.dtype == dtype, name
            assert_close_dtype(got, rt.grad, dtype, "grad", msg=f"d{name} p={p}")
        else:
            assert got is None, name
    return y, h, grads


# M, N, K are multiples of no tile (interpreter tiles 16×32×16; GPU tiles ≥ 64) but keep 16-byte rows for TMA.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_ragged_shapes_every_gradient(path, dtype, p):
    kind, calls = path
    _run_and_check(37, 40, 72, 3, [0, 72], dtype, p)
    expect = {"lora_fwd_persistent", "lora_bwd_persistent"} if kind == "tma" else {"lora_down", "lora_bwd_dx"}
    assert expect <= set(calls), calls


@pytest.mark.parametrize("split", [1, 2])
def test_dx_epilogue_subtiles(monkeypatch, split):
    """The dx kernel's prologue/epilogue in 1 or 2 column subtiles (the GPU configs use both): every gradient,
    p > 0, with the producer/consumer handshake taking both branches."""
    from lora_fused.kernels.triton import lora_bwd_persistent as bp

    monkeypatch.setenv("LORA_FUSED_TRITON_TMA", "1")
    cfg = bp._configs([(16, 32, 16, 4, 1, split)])
    monkeypatch.setattr(bp._KERNEL, "configs", {**bp._KERNEL.configs, "interpret": cfg})
    bp._KERNEL._for.cache_clear()
    try:
        _run_and_check(45, 72, 40, 3, [0, 40], torch.float32, 0.3)
    finally:
        bp._KERNEL._for.cache_clear()


@pytest.mark.parametrize("slices", [[0, 24, 48, 24], [8, 40, 56, 16, 72, 8]])
def test_targets_straddling_tiles(path, slices):
    _run_and_check(21, 24, 80, 4, slices, torch.float32, 0.2)


def test_misaligned_rows_fall_back_to_pointer_kernels(monkeypatch):
    """K = 37 fp32 rows are not 16-byte aligned: no TMA descriptor; the pointer kernels run, still exact."""
    monkeypatch.setenv("LORA_FUSED_TRITON_TMA", "1")
    calls = []
    real = lora_linear.lora_down
    monkeypatch.setattr(lora_linear, "lora_down", lambda *a, **k: calls.append(1) or real(*a, **k))
    _run_and_check(19, 37, 30, 2, [0, 30], torch.float32, 0.25)
    assert calls


@pytest.mark.parametrize("programs", [1, 2, 5])
def test_producer_consumer_handshake_any_schedule(monkeypatch, programs):
    """The interpreter runs programs one after another: with 1 program every consumer finds its row block's
    h / dh' published; with more, consumers of rows produced by a later program recompute them."""
    monkeypatch.setenv("LORA_FUSED_TRITON_TMA", "1")
    monkeypatch.setattr(_common, "INTERPRET_PROGRAMS", programs)
    _run_and_check(45, 48, 96, 2, [0, 96], torch.float32, 0.3)


@pytest.mark.parametrize("needs", [
    (True, False, False, False, True),   # x not needed: dx and dB only
    (True, False, False, True, False),   # h not needed: dx and dA
    (True, False, False, False, False),  # dx only: neither x nor h
    (False, False, False, True, True),   # no dx (the pointer kernels)
])
def test_x_and_h_may_be_none(path, needs):
    """x may be None without dA/dW, h without dB: the same gradients as with them."""
    M, K, N, r, slices, p = 23, 32, 48, 3, [0, 48], 0.2
    x, W, b, A, B = _leaves(M, K, N, r, slices, torch.float32)
    seed = torch.tensor([5])
    impl = get_backend_impl("triton")
    _, h = impl.forward(x, W, b, A, B, 0.5, p, seed, slices)
    g = torch.randn(M, N)
    full = impl.backward(g, x, W, A, B, h, 0.5, p, seed, slices, needs)
    bare = impl.backward(g, x if (needs[1] or needs[3]) else None, W, A, B, h if needs[4] else None, 0.5, p, seed,
                         slices, needs)
    for a, c in zip(full, bare):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_missing_x_is_an_error():
    x, W, b, A, B = _leaves(8, 16, 16, 2, [0, 16], torch.float32)
    impl = get_backend_impl("triton")
    with pytest.raises(ValueError, match="x is needed"):
        impl.backward(torch.randn(8, 16), None, W, A, B, None, 0.5, 0.0, None, [0, 16], ALL)


def test_deterministic_mode_is_bitwise_reproducible(path):
    """Under torch.use_deterministic_algorithms, dA and dB come from per-block partials summed in a fixed order:
    two runs agree bit for bit, and they match the float64 math."""
    M, K, N, r, slices, p = 70, 48, 64, 4, [0, 64], 0.25
    x, W, b, A, B = _leaves(M, K, N, r, slices, torch.float32)
    seed = torch.tensor([11])
    impl = get_backend_impl("triton")
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1))
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, h = impl.forward(x, W, b, A, B, 0.5, p, seed, slices)
        runs = [impl.backward(g, x, W, A, B, h, 0.5, p, seed, slices, ALL) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(saved)
    for i in (0, 3, 4):
        assert torch.equal(runs[0][i], runs[1][i])
    keep = triton_dropout_keep_mask(seed, M, K, p)
    rA, rB = A.double().requires_grad_(), B.double().requires_grad_()
    naive_lora(x.double(), W.double(), b.double(), rA, rB, 0.5, keep, p).backward(g.double())
    assert_close_dtype(runs[0][3], rA.grad, torch.float32, "grad")
    assert_close_dtype(runs[0][4], rB.grad, torch.float32, "grad")


def test_fp32_precision_api_does_not_crash_and_is_followed():
    """Once TF32 was set through ``torch.backends.cuda.matmul.fp32_precision``, reading the legacy flag raises;
    the kernels read the new API (in a fresh process: the API state is global)."""
    code = (
        "import torch; from lora_fused.kernels.triton._common import dot_precision; "
        "from lora_fused.backends import get_backend_impl; "
        "m = torch.backends.cuda.matmul; m.fp32_precision = 'tf32'; a = dot_precision(torch.float32); "
        "m.fp32_precision = 'ieee'; b = dot_precision(torch.float32); "
        "x, W, A, B = torch.randn(9, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2); "
        "y, h = get_backend_impl('triton').forward(x, W, None, A, B, 1.0, 0.0, None, [0, 8]); "
        "torch.testing.assert_close(y, x @ W.t() + (x @ A.t()) @ B.t(), rtol=1e-4, atol=1e-4); "
        "print(a, b, dot_precision(torch.float16))"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["tf32", "ieee", "tf32"]


def test_scratch_allocator_keeps_a_users_allocator():
    """Device-side descriptors need triton.set_allocator; ours is installed per launch only when none is set."""
    from triton.runtime import _allocation

    scope = _common.scratch_allocator()
    with scope:
        assert _allocation._allocator.get() is _common._scratch
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)

    def mine(size, alignment, stream):
        raise AssertionError("not called here")

    token = _allocation._allocator.set(mine)
    try:
        with _common.scratch_allocator():
            assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)
