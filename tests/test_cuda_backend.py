"""The ``"cuda"`` backend (kernels from ``csrc/``) against the float64 math and the torch backend.

Needs a CUDA GPU (sm_80+) and the built extension (``LORA_FUSED_FORCE_CUDA=1 pip install --no-build-isolation
-e .``); every test skips with the reason otherwise. The dropout mask of the kernels is read back with the
backend's ``keep_mask`` (the same device function the kernels call), so outputs and every gradient with dropout
are checked against the float64 math with the kernel's own mask; the mask itself is checked against an
independent Python implementation of the documented Philox formula. Shapes are chosen to cross the real tile
edges (sm90: 128 x 256 x 64 tiles in 2-CTA clusters; sm80: 128 x 256 x 32) and to take every split path of the
small kernels (split-K of h, several column blocks of dh, several row blocks of dA/dB).
"""

from __future__ import annotations

import os

import pytest
import torch

import lora_fused
from lora_fused import LoRALinear, LoRAQKV
from lora_fused.backends import unavailable_reason

from conftest import TOLERANCES, assert_close_dtype, assert_keep_statistics, assert_neighbours_uncorrelated, naive_lora

# DEVICE is "cuda"; csrc/tools/dry_run_gpu_tests.py sets it to "cpu" with a Python stand-in for the extension to
# check this file's own logic on a machine without a GPU (it says nothing about the kernels).
DEVICE = os.environ.get("LORA_FUSED_CUDA_TEST_DEVICE", "cuda")
if DEVICE != "cuda":
    _REASON = None
elif not torch.cuda.is_available():
    _REASON = "needs a CUDA GPU (none visible)"
else:
    _REASON = unavailable_reason("cuda")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"CUDA backend unavailable: {_REASON}")]

DTYPES = [torch.float16, torch.bfloat16]
ALL = [True, True, True, True, True]


def _backend():
    from lora_fused.backends import get_backend_impl

    return get_backend_impl("cuda")


def _tensors(M, K, N, r, dtype, T=1, n_lora=None, bias=True, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, device=DEVICE, dtype=torch.float32) * 0.5).to(dtype)  # noqa: E731
    n_lora = N if n_lora is None else n_lora
    x, W = mk(M, K), mk(N, K) / K**0.5 * 2
    b = mk(N) if bias else None
    A, B = mk(T * r, K) / K**0.5 * 2, mk(n_lora, r)
    return x, W, b, A, B


def _seed(v):
    return torch.tensor([v], dtype=torch.int64, device=DEVICE)


def _reference(x, W, b, A, B, s, p, keep, slices, g):
    """float64 forward/backward with an explicit keep mask (autograd through the naive math)."""
    xs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, W, b, A, B)]
    y = naive_lora(*xs, s, keep=keep, p=p, lora_slices=slices)
    y.backward(g.double())
    xd = xs[0].detach() if keep is None else xs[0].detach() * keep.double() / (1 - p)
    h = xd @ xs[3].detach().t()
    return y.detach(), h, [t.grad if t is not None else None for t in xs]


def _check(M, K, N, r, dtype, p, slices=None, T=1, bias=True, seed=1234, x=None):
    be = _backend()
    slices = [0, N] if slices is None else slices
    n_lora = sum(slices[1::2])
    x0, W, b, A, B = _tensors(M, K, N, r, dtype, T=T, n_lora=n_lora, bias=bias)
    x = x0 if x is None else x
    s = 0.75
    sd = _seed(seed) if p > 0 else None
    assert be.reject_reason(x, W, A, B) is None
    y, h = be.forward(x, W, b, A, B, s, p, sd, slices)
    keep = be.keep_mask(sd, M, K, p) if p > 0 else None
    g = (torch.randn(M, N, device=DEVICE) * 0.5).to(dtype)
    y_ref, h_ref, grads_ref = _reference(x, W, b, A, B, s, p, keep, slices, g)
    assert y.shape == (M, N) and h.shape == (M, T * r) and y.dtype == dtype
    assert_close_dtype(y, y_ref, dtype, "out", msg="y")
    assert_close_dtype(h, h_ref, dtype, "out", msg="h")
    needs = [True, True, bias, True, True]
    dx, dW, db, dA, dB = be.backward(g, x, W, A, B, h, s, p, sd, slices, needs)
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB"), (dx, dW, db, dA, dB), grads_ref):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.dtype == dtype, name
        assert_close_dtype(got, want, dtype, "grad", msg=name)
    return y, h, (dx, dW, db, dA, dB)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "M,K,N,r",
    [
        (128, 256, 256, 16),  # one tile (sm90: the cluster's second CTA has no rows)
        (1, 64, 64, 8),
        (37, 72, 104, 4),  # R % 8 != 0: the padded copy of h
        (300, 200, 264, 16),  # ragged in M, N and K at the real tile sizes
        (130, 520, 776, 1),
        (65, 96, 40, 128),  # r = 128: two sm90 low-rank K-blocks
        (200, 40, 24, 24),
        (1000, 512, 520, 12),
    ],
)
def test_matches_float64_math(M, K, N, r, dtype, p):
    _check(M, K, N, r, dtype, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "M,K,N,r",
    [
        (64, 4096, 64, 16),  # one row block: h is split over K (fp32 partials + finish)
        (2048, 1024, 2048, 16),  # dh over several column blocks, dA/dB over several row blocks
        (512, 256, 1536, 128),  # r = 128: 64-column blocks of dh, rank block 128
    ],
)
def test_split_reductions_match_float64_math(M, K, N, r, dtype):
    _check(M, K, N, r, dtype, 0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_bias_and_m_zero(dtype):
    _check(50, 64, 48, 8, dtype, 0.2, bias=False)
    be = _backend()
    x, W, b, A, B = _tensors(0, 64, 48, 8, dtype)
    y, h = be.forward(x, W, b, A, B, 0.5, 0.3, _seed(3), [0, 48])
    assert y.shape == (0, 48) and h.shape == (0, 8)
    dx, dW, db, dA, dB = be.backward(y, x, W, A, B, h, 0.5, 0.3, _seed(3), [0, 48], ALL)
    assert dx.shape == (0, 64) and dW.shape == W.shape and db.shape == (48,)
    assert (dA == 0).all() and (dB == 0).all() and dA.shape == A.shape and dB.shape == B.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize(
    "splits,slices,T,r",
    [
        ((64, 64, 64), [0, 64, 128, 64], 2, 8),  # q and v of an MHA qkv
        ((96, 32, 32), [0, 96, 96, 32, 128, 32], 3, 8),  # GQA, all three targets
        ((40, 20, 20), [40, 20], 1, 8),  # k only, slice edges not on a tile edge
        ((52, 30, 30), [0, 52, 82, 30], 2, 8),  # v starts at column 82: unaligned g columns (element loads)
        ((256, 256, 256), [0, 256, 256, 256, 512, 256], 3, 64),  # R = 192: three sm90 low-rank K-blocks
        ((512, 128, 128), [0, 512, 640, 128], 2, 16),  # tiles touching no target run no low-rank block
    ],
)
def test_qkv_targets_and_splits(splits, slices, T, r, dtype, p):
    _check(70, 80, sum(splits), r, dtype, p, slices=slices, T=T)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_without_x_or_h(p):
    """x may be None when neither dA nor dW is needed, h None when dB is not (the op saves only what it needs)."""
    be = _backend()
    dtype = torch.bfloat16
    M, K, N, r = 300, 136, 264, 8
    x, W, b, A, B = _tensors(M, K, N, r, dtype)
    sd = _seed(11) if p > 0 else None
    _, h = be.forward(x, W, b, A, B, 0.5, p, sd, [0, N])
    g = torch.randn(M, N, device=DEVICE).to(dtype)
    full = be.backward(g, x, W, A, B, h, 0.5, p, sd, [0, N], ALL)
    only_dx = be.backward(g, None, W, A, B, None, 0.5, p, sd, [0, N], [True, False, False, False, False])
    assert torch.equal(only_dx[0], full[0]) and all(t is None for t in only_dx[1:])
    dx_db = be.backward(g, None, W, A, B, h, 0.5, p, sd, [0, N], [True, False, False, False, True])
    assert torch.equal(dx_db[0], full[0]) and torch.equal(dx_db[4], full[4]) and dx_db[3] is None
    da_only = be.backward(g, x, W, A, B, None, 0.5, p, sd, [0, N], [False, False, False, True, False])
    assert torch.equal(da_only[3], full[3]) and da_only[0] is None and da_only[4] is None


def test_bitwise_reproducible_with_and_without_deterministic_mode():
    """dA and dB go through fixed-order reductions (no atomics): identical bits run to run, split paths included."""
    be = _backend()
    dtype = torch.bfloat16
    M, K, N, r, p = 2048, 1024, 2048, 16, 0.1
    x, W, b, A, B = _tensors(M, K, N, r, dtype)
    g = torch.randn(M, N, device=DEVICE).to(dtype)
    runs = []
    saved = torch.are_deterministic_algorithms_enabled()
    try:
        for det in (False, False, True):
            torch.use_deterministic_algorithms(det)
            y, h = be.forward(x, W, b, A, B, 1.0, p, _seed(99), [0, N])
            runs.append((y, h, be.backward(g, x, W, A, B, h, 1.0, p, _seed(99), [0, N], [True, False, False, True, True])))
    finally:
        torch.use_deterministic_algorithms(saved)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])
        for a, c in zip(runs[0][2], other[2]):
            assert (a is None and c is None) or torch.equal(a, c)


@pytest.mark.parametrize("layout", ["column_slice", "transposed"])
def test_strided_x(layout):
    """A column slice of a wider tensor is read in place; a transposed x is copied (with a warning) and both
    give the contiguous result."""
    be = _backend()
    dtype = torch.float16
    M, K, N, r = 96, 64, 72, 8
    x, W, b, A, B = _tensors(M, K, N, r, dtype)
    if layout == "column_slice":
        wide = torch.zeros(M, 2 * K, device=DEVICE, dtype=dtype)
        wide[:, :K] = x
        xs = wide[:, :K]
    else:
        xs = x.t().contiguous().t()
    y_ref, h_ref = be.forward(x, W, b, A, B, 0.5, 0.2, _seed(4), [0, N])
    if layout == "transposed":
        with pytest.warns(UserWarning, match="copied"):
            y, h = be.forward(xs, W, b, A, B, 0.5, 0.2, _seed(4), [0, N])
    else:
        y, h = be.forward(xs, W, b, A, B, 0.5, 0.2, _seed(4), [0, N])
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


def test_dropout_same_mask_forward_backward_and_reproducible():
    be = _backend()
    dtype = torch.bfloat16
    M, K, N, r, p = 96, 136, 64, 8, 0.3
    x, W, b, A, B = _tensors(M, K, N, r, dtype)
    g = torch.randn(M, N, device=DEVICE).to(dtype)
    runs = []
    for _ in range(2):
        y, h = be.forward(x, W, b, A, B, 1.0, p, _seed(99), [0, N])
        grads = be.backward(g, x, W, A, B, h, 1.0, p, _seed(99), [0, N], [True, False, False, True, True])
        runs.append((y, h, grads))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2][0], runs[1][2][0]) and torch.equal(runs[0][2][3], runs[1][2][3])
    # another seed: another mask
    _, h2 = be.forward(x, W, b, A, B, 1.0, p, _seed(100), [0, N])
    assert not torch.equal(h2, runs[0][1])
    # the mask is a pure function of (seed, row, col): a sub-block of rows/cols gives the same decisions
    big = be.keep_mask(_seed(5), 300, 500, p)
    small = be.keep_mask(_seed(5), 40, 24, p)
    assert torch.equal(big[:40, :24], small)
    # backward uses the forward mask: x's gradient through the LoRA path vanishes exactly where dropped
    Wz = torch.zeros_like(W)
    dx = be.backward(g, None, Wz, A, B, None, 1.0, p, _seed(99), [0, N], [True, False, False, False, False])[0]
    keep = be.keep_mask(_seed(99), M, K, p)
    assert (dx[~keep] == 0).all()
    assert (dx[keep] != 0).float().mean() > 0.9


def test_dropout_scaling_in_bf16():
    """h, dA and the low-rank part of dx carry exactly one 1/(1-p): checked against the same kernels at p = 0 on
    the masked input, so the check does not depend on the bf16 tolerance (which a missing 1/(1-p) = 1.11 fits)."""
    be = _backend()
    dtype = torch.bfloat16
    M, K, N, r, p = 256, 128, 64, 16, 0.1
    x, W, b, A, B = _tensors(M, K, N, r, dtype)
    Wz = torch.zeros_like(W)  # dx is then the masked low-rank term alone
    g = torch.randn(M, N, device=DEVICE).to(dtype)
    keep = be.keep_mask(_seed(21), M, K, p)
    xm = x * keep.to(dtype)
    inv = 1.0 / (1.0 - p)
    _, h_p = be.forward(x, Wz, b, A, B, 1.0, p, _seed(21), [0, N])
    _, h_0 = be.forward(xm, Wz, b, A, B, 1.0, 0.0, None, [0, N])
    needs = [True, False, False, True, False]
    dx_p, _, _, dA_p, _ = be.backward(g, x, Wz, A, B, h_p, 1.0, p, _seed(21), [0, N], needs)
    dx_0, _, _, dA_0, _ = be.backward(g, xm, Wz, A, B, h_0, 1.0, 0.0, None, [0, N], needs)
    for name, got, base in (("h", h_p, h_0), ("dA", dA_p, dA_0), ("dx", dx_p, dx_0 * keep.to(dtype))):
        ratio = (got.double() * base.double()).sum() / (base.double() ** 2).sum()
        assert abs(ratio.item() - inv) < 0.01, f"{name}: scale {ratio.item():.4f}, expected 1/(1-p) = {inv:.4f}"


def test_seeds_differ_including_the_high_32_bits():
    be = _backend()
    a, c = be.keep_mask(_seed(2024), 40, 70, 0.3), be.keep_mask(_seed(2025), 40, 70, 0.3)
    # two independent masks of rate 0.3 disagree on 2*0.3*0.7 = 42 % of the elements
    assert 0.35 < (a != c).float().mean().item() < 0.49
    high = be.keep_mask(_seed(2024 + 2**40), 40, 70, 0.3)
    assert (a != high).float().mean().item() > 0.35


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_kept_fraction_within_statistical_bounds(p):
    M, K = 96, 160
    keep = _backend().keep_mask(_seed(99), M, K, p)
    assert_keep_statistics(keep, p)


def test_neighbouring_decisions_are_uncorrelated():
    keep = _backend().keep_mask(_seed(5), 64, 128, 0.5)
    assert_neighbours_uncorrelated(keep)


def _philox_ref(c0, c1, k0, k1):
    """Philox-4x32-10 in plain Python integers (Salmon et al. 2011; Random123's round and key schedule)."""
    mask = 0xFFFFFFFF
    c = [c0, c1, 0, 0]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & mask, (p0 >> 32) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c


def test_mask_matches_documented_philox_formula():
    seed, p, M, K = 0x1234_5678_9ABC_DEF0, 0.37, 5, 21
    thr = min(round(p * 65536), 65535)
    want = torch.zeros(M, K, dtype=torch.bool)
    for row in range(M):
        for grp in range((K + 7) // 8):
            words = _philox_ref(grp, row, seed & 0xFFFFFFFF, seed >> 32)
            for i in range(8):
                col = grp * 8 + i
                if col < K:
                    u = (words[i >> 1] >> (16 * (i & 1))) & 0xFFFF
                    want[row, col] = u >= thr
    got = _backend().keep_mask(_seed(seed), M, K, p).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_on_cuda_backend_match_torch_backend(dtype):
    torch.manual_seed(0)
    lin = LoRALinear(96, 80, r=8, lora_alpha=16, device=DEVICE, dtype=dtype)
    torch.nn.init.normal_(lin.lora_B, std=0.2)
    qkv = LoRAQKV(96, 3 * 32, r=4, targets="qv", device=DEVICE, dtype=dtype)
    for t in "qv":
        torch.nn.init.normal_(qkv.lora_B_for(t), std=0.2)
    x = torch.randn(3, 17, 96, device=DEVICE, dtype=dtype)
    for m in (lin, qkv):
        m.eval()
        outs = {}
        for name in ("torch", "cuda"):
            m.zero_grad()
            xx = x.clone().requires_grad_()
            with lora_fused.use_backend(name):
                y = m(xx)
                y.float().square().sum().backward()
            outs[name] = (y.detach(), xx.grad, m.lora_A.grad if hasattr(m, "lora_A") else None)
        atol, rtol = TOLERANCES[dtype]["out"]
        torch.testing.assert_close(outs["cuda"][0], outs["torch"][0], atol=atol, rtol=rtol)
        atol, rtol = TOLERANCES[dtype]["grad"]
        scale = max(1.0, outs["torch"][1].abs().max().item())
        torch.testing.assert_close(outs["cuda"][1], outs["torch"][1], atol=atol * scale, rtol=rtol)


def test_training_with_dropout_through_the_module_is_reproducible():
    torch.manual_seed(0)
    m = LoRALinear(64, 48, r=8, lora_dropout=0.2, device=DEVICE, dtype=torch.bfloat16)
    torch.nn.init.normal_(m.lora_B, std=0.2)
    m.train()
    x = torch.randn(33, 64, device=DEVICE, dtype=torch.bfloat16)
    ys = []
    with lora_fused.use_backend("cuda"):
        for _ in range(2):
            torch.manual_seed(5)
            ys.append(m(x))
    assert torch.equal(ys[0], ys[1])


def test_auto_picks_cuda_for_half_and_rejects_float32(monkeypatch):
    be = _backend()
    # "auto" picks CUDA on validated GPU generations (sm_90) or with LORA_FUSED_CUDA_AUTO=1: force it here
    monkeypatch.setattr(type(be), "auto_device_types", (DEVICE,))
    monkeypatch.setattr(type(be), "auto_skip_reason", lambda self, device: None)
    x, W, _, A, B = _tensors(8, 32, 16, 4, torch.float32)
    reason = be.reject_reason(x, W, A, B)
    assert reason is not None and "float16 and bfloat16" in reason
    from lora_fused.backends import select_backend

    assert select_backend("auto", x, W, A, B).name != "cuda"
    xh, Wh, _, Ah, Bh = _tensors(8, 32, 16, 4, torch.float16)
    assert select_backend("auto", xh, Wh, Ah, Bh).name == "cuda"
    _, _, _, A_big, B_big = _tensors(8, 32, 16, 129, torch.float16)
    assert "rank" in be.reject_reason(xh, Wh, A_big, B_big)
    xo, Wo, _, Ao, Bo = _tensors(8, 36, 16, 4, torch.float16)
    assert "multiples of 8" in be.reject_reason(xo, Wo, Ao, Bo)
    assert select_backend("auto", xo, Wo, Ao, Bo).name != "cuda"
    if DEVICE == "cuda":
        assert "cpu" in be.reject_reason(xh.cpu(), Wh.cpu(), Ah.cpu(), Bh.cpu())
