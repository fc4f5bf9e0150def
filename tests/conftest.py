"""Shared test helpers: the per-dtype tolerance table and a float64 reference built from an explicit mask."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. The flag must be set
# before triton is first imported, so it is set here, before anything else.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# One table of tolerances for comparing a backend's output/gradients with the float64 reference.
# (atol, rtol), applied by ``assert_close_dtype``; gradients accumulate over M so they get the "grad" row.
TOLERANCES = {
    torch.float64: {"out": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    torch.float32: {"out": (2e-4, 2e-4), "grad": (1e-3, 1e-3)},
    torch.float16: {"out": (2e-2, 2e-2), "grad": (5e-2, 3e-2)},
    torch.bfloat16: {"out": (1e-1, 5e-2), "grad": (2e-1, 8e-2)},
}


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "out", msg: str = ""):
    """Compare ``actual`` (any dtype) to a float64 ``expected`` with the table's tolerance for ``dtype``.

    Tolerances scale with the magnitude of ``expected`` (``atol * max(1, |expected|_max)``) so large
    reductions are judged relative to their size."""
    atol, rtol = TOLERANCES[dtype][kind]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=msg or None)


def naive_lora(x, weight, bias, lora_A, lora_B, scaling, keep=None, p=0.0, lora_slices=None):
    """Plain autograd-friendly math: ``y = x Wᵀ + b + s·((keep∘x/(1-p)) Aᵀ) Bᵀ`` per target slice.

    ``keep`` is an explicit ``x``-shaped bool mask (None: no dropout). ``lora_slices`` as in the op
    (default: one target over all outputs)."""
    n_out = weight.shape[0]
    lora_slices = list(lora_slices) if lora_slices is not None else [0, n_out]
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    r = lora_B.shape[1]
    parts, b_off = [], 0
    cols = torch.zeros(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    for t in range(len(lora_slices) // 2):
        off, n = lora_slices[2 * t], lora_slices[2 * t + 1]
        upd = scaling * (xd @ lora_A[t * r:(t + 1) * r].t()) @ lora_B[b_off:b_off + n].t()
        pad = torch.nn.functional.pad(upd, (off, n_out - off - n))
        parts.append(pad)
        b_off += n
    return y + sum(parts) if parts else y + cols


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts and ends with the default backend choice."""
    import lora_fused.backends as backends

    saved = backends._process_default
    yield
    backends._process_default = saved


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def saved_tensor_bytes(fn, exclude=()):
    """Bytes autograd saves for backward while ``fn()`` runs: unique storages seen by
    ``saved_tensors_hooks``, excluding the storages of ``exclude`` (parameters) and one-element tensors
    (seeds, scalars)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = {}

    def pack(t):
        if t.numel() > 1:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def assert_keep_statistics(keep: torch.Tensor, p: float, lanes: int = 8) -> None:
    """A keep mask of a Philox backend (8 16-bit decisions per draw, ``lane = col % lanes``): the kept fraction of
    the whole mask and of every lane is within 5σ of the quantized keep probability, and rows/columns differ."""
    import math

    from lora_fused.kernels.reference.dropout import keep_threshold_u16

    q = 1 - keep_threshold_u16(p) / 65536  # the quantized keep probability (|q - (1-p)| ≤ 7.7e-6)
    assert abs(q - (1 - p)) < 1e-5
    for sub in [keep] + [keep[:, lane::lanes] for lane in range(lanes)]:
        sigma = math.sqrt(q * (1 - q) / sub.numel())
        assert abs(sub.float().mean().item() - q) < 5 * sigma
    # rows and columns are not all alike (the counter uses both coordinates)
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, lanes])


def assert_neighbours_uncorrelated(keep: torch.Tensor) -> None:
    """Horizontally and vertically adjacent decisions of a p=0.5 mask are uncorrelated (within 5σ)."""
    import math

    centred = keep.float() - 0.5
    n = centred[:, :-1].numel()
    for a, b in ((centred[:, :-1], centred[:, 1:]), (centred[:-1], centred[1:])):
        assert abs((a * b).mean().item() / 0.25) < 5 / math.sqrt(n)


def assert_compiled_train_matches_eager(m, x, seed=5, backend="auto"):
    """``torch.compile(m, fullgraph=True, backend="aot_eager")`` in train mode (dropout on) gives the same output
    and gradients of ``x``, ``lora_A``, ``lora_B`` as eager ``m``, with the lora_fused ``backend`` chosen: aot_eager
    runs the same seed draw as eager, so the masks match."""
    import lora_fused

    m.train()
    x = x.detach().requires_grad_(True)
    runs = []
    with lora_fused.use_backend(backend):
        for module in (torch.compile(m, fullgraph=True, backend="aot_eager"), m):
            torch.manual_seed(seed)
            y = module(x)
            y.pow(2).sum().backward()
            runs.append((y.detach(), x.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone()))
            x.grad = m.lora_A.grad = m.lora_B.grad = None
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def pytest_runtest_logreport(report):
    """With LORA_FUSED_PRINT_FAILURES=1 a failure's traceback is printed the moment the test fails: a run cut
    short by a time limit (a lent GPU's time-boxed check) still shows why each failed test failed."""
    if report.failed and os.environ.get("LORA_FUSED_PRINT_FAILURES", "0") == "1":
        import sys

        sys.stderr.write(f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()
