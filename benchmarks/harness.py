"""Shared machinery of the benchmark suite: shapes, dtypes, interleaved timing, memory, environment.

Timing rules (``docs/benchmarks.md``): every method of one comparison runs in the
same process, round-robin within each repetition (the order is reshuffled every repetition, from a fixed
seed), so machine noise hits all of them alike. Warm-up first. CUDA: device events around each call, the L2
cache flushed (a 256 MiB write) before each timed call; CPU: ``time.perf_counter``. We report the median and
the inter-quartile range (IQR = q75 - q25) in milliseconds.

Memory: ``saved_bytes`` counts the bytes autograd keeps for backward (``saved_tensors_hooks``), one count per
distinct storage, parameters and buffers excluded; on CUDA ``peak_bytes`` is the peak allocated memory of one
forward+backward above what was allocated before it.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import os
import platform
import random
import re
import statistics
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """One GEMM problem: ``x`` (M, K) times a frozen ``W`` (N, K)ᵀ. ``qkv``: N is a fused q|k|v projection."""

    name: str
    M: int
    K: int
    N: int
    qkv: bool = False
    note: str = ""

    @property
    def mkn(self) -> str:
        return f"{self.M}x{self.K}x{self.N}"


PRESETS: Dict[str, Shape] = {
    "vit_b_qkv": Shape("vit_b_qkv", 8 * 197, 768, 2304, True, "ViT-B/16 qkv: batch 8 x 197 tokens, 768->2304"),
    "sam_h_qkv": Shape("sam_h_qkv", 64 * 64, 1280, 3840, True, "SAM ViT-H qkv: one 1024px image = 64x64 tokens, 1280->3840"),
    "llm_4k": Shape("llm_4k", 4096, 4096, 4096, False, "LLM projection: 4096 tokens, 4096->4096"),
    "llm_16k": Shape("llm_16k", 16384, 4096, 4096, False, "LLM projection: 16384 tokens, 4096->4096"),
    "tiny": Shape("tiny", 64, 32, 48, True, "tiny smoke-test shape"),
}

# Named groups usable in --shapes.
SHAPE_GROUPS: Dict[str, List[str]] = {
    # CPU default: one realistic shape, so the default run ends in a few minutes on 2 cores.
    "cpu": ["vit_b_qkv"],
    "cuda": ["vit_b_qkv", "sam_h_qkv", "llm_4k", "llm_16k"],
    "headline": ["llm_16k", "vit_b_qkv", "sam_h_qkv"],
    "all": ["vit_b_qkv", "sam_h_qkv", "llm_4k", "llm_16k"],
}

_MKN = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def parse_shapes(spec: str) -> List[Shape]:
    """Comma-separated presets, group names or ``MxKxN`` (a custom shape is qkv-capable when N % 3 == 0)."""
    out: List[Shape] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        key = item.lower()
        if key in SHAPE_GROUPS:
            out.extend(PRESETS[n] for n in SHAPE_GROUPS[key])
        elif key in PRESETS:
            out.append(PRESETS[key])
        else:
            m = _MKN.match(key)
            if not m:
                raise ValueError(
                    f"unknown shape {item!r}: use MxKxN or one of {', '.join(list(PRESETS) + list(SHAPE_GROUPS))}"
                )
            M, K, N = (int(v) for v in m.groups())
            if min(M, K, N) < 1:
                raise ValueError(f"shape {item!r} has a zero dimension")
            out.append(Shape(key, M, K, N, qkv=(N % 3 == 0), note="custom"))
    seen, unique = set(), []
    for s in out:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    if not unique:
        raise ValueError("no shapes given")
    return unique


DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16, fp64") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------- backends
def runnable_backends(device: str, dtype: torch.dtype, requested: Optional[Sequence[str]] = None):
    """``(names, notes)``: lora_fused backends that run ``dtype`` tensors on ``device``, found at run time.

    Without ``requested``, a backend counts when ``available_backends()`` lists it, ``"auto"`` would pick it
    on this device type (so the Triton interpreter is not benchmarked as a CPU backend) and it accepts a
    sample of the tensors. A backend named in ``requested`` is tried whatever its device preference.
    ``notes`` says why each left-out backend is left out.
    """
    import lora_fused
    from lora_fused import backends as B

    available = lora_fused.available_backends()
    order = list(getattr(B, "BACKEND_ORDER", available))
    names = list(requested) if requested else order
    picked, notes = [], []
    x = torch.zeros(16, 32, device=device, dtype=dtype)
    w = torch.zeros(48, 32, device=device, dtype=dtype)
    a = torch.zeros(4, 32, device=device, dtype=dtype)
    b = torch.zeros(48, 4, device=device, dtype=dtype)
    for name in names:
        if name not in order:
            raise ValueError(f"unknown backend {name!r}; lora_fused has {', '.join(order)}")
        if name not in available:
            reason = B.unavailable_reason(name) if hasattr(B, "unavailable_reason") else "not available"
            notes.append(f"backend {name}: skipped ({reason})")
            continue
        impl = B.get_backend_impl(name) if hasattr(B, "get_backend_impl") else None
        devices = getattr(impl, "auto_device_types", None)
        if not requested and devices is not None and torch.device(device).type not in devices:
            notes.append(f"backend {name}: skipped on {device} (not a speed backend there; runs on {', '.join(devices)})")
            continue
        reason = impl.reject_reason(x, w, a, b) if impl is not None else None
        if reason is not None:
            notes.append(f"backend {name}: skipped ({reason})")
            continue
        picked.append(name)
    return picked, notes


# ----------------------------------------------------------------------------------------------- timing
def _quantile(sorted_vals: List[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
    """Median, IQR (q75 - q25), min and count of a list of times in ms."""
    vals = sorted(times_ms)
    return {
        "median_ms": statistics.median(vals),
        "iqr_ms": _quantile(vals, 0.75) - _quantile(vals, 0.25),
        "min_ms": vals[0],
        "reps": len(vals),
    }


class _Flusher:
    """Writes a buffer larger than the GPU's L2 so every timed call starts from a cold cache."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buf.zero_()


def time_interleaved(
    fns: Dict[str, Callable[[], None]],
    device: str,
    reps: int,
    warmup: int,
    seed: int = 0,
    on_rep: Optional[Callable[[], None]] = None,
) -> Dict[str, List[float]]:
    """Times every callable ``reps`` times, round-robin in a reshuffled order each repetition; ms per call."""
    names = list(fns)
    is_cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for name in names:
            fns[name]()
    if is_cuda:
        torch.cuda.synchronize()
    flush = _Flusher(torch.device(device)) if is_cuda else None
    rng = random.Random(seed)
    times: Dict[str, List[float]] = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        import time

        for _ in range(reps):
            order = names[:]
            rng.shuffle(order)
            events = []
            for name in order:
                if is_cuda:
                    flush()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fns[name]()
                    end.record()
                    events.append((name, start, end))
                else:
                    t0 = time.perf_counter()
                    fns[name]()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            if is_cuda:
                torch.cuda.synchronize()
                for name, start, end in events:
                    times[name].append(start.elapsed_time(end))
            if on_rep is not None:
                on_rep()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


# ----------------------------------------------------------------------------------------------- memory
def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


def storage_keys(tensors: Iterable[torch.Tensor]) -> set:
    """Storage identities of ``tensors`` (e.g. a module's parameters, to exclude them from saved bytes)."""
    return {_storage_key(t)[0] for t in tensors if t is not None}


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs: distinct storages, minus ``exclude``'s.

    Each saved tensor is counted by its whole storage, once, however many views of it are saved. Tensors in
    ``exclude`` (pass the parameters and buffers) and any view of their storages are not counted. Zero-size
    storages count 0. ``forward``'s result is kept alive until the count is done (then dropped).
    """
    skip = storage_keys(exclude)
    seen: Dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if key not in skip and key[2] != 0:
            seen.setdefault(key, nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    total = sum(seen.values())
    del out
    return total


def peak_bytes(step: Callable[[], None], device: str) -> Optional[int]:
    """CUDA only: peak allocated memory while ``step()`` runs, above what was allocated before it."""
    if torch.device(device).type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


# ----------------------------------------------------------------------------------------------- environment
def _module_version(name: str) -> str:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception:  # noqa: BLE001
        return "absent"


def git_commit() -> str:
    """Short commit of the repository, with ``-dirty`` when tracked files differ from it. Outside a git checkout
    (e.g. a copied working tree on a lent GPU machine) the ``LORA_FUSED_COMMIT`` environment variable, else
    ``unknown``."""
    env = os.environ.get("LORA_FUSED_COMMIT", "").strip()
    if env:
        return env
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev.index or 0)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_tag(device: str) -> str:
    """A file-name-safe name of the device: ``cpu`` or the GPU's name (``nvidia-h100-80gb-hbm3``)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev.index or 0).lower()).strip("-")


def environment(device: str, dtype: torch.dtype) -> Dict[str, str]:
    """The columns every result row carries: device, dtype, versions, commit, date."""
    try:
        import lora_fused

        lf = lora_fused.__version__
    except Exception:  # noqa: BLE001
        lf = "absent"
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "peft": _module_version("peft"),
        "lora_fused": lf,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": str(torch.get_num_threads()),
    }


def default_out_dir(device: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    return os.path.join(REPO_ROOT, "benchmarks", "results", f"{device_tag(device)}-{stamp}")


def peft_available() -> Optional[str]:
    """None when ``peft`` imports, else why not."""
    try:
        import peft  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None
