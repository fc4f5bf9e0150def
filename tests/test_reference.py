"""The torch backend (the reference) against the float64 naive math, gradcheck, dtypes and shapes."""

import sys

import pytest
import torch

import lora_fused
from lora_fused import LoRALinear
from lora_fused.kernels.reference import dropout_keep_mask
from lora_fused.ops.lora_linear import _lora_linear_op

from conftest import assert_close_dtype, naive_lora


def _params(K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64)
    return [t.to(dtype) if t is not None else None for t in (W, b, A, B)]


def _run_module(x, W, b, A, B, scaling, p, train=True):
    m = LoRALinear(W.shape[1], W.shape[0], bias=b is not None, r=A.shape[0], lora_alpha=scaling * A.shape[0],
                   lora_dropout=p, dtype=W.dtype)
    with torch.no_grad():
        m.weight.copy_(W), m.lora_A.copy_(A), m.lora_B.copy_(B)
        if b is not None:
            m.bias.copy_(b)
    m.train(train)
    return m


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,K,N,r", [((7, 37), 37, 100, 1), ((2, 5, 64), 64, 48, 8), ((2, 3, 4, 33), 33, 17, 4)])
def test_forward_and_grads_vs_float64(dtype, shape, K, N, r):
    W, b, A, B = _params(K, N, r, torch.float64)
    x64 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    m = _run_module(x64, W, b, A, B, 0.5, 0.0).to(dtype)
    for prm in (m.weight, m.bias):
        prm.requires_grad_(True)  # exact gradients for an unfrozen base too
    x = x64.detach().to(dtype).requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y, dtype=torch.float64)
    (y.double() * g).sum().backward()
    W64, b64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (m.weight, m.bias, m.lora_A, m.lora_B))
    xr = x.detach().double().requires_grad_(True)
    yr = naive_lora(xr, W64, b64, A64, B64, 0.5)
    (yr * g).sum().backward()
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    assert_close_dtype(y, yr, dtype)
    for name, got, want in [("x", x.grad, xr.grad), ("W", m.weight.grad, W64.grad), ("b", m.bias.grad, b64.grad),
                            ("A", m.lora_A.grad, A64.grad), ("B", m.lora_B.grad, B64.grad)]:
        assert_close_dtype(got, want, dtype, "grad", msg=f"grad {name} ({dtype})")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(p, bias):
    W, b, A, B = _params(13, 11, 3, torch.float64, bias=bias)
    tensors = [t.requires_grad_(True) for t in (W, A, B) + ((b,) if bias else ())]
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([1234])

    def f(x, W, A, B, *rest):
        return _lora_linear_op(x, W, rest[0] if rest else None, A, B, seed if p else None, 0.7, p, [0, 11], "torch")[0]

    assert torch.autograd.gradcheck(f, (x, *tensors))


def test_dropout_gradients_match_reference_built_from_the_same_mask():
    """Forward and backward use one mask: the mask regenerated from the seed, checked element by element."""
    p = 0.4
    W, b, A, B = _params(29, 23, 5, torch.float64)
    tensors = [t.requires_grad_(True) for t in (W, b, A, B)]
    x = torch.randn(9, 29, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([987654321])
    y, h = _lora_linear_op(x, *tensors[:1], tensors[1], tensors[2], tensors[3], seed, 1.5, p, [0, 23], "torch")
    keep = dropout_keep_mask(987654321, 9, 29, p, x.device)
    assert 0 < keep.sum() < keep.numel()
    x2 = x.detach().clone().requires_grad_(True)
    t2 = [t.detach().clone().requires_grad_(True) for t in tensors]
    yr = naive_lora(x2, t2[0], t2[1], t2[2], t2[3], 1.5, keep, p)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(h, (x2 * keep / (1 - p)) @ t2[2].t())
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    for got, want in zip([x.grad] + [t.grad for t in tensors], [x2.grad] + [t.grad for t in t2]):
        torch.testing.assert_close(got, want)


def test_manual_seed_reproduces_and_eval_is_deterministic():
    m = LoRALinear(32, 16, r=4, lora_dropout=0.5)
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(10, 32)
    torch.manual_seed(3)
    y1 = m(x)
    torch.manual_seed(3)
    y2 = m(x)
    y3 = m(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.equal(y2, y3)  # a fresh draw gives a fresh mask
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(m(x), naive_lora(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling))


def test_p0_and_eval_draw_no_seed():
    """Eval mode and p=0 skip all dropout work: the global generator is not advanced."""
    m = LoRALinear(8, 8, r=2, lora_dropout=0.2).eval()
    torch.manual_seed(0)
    m(torch.randn(3, 8))
    after_eval = torch.rand(1)
    torch.manual_seed(0)
    torch.randn(3, 8)
    assert torch.equal(after_eval, torch.rand(1))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_within_statistical_bounds(p):
    n = 200_000
    keep = dropout_keep_mask(42, 400, 500, p, torch.device("cpu"))
    frac = keep.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma
    assert not torch.equal(keep, dropout_keep_mask(43, 400, 500, p, torch.device("cpu")))
    assert torch.equal(keep, dropout_keep_mask(42, 400, 500, p, torch.device("cpu")))


def test_empty_batch_and_non_contiguous_input():
    m = LoRALinear(37, 100, r=1, lora_dropout=0.1)
    torch.nn.init.normal_(m.lora_B)
    x0 = torch.randn(0, 37, requires_grad=True)
    y0 = m(x0)
    y0.sum().backward()
    assert y0.shape == (0, 100) and x0.grad.shape == (0, 37)
    assert torch.count_nonzero(m.lora_A.grad) == 0
    m.eval()
    xt = torch.randn(37, 6).t()  # (6, 37), non-contiguous
    assert not xt.is_contiguous()
    torch.testing.assert_close(m(xt), m(xt.contiguous()))


def test_named_backend_context_and_auto():
    assert "torch" in lora_fused.available_backends()
    m = LoRALinear(8, 4, r=2)
    with lora_fused.use_backend("torch"):
        assert lora_fused.get_backend() == "torch"
        m(torch.randn(2, 8))
    assert lora_fused.get_backend() == "auto"


@pytest.mark.parametrize("path", ["padded", "strided"])
@pytest.mark.parametrize("slices", [[0, 4, 8, 4], [0, 4, 4, 4, 8, 4], [4, 4], [0, 6, 9, 3], [8, 4, 0, 4]],
                         ids=["qv", "qkv", "one-partial", "gqa-qv", "out-of-order"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_every_multi_target_path_vs_float64(path, slices, p, monkeypatch):
    """Several targets are applied through a zero-padded B (small problems) or strided batches / a loop (large
    ones); each path, forward and every gradient, against float64 with the kernel's mask."""
    from lora_fused.kernels.reference import lora_linear as ref_module

    monkeypatch.setattr(ref_module, "SMALL", 1 << 30 if path == "padded" else 0)
    T, r, M, K, N = len(slices) // 2, 3, 7, 10, 12
    gen = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, W, b, A, B = mk(M, K), mk(N, K), mk(N), mk(T * r, K), mk(sum(slices[1::2]), r)
    seed = 1234 if p else None
    y, h = ref_module.lora_linear_forward_ref(x, W, b, A, B, 0.5, p, seed, slices)
    g = mk(M, N)
    grads = ref_module.lora_linear_backward_ref(g, x, W, A, B, h, 0.5, p, seed, slices, [True] * 5)
    keep = dropout_keep_mask(seed, M, K, p, x.device) if p else None
    leaves = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]
    ref = naive_lora(*leaves, 0.5, keep, p, slices)
    torch.testing.assert_close(y, ref)
    (ref * g).sum().backward()
    for name, got, leaf in zip("xWbAB", grads, leaves):
        torch.testing.assert_close(got, leaf.grad, msg=f"grad {name} ({path})")


def _documented_u16(seed, rows, cols):
    """The 16-bit draws u of the CPU mask, derived independently of the kernels: masks of up to 65536 elements
    take the low 16 bits of consecutive 32-bit outputs (what randint over 65536 values returns); larger ones the
    16-bit chunks of consecutive full 64-bit outputs in memory order, top bit flipped (shifts, not views)."""
    gen = torch.Generator().manual_seed(seed)
    n = rows * cols
    if n <= 65536:
        return torch.randint(0, 65536, (rows, cols), generator=gen)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=gen)
    order = range(4) if sys.byteorder == "little" else range(3, -1, -1)
    chunks = torch.stack([(words >> (16 * j)) & 0xFFFF for j in order], dim=1).reshape(-1)[:n]
    return (chunks ^ 0x8000).view(rows, cols)


@pytest.mark.parametrize("shape", [(37, 53), (300, 301)])
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.97, "at a draw", "above a draw"])
def test_cpu_mask_follows_its_documented_formula(p, shape):
    """Element i is kept when its 16-bit draw u_i (_documented_u16: one form for small masks, one for large)
    reaches keep_threshold_u16(p); every dtype gets the same mask, and the boolean mask is the multiplier's
    support. "at a draw" puts the threshold exactly on one draw, which must be kept, "above a draw" one above it,
    which must drop it (an off-by-one in the comparison shows there)."""
    from lora_fused.kernels.reference.dropout import dropout_keep_multiplier, keep_threshold_u16

    (rows, cols), seed = shape, 2**40 + 12345
    u16 = _documented_u16(seed, rows, cols)
    kept_there = None
    if p in ("at a draw", "above a draw"):
        kept_there = p == "at a draw"
        p = (int(u16[3, 5]) + (0 if kept_there else 1)) / 65536
    want = u16 >= keep_threshold_u16(p)
    if kept_there is not None:
        assert bool(want[3, 5]) == kept_there
    assert abs(want.double().mean() - (1 - keep_threshold_u16(p) / 65536)) < 0.02
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        keep = dropout_keep_multiplier(seed, rows, cols, p, torch.device("cpu"), dtype)
        assert keep.dtype == dtype and keep.shape == (rows, cols)
        assert torch.equal(keep, want.to(dtype))
    assert torch.equal(dropout_keep_mask(seed, rows, cols, p, "cpu"), want)


def test_cpu_scratch_mask_is_the_mask_and_stays_bounded():
    """The kernels draw small CPU masks into a per-thread buffer (no allocation per call): the values must be
    those of dropout_keep_multiplier for every seed, size and dtype; a small float32/float64 mask reuses one
    buffer per (size, dtype) and thread, in and outside inference mode; larger or narrower masks are fresh
    tensors; the thread keeps a bounded number of buffers."""
    import threading

    from lora_fused.kernels.reference import dropout as D

    cpu = torch.device("cpu")
    for rows, cols in ((8, 16), (37, 53), (300, 300)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for seed, p in ((7, 0.1), (2**63 + 5, 0.5), (12345, 0.9)):
                want = D.dropout_keep_multiplier(seed, rows, cols, p, cpu, dtype)
                got = D.cpu_keep_multiplier(seed, torch.Size((rows, cols)), p, dtype)
                assert got.dtype == dtype and torch.equal(got, want), (rows, cols, dtype, seed)
        u16 = _documented_u16(99, rows, cols)
        for step, kept in ((0, 1), (1, 0)):  # the threshold on a draw (kept) and just above it (dropped)
            at_draw = (int(u16[3, 5]) + step) / 65536
            got = D.cpu_keep_multiplier(99, (rows, cols), at_draw, torch.float32)
            assert torch.equal(got, (u16 >= D.keep_threshold_u16(at_draw)).float()) and got[3, 5] == kept

    small, big = (37, 53), (300, 300)
    assert small[0] * small[1] <= D.SCRATCH_MAX < big[0] * big[1]
    D._local.keep_bufs.clear()
    with torch.inference_mode():  # made in inference mode, the buffer must still be writable outside it
        first = D.cpu_keep_multiplier(1, small, 0.1, torch.float32)
    again = D.cpu_keep_multiplier(2, torch.Size(small), 0.1, torch.float32)
    assert again.data_ptr() == first.data_ptr() and not again.is_inference()
    assert D.cpu_keep_multiplier(3, small, 0.1, torch.float32).data_ptr() == first.data_ptr()
    assert D.cpu_keep_multiplier(3, small, 0.1, torch.float64).data_ptr() != first.data_ptr()
    large = D.cpu_keep_multiplier(1, big, 0.1, torch.float32)
    assert torch.equal(D.cpu_keep_multiplier(1, big, 0.1, torch.float32), large)  # a fresh tensor: not overwritten
    assert D.cpu_keep_multiplier(2, small, 0.1, torch.bfloat16) is not D.cpu_keep_multiplier(2, small, 0.1,
                                                                                               torch.bfloat16)
    assert all(k[0] != big and k[1] is not torch.bfloat16 for k in D._local.keep_bufs)

    other = []
    thread = threading.Thread(target=lambda: other.append(D.cpu_keep_multiplier(1, small, 0.1, torch.float32)))
    thread.start(), thread.join()
    assert other[0].data_ptr() != first.data_ptr() and torch.equal(other[0], D.cpu_keep_multiplier(
        1, small, 0.1, torch.float32))

    for n in range(1, 40):
        D.cpu_keep_multiplier(n, (n, 3), 0.1, torch.float32)
    assert 0 < len(D._local.keep_bufs) <= D._SCRATCH_KEYS


def test_masks_of_concurrent_threads_stay_their_own():
    """Threads training layers of one shape at once (each drawing its masks into its own reused buffer): in every
    step backward must use forward's mask. The loss L = Σ G∘y is linear in x, A and B, so with the mask backward
    regenerates equal to forward's, <x.grad, x> = L - Σ G∘b and <A.grad, A> = <B.grad, B> = L - Σ G∘(x Wᵀ + b)."""
    import threading

    errors, steps = [], 40

    def train(seed):
        g = torch.Generator().manual_seed(seed)
        m = LoRALinear(48, 40, r=4, lora_dropout=0.4, dtype=torch.float64).train()
        torch.nn.init.normal_(m.lora_B, generator=g)
        for _ in range(steps):
            x = torch.randn(16, 48, dtype=torch.float64, generator=g, requires_grad=True)
            G = torch.randn(16, 40, dtype=torch.float64, generator=g)
            m.zero_grad()
            loss = (m(x) * G).sum()
            loss.backward()
            with torch.no_grad():
                base = (torch.nn.functional.linear(x, m.weight, m.bias) * G).sum()
                lora = loss - base
                checks = ((x.grad * x).sum(), loss - (G * m.bias).sum()), ((m.lora_A.grad * m.lora_A).sum(), lora), (
                    (m.lora_B.grad * m.lora_B).sum(), lora)
                for got, want in checks:
                    if not torch.isclose(got, want, rtol=1e-9, atol=1e-9):
                        errors.append((seed, float(got), float(want)))

    threads = [threading.Thread(target=train, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
