"""The eager route of the op (no torch.library dispatch when nothing traces the call): it is taken when it
should be and only then, it computes exactly what the registered op computes, the backend choice it caches
follows use_backend/set_backend/LORA_FUSED_BACKEND, and the torch backend's on-device (hashed) mask."""

import importlib
import math
import threading
from unittest import mock

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear, LoRAQKV
from lora_fused.backends import get_backend_impl
from lora_fused.kernels.reference import hashed_keep_mask, lora_linear_backward_ref, lora_linear_forward_ref

from conftest import assert_close_dtype, assert_neighbours_uncorrelated, naive_lora, requires_cuda

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


def test_host_seed_is_the_value_draw_seed_draws(monkeypatch):
    """The CPU eager route's int seed: for the same generator state, the value of draw_seed's tensor, the rank
    mixed in alike; in a fresh thread (its own buffer) and under inference mode too."""
    x = torch.randn(2, 3)
    for seed in (0, 5, 2**40 + 3):
        torch.manual_seed(seed)
        want = [int(op_module.draw_seed(x).item()) for _ in range(4)]
        torch.manual_seed(seed)
        got = [op_module.draw_host_seed() for _ in range(4)]
        assert got == want and len(set(got)) == 4 and all(0 <= s < 2**62 for s in got)
    out = []
    torch.manual_seed(1)
    thread = threading.Thread(target=lambda: out.append(op_module.draw_host_seed()))
    thread.start()
    thread.join()
    torch.manual_seed(1)
    assert out == [int(op_module.draw_seed(x).item())]
    torch.manual_seed(1)
    with torch.inference_mode():
        assert out == [op_module.draw_host_seed()]
    out = []  # a thread's first draw under another default device: still the CPU generator's
    torch.manual_seed(4)

    def on_meta():
        with torch.device("meta"):
            out.append(op_module.draw_host_seed())

    thread = threading.Thread(target=on_meta)
    thread.start()
    thread.join()
    torch.manual_seed(4)
    assert out == [int(op_module.draw_seed(x).item())]
    # under torch.distributed: the same XOR of the rank's mix into the draw
    monkeypatch.setattr(op_module, "_DIST_AVAILABLE", True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(op_module, "_distributed_rank", lambda: 3)
    torch.manual_seed(2)
    mixed = op_module.draw_host_seed()
    torch.manual_seed(2)
    assert mixed == int(op_module.draw_seed(x).item())
    torch.manual_seed(2)
    assert mixed != int(torch.randint(2**62, (1,)).item()) and 0 <= mixed < 2**62


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
    assert a.dtype == torch.bool and a.shape == (40, 70)
    assert torch.equal(a, hashed_keep_mask(s.clone(), 40, 70, 0.3))
    assert torch.equal(a, hashed_keep_mask(s.reshape(()), 40, 70, 0.3))
    assert not torch.equal(a, hashed_keep_mask(s + 1, 40, 70, 0.3))
    assert not torch.equal(a, hashed_keep_mask(s + 2**40, 40, 70, 0.3))  # the high 32 bits matter
    assert torch.equal(hashed_keep_mask(s, 20, 70, 0.3), a[:20])  # a prefix of rows is a prefix
    assert torch.equal(hashed_keep_mask(s, 40, 9, 0.3), a[:, :9])  # and of columns: it depends on (row, col)
    assert torch.equal(hashed_keep_mask(s, 90, 5, 0.3)[:40], a[:, :5])


_M32, _M64 = 2**32 - 1, 2**64 - 1


def _fold_multiply_py(x: int, muls) -> int:
    for mul in muls:
        x = ((x ^ (x >> 16)) * mul) & _M32
    return x


def _hashed_u16_py(seed: int, row: int, col: int) -> int:
    """The 16-bit draw of element (row, col), as hashed_keep_mask's docstring states it, in Python integers."""
    s_lo, s_hi = seed & _M32, seed >> 32

    def x(i):
        return _fold_multiply_py(((s_lo + 0x9E3779B9 * i) & _M32) ^ s_hi, (0x7FEB352D, 0x846CA68B))

    v = _fold_multiply_py((x(3 * row) + (x(3 * row + 1) | 1) * x(3 * col + 2)) & _M32, (0x85EBCA6B, 0xC2B2AE35))
    return ((v + 2**31) & _M32) >> 16


@pytest.mark.parametrize("seed", [0x1234_5678_9ABC_DEF, 2**62 - 1, -5, 0])
def test_hashed_mask_follows_its_documented_formula(seed):
    """Element by element against the formula in Python integers (seed read as 64-bit two's complement)."""
    from lora_fused.kernels.reference.dropout import keep_threshold_u16

    rows, cols = 6, 9
    for p in (0.4, 0.03, 0.97):
        keep = hashed_keep_mask(torch.tensor([seed]), rows, cols, p)
        t = keep_threshold_u16(p)
        want = [[_hashed_u16_py(seed & _M64, r, c) >= t for c in range(cols)] for r in range(rows)]
        assert keep.tolist() == want, p


def _pairwise_max_z(keep: torch.Tensor) -> float:
    """The largest |correlation|·sqrt(cols) over all pairs of distinct rows of a 0/1 matrix (≈ N(0, 1) each)."""
    z = keep.double()
    z = z - z.mean(1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True)
    c = (z @ z.t()).fill_diagonal_(0)
    return c.abs().max().item() * math.sqrt(keep.shape[1])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_hashed_mask_statistics(p):
    """Keep rate overall and per row/column, and no correlation: neighbours (rows and columns), every pair of rows
    and every pair of columns, the corners of 2x2 squares, and the masks of seeds s+1 and s+2**32 against s's."""
    from lora_fused.kernels.reference.dropout import keep_threshold_u16

    seed = torch.tensor([2024])
    keep = hashed_keep_mask(seed, 300, 400, p)
    q = 1 - keep_threshold_u16(p) / 65536
    sigma = math.sqrt(q * (1 - q) / keep.numel())
    assert abs(keep.float().mean().item() - q) < 5 * sigma
    for sub in (keep[:, :7], keep[:9]):  # no stuck rows or columns
        assert abs(sub.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / sub.numel())
    # 44850 row pairs, 79800 column pairs. Random masks give a maximum below 4.9 at p=0.5 and up to 6.5 at p=0.1
    # (skewed draws); rows or columns sharing their draws give about 17 and 20.
    limit = 6.0 if p == 0.5 else 8.0
    assert _pairwise_max_z(keep) < limit and _pairwise_max_z(keep.t()) < limit
    d = (keep.double() - q) / math.sqrt(q * (1 - q))  # zero mean, unit variance under independence
    squares = d[:-1, :-1] * d[1:, :-1] * d[:-1, 1:] * d[1:, 1:]
    assert abs(squares.mean().item()) * math.sqrt(squares.numel()) < 5 * squares.std().item()
    for other in (seed + 1, seed + 2**32):
        e = (hashed_keep_mask(other, 300, 400, p).double() - q) / math.sqrt(q * (1 - q))
        for prod in (d * e, d[1:] * e[:-1], d[:, 1:] * e[:, :-1]):  # same place, and shifted by a row/column
            assert abs(prod.mean().item()) * math.sqrt(prod.numel()) < 5, other
    if p == 0.5:
        assert_neighbours_uncorrelated(keep)


def test_hashed_keys_are_distinct_and_look_random():
    """No two of 65536 row keys P (or column keys Q) are equal (random 32-bit keys would collide about once: two
    rows alike), R is odd, and every bit of the keys is balanced and uncorrelated with the same bit 1, 2, 3, 4 and
    8 keys later (the counter alone, or one round, gives periodic bits)."""
    from lora_fused.kernels.reference.dropout import hashed_keys

    for seed in (2024, 7, 2**61 + 12345):
        P, R, Q = hashed_keys(torch.tensor([seed]), 2**16, 2**16)
        assert torch.unique(P).numel() == P.numel() and torch.unique(Q).numel() == Q.numel()
        assert bool((R & 1).all())
        for keys, low in ((P, 0), (R, 1), (Q, 0)):
            bits = ((keys[:4096, None] >> torch.arange(low, 32, dtype=torch.int32)) & 1).double() * 2 - 1  # ±1
            n = bits.shape[0]
            assert bits.mean(0).abs().max().item() * math.sqrt(n) < 5
            for lag in (1, 2, 3, 4, 8):
                assert (bits[:-lag] * bits[lag:]).mean(0).abs().max().item() * math.sqrt(n) < 5, lag


def _correlations_with_first(keep: torch.Tensor) -> torch.Tensor:
    """Correlation of every row of a 0/1 matrix after the first with the first row."""
    z = keep.double()
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    return (z[1:] * z[0]).mean(1)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_hashed_mask_mixing_decorrelates_structured_key_pairs(p):
    """Columns whose keys Q differ simply (by 1, -1, 3, 2**16, 2**31, m·2**24, m·2**28, or XOR 0x80008000), and
    rows whose keys P, R do, draw uncorrelated masks over 8192 random keys of the other side. One fold-multiply
    round fails (-0.58 for Q + 2**31: every row then differs by exactly 2**31); so does a sum P + Q instead of
    P + R·Q (0.18 for P XOR 0x80008000: a fixed difference that the first fold maps to the top bit)."""
    from lora_fused.kernels.reference.dropout import keep_from_keys

    def i32(values):
        return torch.tensor([(v + 2**31) % 2**32 - 2**31 for v in values], dtype=torch.int32)

    gen = torch.Generator().manual_seed(11)
    n, m, base = 8192, 0x5A3, 0x2545F491
    related = [base + d for d in (0, 1, -1, 3, 2**16, 2**31, m << 24, m << 28)] + [base ^ 0x80008000]
    P, R = (torch.randint(-(2**31), 2**31, (n, 1), generator=gen, dtype=torch.int32) for _ in range(2))
    keep = keep_from_keys(P, R | 1, i32(related), p)  # (n, 9): columns with related keys
    limit = 5 / math.sqrt(n)
    assert _correlations_with_first(keep.t()).abs().max().item() < limit
    Q = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int32)
    rows_P = i32(related)[:, None]
    rows_R = i32([(k * 2 + 1) for k in related])[:, None]  # R odd, related alike
    assert _correlations_with_first(keep_from_keys(rows_P, rows_R, Q, p)).abs().max().item() < limit


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operator called and the bytes of every storage an operator returns that none of its inputs
    had (the tensors the call allocates)."""

    def __init__(self):
        super().__init__()
        self.ops, self.allocated = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        had = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        self.ops.append(func)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in had:
                self.allocated.append(t.untyped_storage().nbytes())
        return out


def test_hashed_mask_issues_few_operators_and_allocates_one_int32_grid():
    """Fourteen operators that compute (plus views), no host read of the seed, and the only allocations of the size
    of the mask are one 4-byte buffer and the boolean result (the rest: two int32 vectors of 3·max(rows, cols))."""
    rows, cols, seed = 64, 96, torch.tensor([7])
    with _Allocations() as record:
        keep = hashed_keep_mask(seed, rows, cols, 0.25)
    names = [f.overloadpacket.__name__ for f in record.ops]
    computing = [n for f, n in zip(record.ops, names) if not f.is_view and n != "detach"]
    assert len(computing) <= 14, computing
    assert len(names) <= 31, names
    assert not {"_local_scalar_dense", "item", "_to_copy", "copy_"} & set(names), names
    big = [b for b in record.allocated if b >= rows * cols]
    assert sorted(big) == [rows * cols, 4 * rows * cols], record.allocated
    assert sum(record.allocated) - sum(big) <= 2 * 4 * 3 * max(rows, cols), record.allocated  # counter, keys
    assert keep.dtype == torch.bool


@pytest.mark.gpu
@requires_cuda
def test_hashed_mask_is_the_same_on_cuda_and_cpu():
    """The CPU tests are the oracle for the GPU: one seed gives the same mask bit for bit on both."""
    for seed, shape in ((2024, (300, 400)), (2**62 - 3, (7, 1000)), (-9, (1000, 7))):
        s = torch.tensor([seed])
        for p in (0.1, 0.5):
            cpu = hashed_keep_mask(s, *shape, p)
            assert torch.equal(hashed_keep_mask(s.cuda(), *shape, p).cpu(), cpu)


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
