"""Proof, without a GPU, that the direct launches of the Triton kernels hand Triton's launcher exactly what
Triton's JIT hands it, and the host time per call of both paths.

    python -m lora_fused.kernels.triton.launch_check [--arch 90] [--calls 300]

The drivers (``triton_lora_forward`` / ``triton_lora_backward``) run on CPU tensors as on a GPU of ``arch``
(``aot_capture(record=False)``), with Triton's driver replaced by a stand-in: Triton compiles each kernel for that
architecture (its compiler and bundled ptxas, as ``aot_check``), and its JIT binds, specializes and looks the
kernel up as on the GPU, but the final launch records its arguments instead of running. Nothing is computed, so
outputs hold whatever memory they got; the scenarios cover every kernel of the package (the persistent TMA
kernels, and the pointer kernels that fp32 backward and misaligned strides take).

Each launch of the checked round runs twice: through Triton's JIT (the launcher's direct table switched off),
then directly (``_common._Launcher``). The check fails unless every direct launch finds its entry and passes the
same grid, stream, kernel function, kernel metadata and argument list as the JIT (tensors by identity, scalars by
type and value). The JIT also passes its launch metadata and hook chains; with no hook registered they call
nothing, and the direct launch passes None for them. The launchers' tables must hold no tensor (they would keep
it alive).

Timing: µs per call of the forward and backward drivers on a tiny layer, and of a whole ``LoRALinear`` training step
and eval forward on the Triton backend, through the JIT and directly: the Python host work only (on a GPU each
launch adds the driver's own cost). Exit status 1 when a check fails.
Needs Triton 3.6 or later; unset TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from typing import List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import _common
from .lora_linear import triton_lora_backward, triton_lora_forward

SMEM_LIMIT = {90: 232448, 80: 166912}
SMS = {90: 132, 80: 108}
STREAM = 0x5EED  # the stand-in's current stream handle

# (label, dtype, x shape, K, N, r, lora_slices, dropout_p, bias): tiny layers that take every kernel on sm_90.
SCENARIOS = [
    ("linear fp16 p=0.1 (persistent fwd+bwd)", torch.float16, (8, 32), 32, 48, 4, [0, 48], 0.1, True),
    ("qkv bf16 p=0, 3-D x (persistent fwd+bwd, 2 targets)", torch.bfloat16, (2, 5, 32), 32, 96, 4,
     [0, 32, 64, 32], 0.0, False),
    ("linear fp32 p=0.1 (persistent fwd, pointer bwd)", torch.float32, (8, 32), 32, 48, 4, [0, 48], 0.1, True),
    ("linear fp16 K=20 p=0.1 (pointer fwd+bwd: rows not 16-byte aligned)", torch.float16, (8, 20), 20, 24, 4,
     [0, 24], 0.1, True),
]


class _Launch:
    """One launch as the launcher received it."""

    __slots__ = ("grid", "stream", "function", "metadata", "via_jit", "args")

    def __init__(self, grid, stream, function, metadata, via_jit, args):
        self.grid, self.stream, self.function, self.metadata = grid, stream, function, metadata
        self.via_jit, self.args = via_jit, args

    def same_as(self, other: "_Launch") -> List[str]:
        """What differs from ``other`` (empty when the two launch the same)."""
        diffs = [name for name in ("grid", "stream", "function", "metadata")
                 if getattr(self, name) != getattr(other, name)]
        if len(self.args) != len(other.args):
            return diffs + [f"{len(self.args)} arguments against {len(other.args)}"]
        for i, (a, b) in enumerate(zip(self.args, other.args)):
            same = a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else (
                type(a) is type(b) and a == b)
            if not same:
                diffs.append(f"argument {i}: {a!r} against {b!r}")
        return diffs


LAUNCHES: List[_Launch] = []
_RECORDING = [False]  # launches are kept only during the compared round (not while timing)


class _StandInLauncher:
    """Takes the place of Triton's launcher for one compiled kernel: allocates the global scratch as Triton's
    launcher does (through the registered allocator), then records the launch."""

    def __init__(self, src, metadata):
        self.scratch = getattr(metadata, "global_scratch_size", 0)
        self.align = getattr(metadata, "global_scratch_align", 1)
        self.ctas = getattr(metadata, "num_ctas", 1)

    def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        if self.scratch > 0:
            from triton.runtime import _allocation

            _allocation._allocator.get()(gx * gy * gz * self.ctas * self.scratch, self.align, stream)
        if _RECORDING[0]:
            LAUNCHES.append(_Launch((gx, gy, gz), stream, function, metadata, enter_hook is not None, args))


class _StandInUtils:
    def __init__(self, arch: int):
        self.arch = arch

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads): the function handle names the kernel
        return 1, zlib.crc32(name.encode()), 64, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": SMEM_LIMIT[self.arch], "multiprocessor_count": SMS[self.arch],
                "max_num_regs": 65536, "warpSize": 32}


class _StandInDriver:
    """Triton's active driver for a GPU of ``arch`` that is not there."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _StandInUtils(arch)
        self.launcher_cls = _StandInLauncher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return STREAM

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_device_capability(self, device=0):
        return divmod(self.arch, 10)

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):  # the autotuner's timing: run once, report a constant
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1, dtype=torch.int32)

    def clear_cache(self, cache):
        pass


def _inputs(dtype, x_shape, K, N, r, lora_slices, bias: bool):
    gen = torch.Generator().manual_seed(0)
    T = len(lora_slices) // 2
    x = torch.randn(*x_shape, generator=gen).to(dtype)
    W = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    A = torch.randn(T * r, K, generator=gen).to(dtype)
    B = torch.randn(sum(lora_slices[1::2]), r, generator=gen).to(dtype)
    g = torch.randn(*x_shape[:-1], N, generator=gen).to(dtype)
    seed = torch.tensor([12345], dtype=torch.int64)
    return x, W, b, A, B, g, seed


def _step(inputs, p: float, lora_slices):
    x, W, b, A, B, g, seed = inputs
    seed = seed if p > 0 else None

    def forward():
        return triton_lora_forward(x, W, b, A, B, 2.0, p, seed, lora_slices)

    def backward(h):
        return triton_lora_backward(g, x, W, A, B, h, 2.0, p, seed, lora_slices, (True, False, False, True, True))

    return forward, backward


def _tensors_held() -> int:
    """Tensors referenced by any launcher's direct table or sighting record (fingerprints, grid arguments)."""
    count = 0
    for launcher in _common._LAUNCHERS.values():
        for fingerprint, entry in (launcher.direct or {}).items():
            count += sum(isinstance(v, torch.Tensor) for v in (*fingerprint, *entry[1], *entry[2].values()))
        for fingerprint in launcher.seen:
            count += sum(isinstance(v, torch.Tensor) for v in fingerprint)
    return count


def _paired_launch(original):
    """A ``_Launcher._launch`` that launches through the JIT and then directly, for comparison."""

    def launch(self, grid, *args, **kwargs):
        table, self.direct = self.direct, None
        try:
            original(self, grid, *args, **kwargs)
        finally:
            self.direct = table
        return original(self, grid, *args, **kwargs)

    return launch


def _per_call_us(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def _module_steps(calls: int) -> List[str]:
    """Report lines: µs per call of a whole ``LoRALinear`` fp16 8×16→16, r=4 (module, op layer, drivers) on the
    Triton backend, training step and eval forward, directly and through the JIT. The backend's device checks are
    lifted for the block (CPU tensors stand for the GPU's here) and its cached choices dropped before and after."""
    import lora_fused
    from lora_fused import backends
    from lora_fused.backends.triton_backend import TritonBackend

    checks = (TritonBackend.reject_reason, TritonBackend.unavailable_reason)
    TritonBackend.reject_reason = lambda self, *args: None
    TritonBackend.unavailable_reason = lambda self: None
    backends._selection_cache.clear()
    lines = ["", "`LoRALinear` fp16 8×16→16, r=4, on the Triton backend (module, op layer, drivers), µs per call:", "",
             "| p | fwd+bwd JIT | fwd+bwd direct | eval fwd JIT | eval fwd direct |", "|---|---|---|---|---|"]
    try:
        for p in (0.0, 0.1):
            torch.manual_seed(0)
            m = lora_fused.LoRALinear(16, 16, r=4, lora_alpha=8, lora_dropout=p).to(torch.float16).train()
            x = torch.randn(8, 16, dtype=torch.float16, requires_grad=True)
            g = torch.randn(8, 16, dtype=torch.float16)
            params = [t for t in m.parameters() if t.requires_grad]

            def step():
                x.grad = None
                for t in params:
                    t.grad = None
                m(x).backward(g)

            def forward():
                with torch.no_grad():
                    m(x)

            with lora_fused.use_backend("triton"):
                for _ in range(3):
                    step()
                    forward()
                with _common.jit_launches():
                    jit = (_per_call_us(step, calls), _per_call_us(forward, calls))
                direct = (_per_call_us(step, calls), _per_call_us(forward, calls))
            lines.append(f"| {p:g} | {jit[0]:.1f} | {direct[0]:.1f} | {jit[1]:.1f} | {direct[1]:.1f} |")
    finally:
        TritonBackend.reject_reason, TritonBackend.unavailable_reason = checks
        backends._selection_cache.clear()
    return lines


def run_check(arch: int = 90, calls: int = 300) -> Tuple[bool, List[str]]:
    """``(ok, report lines)``: the launch comparison and host times of every scenario."""
    if _common.interpreting():
        return False, ["launch_check: unset TRITON_INTERPRET (the interpreter does not compile kernels)"]
    from triton.runtime.driver import driver

    saved_autotune = os.environ.get("LORA_FUSED_TRITON_AUTOTUNE")
    os.environ["LORA_FUSED_TRITON_AUTOTUNE"] = "0"  # one config per kernel: fewer compiles, nothing to time
    previous = getattr(driver, "_active", None)  # None until a driver was needed (none can be made without a GPU)
    driver.set_active(_StandInDriver(arch))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host time of one thread, as the suite's host-overhead table measures it
    ok = True
    lines = [f"Triton {triton.__version__}, sm_{arch} (stand-in driver), one thread, best of 3 × {calls} calls per timing",
             "",
             "| scenario | kernels | launches checked | fwd µs JIT | fwd µs direct | bwd µs JIT | bwd µs direct |",
             "|---|---|---|---|---|---|---|"]
    try:
        with _common.aot_capture(arch, SMS[arch], SMEM_LIMIT[arch], record=False):
            for label, dtype, x_shape, K, N, r, sl, p, bias in SCENARIOS:
                forward, backward = _step(_inputs(dtype, x_shape, K, N, r, sl, bias), p, sl)
                for _ in range(2):  # compile and tune, then fill the direct tables (an entry's second sighting)
                    _, h = forward()
                    backward(h)
                LAUNCHES.clear()
                original = _common._Launcher._launch
                _common._Launcher._launch = _paired_launch(original)
                _RECORDING[0] = True
                try:
                    _, h = forward()
                    backward(h)
                finally:
                    _common._Launcher._launch = original
                    _RECORDING[0] = False
                problems = []
                if not LAUNCHES or len(LAUNCHES) % 2:
                    problems.append(f"{len(LAUNCHES)} launches recorded")
                pairs = list(zip(LAUNCHES[0::2], LAUNCHES[1::2]))
                for i, (jit, direct) in enumerate(pairs):
                    if not jit.via_jit:
                        problems.append(f"launch {i}: the reference did not go through the JIT")
                    if direct.via_jit:
                        problems.append(f"launch {i}: no direct entry (went through the JIT again)")
                    problems += [f"launch {i}: {d}" for d in direct.same_as(jit)]
                kernels = len({jit.function for jit, _ in pairs})
                with _common.jit_launches():
                    fwd_jit = _per_call_us(forward, calls)
                    bwd_jit = _per_call_us(lambda: backward(h), calls)
                fwd_direct = _per_call_us(forward, calls)
                bwd_direct = _per_call_us(lambda: backward(h), calls)
                lines.append(f"| {label} | {kernels} | {len(pairs)} | {fwd_jit:.1f} | {fwd_direct:.1f} | "
                             f"{bwd_jit:.1f} | {bwd_direct:.1f} |")
                if problems:
                    ok = False
                    lines += [f"  FAIL {label}: {msg}" for msg in problems]
            lines += _module_steps(calls)
    finally:
        driver._active = previous
        torch.set_num_threads(threads)
        if saved_autotune is None:
            os.environ.pop("LORA_FUSED_TRITON_AUTOTUNE", None)
        else:
            os.environ["LORA_FUSED_TRITON_AUTOTUNE"] = saved_autotune
        LAUNCHES.clear()
    held = _tensors_held()
    if held:
        ok = False
        lines.append(f"  FAIL the launchers' tables hold {held} tensor(s) (they must keep none alive)")
    lines.append("")
    lines.append("launch check: " + ("every direct launch matches the JIT's" if ok else "FAILED"))
    return ok, lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT))
    parser.add_argument("--calls", type=int, default=300, help="calls per timing (best of 3)")
    args = parser.parse_args(argv)
    ok, lines = run_check(args.arch, args.calls)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
