"""The launch path of the Triton kernels: after a key's first (tuning) launch, later launches of that key skip the
autotuner and run its chosen config directly, with the same results; a new key tunes again. On a GPU a repeated
call launches its compiled kernel directly: when (second sighting), with what (the JIT's argument list, this
call's tensors), and when not (another scalar, dtype, alignment or layout; a registered launch hook), on stand-ins
for the autotuner, the JIT and the driver (``launch_check`` proves the real kernels' arguments in CI)."""

import pytest
import torch

triton = pytest.importorskip("triton")
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


# -- direct launches (the GPU path), driven by a stand-in autotuner, JIT and driver --------------------------------

class _FakeKernel:
    """A compiled kernel as the launcher uses it: ``run`` (Triton's launcher), ``function``, ``packed_metadata``."""

    function, packed_metadata = 7, (4, 1, 0)

    def __init__(self):
        self.launches = []

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave, *args):
        self.launches.append(((gx, gy, gz), stream, args, enter, leave))


class _FakeJIT:
    """``kernel(a_ptr, b_ptr, n, scale, FLAG, BLOCK)``: the JIT launches through the kernel's launcher with the
    full argument list, as Triton's does."""

    arg_names = ["a_ptr", "b_ptr", "n", "scale", "FLAG", "BLOCK"]

    def __init__(self, kernel):
        import inspect

        self.kernel, self.calls = kernel, 0
        self.signature = inspect.signature(lambda a_ptr, b_ptr, n, scale, FLAG, BLOCK: None)

    def run(self, *args, grid, warmup, **kwargs):
        self.calls += 1
        full = [*args] + [kwargs[name] for name in self.arg_names[len(args):]]
        g = grid(dict(zip(self.arg_names, full)))
        self.kernel.run(*g, *(1,) * (3 - len(g)), 0x5EED, 7, (4, 1, 0), {}, "hook", "hook", *full)
        return self.kernel


class _FakeTuner:
    def __init__(self, jit):
        self.fn, self.best_config = jit, triton.Config({"BLOCK": 32})

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn.run(*args, grid=grid, warmup=False, **kwargs, BLOCK=32)


@pytest.fixture
def direct_launcher():
    from triton.runtime.driver import driver

    from lora_fused.kernels.triton.launch_check import _StandInDriver

    kernel = _FakeKernel()
    jit = _FakeJIT(kernel)
    previous = getattr(driver, "_active", None)
    driver.set_active(_StandInDriver(90))
    try:
        yield _common._Launcher(_FakeTuner(jit), ["n"], direct=True), jit, kernel
    finally:
        driver._active = previous


def _grid(meta):
    return (-(-meta["n"] // meta["BLOCK"]),)


def test_a_call_launches_directly_from_its_third_sighting(direct_launcher):
    launcher, jit, kernel = direct_launcher
    a, b = torch.zeros(64), torch.zeros(64)
    for _ in range(4):
        launcher[_grid](a, b, 100, 0.5, FLAG=True)
    assert jit.calls == 2  # seen once, recorded on the second sighting, direct from then on
    (through_jit, _, jit_args, *jit_hooks), *_, (direct, stream, direct_args, *hooks) = kernel.launches
    assert direct == through_jit == (4, 1, 1) and stream == 0x5EED
    assert direct_args == jit_args and hooks == [None, None] and jit_hooks == ["hook", "hook"]
    assert all(x is y for x, y in zip(direct_args[:2], (a, b)))  # this call's tensors, not the recorded call's
    launcher[_grid](a, b, 100, 0.25, FLAG=True)  # another scalar value: the JIT again
    launcher[_grid](a, b, 100, 0.5, FLAG=False)  # another keyword value: the JIT again
    assert jit.calls == 4


def test_alignment_dtype_and_layout_decide_the_entry(direct_launcher):
    launcher, jit, kernel = direct_launcher
    buf = torch.zeros(80)
    a, b = buf[:64], torch.zeros(64)
    for _ in range(3):
        launcher[_grid](a, b, 100, 0.5, FLAG=True)
    assert jit.calls == 2
    launcher[_grid](buf[1:65], b, 100, 0.5, FLAG=True)  # 4 bytes off a 16-byte boundary: another specialization
    launcher[_grid](a.double(), b, 100, 0.5, FLAG=True)  # another dtype
    assert jit.calls == 4
    for _ in range(3):  # a tensor where a scalar stood: never recorded, so no table holds a tensor
        launcher[_grid](a, b, torch.tensor(100), 0.5, FLAG=True)
    assert jit.calls == 7
    held = [v for fp in (*launcher.direct, *launcher.seen) for v in fp if isinstance(v, torch.Tensor)]
    assert not held


def test_a_registered_launch_hook_gets_the_jit_path(direct_launcher):
    from triton import knobs

    launcher, jit, kernel = direct_launcher
    a, b = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        launcher[_grid](a, b, 100, 0.5, FLAG=True)
    assert jit.calls == 2
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher[_grid](a, b, 100, 0.5, FLAG=True)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert jit.calls == 3
    launcher[_grid](a, b, 100, 0.5, FLAG=True)
    assert jit.calls == 3


def test_direct_tables_are_bounded(direct_launcher, monkeypatch):
    launcher, jit, kernel = direct_launcher
    monkeypatch.setattr(_common, "DIRECT_MAX", 4)
    a, b = torch.zeros(64), torch.zeros(64)
    for n in range(10):
        for _ in range(2):
            launcher[_grid](a, b, 100 + n, 0.5, FLAG=True)
        assert len(launcher.direct) <= 4 and len(launcher.seen) <= 4
    assert jit.calls == 20 and launcher.direct
