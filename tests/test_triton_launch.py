"""The launch path of the Triton kernels: after a key's first (tuning) launch, later launches of that key skip the
autotuner and run its chosen config directly, with the same results; a new key tunes again."""

import pytest
import torch

pytest.importorskip("triton")
from lora_fused.kernels.triton import _common, lora_fwd_persistent  # noqa: E402
from lora_fused.kernels.triton.lora_linear import triton_lora_forward  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in __import__("lora_fused").available_backends(), reason="Triton backend unavailable here"
)


def test_next_pow2_and_cdiv():
    assert [_common.next_pow2(n, lo=1) for n in (0, 1, 2, 3, 4, 5, 16, 17, 1000)] == [1, 1, 2, 4, 4, 8, 16, 32, 1024]
    assert _common.next_pow2(3) == 16 and _common.next_pow2(40) == 64
    assert [_common.cdiv(a, 16) for a in (0, 1, 16, 17, 33)] == [0, 1, 1, 2, 3]


def test_tuned_key_launches_skip_the_autotuner(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(24, 32, generator=gen), torch.randn(16, 32, generator=gen), torch.randn(16, generator=gen)
    A, B = torch.randn(4, 32, generator=gen), torch.randn(16, 4, generator=gen)
    kernel = lora_fwd_persistent._KERNEL
    launcher = kernel(x.device)
    tuner = launcher.tuner
    through = []
    real = type(tuner).run
    monkeypatch.setattr(type(tuner), "run", lambda self, *a, **k: through.append(1) or real(self, *a, **k))
    launcher.best.clear()
    first = triton_lora_forward(x, W, b, A, B, 0.5, 0.0, None, [0, 16])
    assert len(through) == 1 and len(launcher.best) == 1
    again = triton_lora_forward(x, W, b, A, B, 0.5, 0.0, None, [0, 16])
    assert len(through) == 1  # the tuned key launched without the autotuner
    for a, b_ in zip(first, again):
        assert torch.equal(a, b_)
    half = [t.half() for t in (x, W, b, A, B)]
    triton_lora_forward(*half, 0.5, 0.0, None, [0, 16])  # another dtype: another key, tuned once
    assert len(through) == 2 and len(launcher.best) == 2
    assert kernel(x.device) is launcher  # one launcher per autotuner
