"""Property tests (hypothesis): every available backend against the float64 reference.

Budget: ``LORA_FUSED_FUZZ_EXAMPLES`` examples per property (default 25 in CI; raise it for a longer run).
"""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lora_fused  # noqa: E402
from lora_fused.backends import get_backend_impl  # noqa: E402
from lora_fused.kernels.reference import dropout_keep_mask  # noqa: E402
from lora_fused.ops.lora_linear import _lora_linear_op  # noqa: E402
from lora_fused.ops.lora_qkv import normalize_targets, qkv_lora_slices  # noqa: E402

from conftest import assert_close_dtype, naive_lora, saved_tensor_bytes  # noqa: E402

EXAMPLES = int(os.environ.get("LORA_FUSED_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TARGETS = ["q", "k", "v", "qk", "qv", "kv", "qkv"]


def _backends():
    return [b for b in lora_fused.available_backends() if b != "cuda" or torch.cuda.is_available()]


@st.composite
def cases(draw):
    qkv = draw(st.booleans())
    K = draw(st.integers(1, 40))
    if qkv:
        splits = draw(st.tuples(*[st.integers(1, 12)] * 3))
        N = sum(splits)
        slices = qkv_lora_slices(splits, normalize_targets(draw(st.sampled_from(TARGETS))))
    else:
        N = draw(st.integers(1, 40))
        slices = [0, N]
    lead = draw(st.sampled_from([(0,), (1,), (7,), (2, 3), (2, 1, 3)]))
    return {
        "lead": lead, "K": K, "N": N, "r": draw(st.integers(1, 8)), "slices": slices,
        "p": draw(st.sampled_from([0.0, 0.0, 0.3])), "bias": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "transposed": draw(st.booleans()), "seed": draw(st.integers(0, 2**62)),
    }


def _tensors(c):
    g = torch.Generator().manual_seed(c["seed"] % 2**31)
    T, r = len(c["slices"]) // 2, c["r"]
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if c["transposed"]:  # a non-contiguous input with the same values
        x = mk(*c["lead"][:-1], c["K"], c["lead"][-1]).transpose(-1, -2)
    else:
        x = mk(*c["lead"], c["K"])
    W, A, B = mk(c["N"], c["K"]), mk(T * r, c["K"]), mk(sum(c["slices"][1::2]), r)
    b = mk(c["N"]) if c["bias"] else None
    return x, W, b, A, B


@pytest.mark.parametrize("backend", _backends())
@FUZZ
@given(c=cases())
def test_backend_matches_float64_reference(backend, c):
    dtype, p = c["dtype"], c["p"]
    x64, W64, b64, A64, B64 = _tensors(c)
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) if t is not None else None for t in (x64, W64, b64, A64, B64)]
    x, W, b, A, B = leaves
    assume(get_backend_impl(backend).reject_reason(x.reshape(-1, c["K"]), W, A, B) is None)  # e.g. float64 on Triton
    seed = torch.tensor([c["seed"]]) if p else None
    y, h = _lora_linear_op(x, W, b, A, B, seed, 0.75, p, c["slices"], backend)
    assert y.shape == (*c["lead"], c["N"]) and y.dtype == dtype
    gy = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * gy).sum().backward()

    keep = None
    if p and backend == "torch":
        rows = x64.reshape(-1, c["K"]).shape[0]
        keep = dropout_keep_mask(c["seed"], rows, c["K"], p, x.device).view(x64.shape)
    if p == 0 or keep is not None:
        ref = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x64, W64, b64, A64, B64)]
        yr = naive_lora(*ref[:3], ref[3], ref[4], 0.75, keep, p, c["slices"])
        (yr * gy).sum().backward()
        assert_close_dtype(y, yr, dtype)
        for got, want in zip(leaves, ref):
            if got is not None:  # autograd may leave None on an empty graph: that is a zero gradient
                want_grad = want.grad if want.grad is not None else torch.zeros_like(want)
                assert_close_dtype(got.grad, want_grad, dtype, "grad")
    else:  # another backend's mask: y must be the base plus s·h_t B_tᵀ for the h it returned
        h64 = h.detach().double()
        y_from_h = x64 @ W64.t() + (b64 if b64 is not None else 0)
        y_from_h = y_from_h.reshape(-1, c["N"])
        r, b_off = c["r"], 0
        for t in range(len(c["slices"]) // 2):
            off, n = c["slices"][2 * t], c["slices"][2 * t + 1]
            y_from_h[:, off:off + n] += 0.75 * h64[:, t * r:(t + 1) * r] @ B64[b_off:b_off + n].t()
            b_off += n
        assert_close_dtype(y.reshape(-1, c["N"]), y_from_h, dtype)


@FUZZ
@given(c=cases())
def test_saved_bytes_invariant(c):
    x64, W64, b64, A64, B64 = _tensors(c)
    x = x64.float().requires_grad_(True)
    params = [t.float().requires_grad_(t is not W64 and t is not b64) if t is not None else None for t in (W64, b64, A64, B64)]
    seed = torch.tensor([c["seed"]]) if c["p"] else None
    nbytes, (y, h) = saved_tensor_bytes(
        lambda: _lora_linear_op(x, *params, seed, 0.5, c["p"], c["slices"], "torch"), exclude=params
    )
    rows = h.shape[0]
    expected = x.untyped_storage().nbytes() + rows * h.shape[1] * 4
    # tiny tensors (one element) are skipped by the counter, like the seed
    expected -= x.untyped_storage().nbytes() if x.numel() <= 1 else 0
    expected -= rows * h.shape[1] * 4 if h.numel() <= 1 else 0
    assert nbytes == expected
