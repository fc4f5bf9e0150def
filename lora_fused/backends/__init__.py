"""Backend registry and selection: dispatch by declared capability, in the order cuda → triton → torch.

A backend is an object with:

* ``name``;
* ``unavailable_reason() -> str | None``: why it cannot run in this process at all (None: it can);
* ``reject_reason(x, weight, lora_A, lora_B) -> str | None``: why it cannot run on these tensors
  (device, dtype, shape limits);
* ``forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_slices) -> (y, h)``;
* ``backward(grad_y, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, lora_slices, needs)
  -> (dx, dW, db, dA, dB)`` with ``None`` where ``needs`` is False;
* ``auto_device_types``: device types on which ``"auto"`` may pick it (None: any). The Triton backend runs
  CPU tensors under ``TRITON_INTERPRET=1`` when named, but ``"auto"`` picks it on CUDA only;
* optionally ``auto_skip_reason(device) -> str | None``: why ``"auto"`` passes it over on that device although it
  could run there (the CUDA backend on GPU generations it has not been validated on);
* ``cpu_int_seed``: whether ``forward`` and ``backward`` also take the seed of CPU tensors as a Python ``int``
  (the eager route then draws one without a tensor: ``lora_fused.ops.lora_linear.draw_host_seed``).

Tensors are 2-D (``x`` is (M, K)); ``seed`` is an int64 tensor of one element on ``x``'s device (or, where the
backend declares ``cpu_int_seed``, a Python ``int`` for CPU tensors), or None when ``dropout_p == 0``.
``lora_slices`` is described in :mod:`lora_fused.kernels.reference.lora_linear`.

Selection: ``use_backend`` (context-local, thread-safe) overrides ``set_backend`` (process default), which
overrides the ``LORA_FUSED_BACKEND`` environment variable; all default to ``"auto"``. ``"auto"`` takes the
first backend of ``cuda, triton, torch`` that accepts the tensors. A backend named explicitly that cannot run
raises :class:`~lora_fused._errors.BackendUnavailableError` (a ``RuntimeError``) saying why: never a silent
fallback. The choice is a pure function of the requested name and the tensors, so the backward pass runs on
the backend the forward pass used (the requested name travels with the op).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import Iterator, List, Optional

import torch

from .._env import raw_reader
from .._errors import BackendUnavailableError

BACKEND_ORDER = ("cuda", "triton", "torch")
_CHOICES = ("auto",) + BACKEND_ORDER
_MODULES = {name: f"{__name__}.{name}_backend" for name in BACKEND_ORDER}

_process_default: Optional[str] = None
_context_choice: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lora_fused_backend", default=None)


@functools.lru_cache(maxsize=None)
def get_backend_impl(name: str):
    """The backend object registered under ``name`` (imported on first use)."""
    if name not in BACKEND_ORDER:
        raise ValueError(f"unknown lora_fused backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run in this process (None when it can)."""
    return get_backend_impl(name).unavailable_reason()


def available_backends() -> List[str]:
    """Names of the backends usable in this process, in dispatch order (``"torch"`` is always there)."""
    return [name for name in BACKEND_ORDER if unavailable_reason(name) is None]


def _check_choice(name: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"unknown lora_fused backend {name!r}; choose one of {', '.join(_CHOICES)}")
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise BackendUnavailableError(f"lora_fused backend {name!r} is not available: {reason}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Raises ``RuntimeError`` (saying why) when a named backend is not available here.
    """
    global _process_default
    _process_default = _check_choice(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager choosing the backend for the calls made inside it (context-local, thread-safe)."""
    token = _context_choice.set(_check_choice(name))
    try:
        yield name
    finally:
        _context_choice.reset(token)


_env_choice = [None, "auto"]  # [raw LORA_FUSED_BACKEND value, its checked choice]: parsed once per value


def get_backend() -> str:
    """The backend name requested for the current context (``"auto"`` unless set)."""
    name = _context_choice.get()
    if name is not None:
        return name
    if _process_default is not None:
        return _process_default
    raw = os.environ.get("LORA_FUSED_BACKEND")
    if raw != _env_choice[0]:
        choice = _check_choice((raw or "auto").strip().lower() or "auto")  # raises for a bad or unusable name
        _env_choice[:] = [raw, choice]
    return _env_choice[1]


def requested_backend() -> str:
    """``get_backend()`` as a compile-time constant (``torch.compile`` bakes the choice into the graph)."""
    return get_backend()


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (and with it triton,
# ~1.6 s) at ``import lora_fused``: Dynamo reads this attribute when it meets the function.
requested_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def select_backend(requested: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """The backend that runs these tensors for the ``requested`` name; raises when a named one cannot."""
    if requested == "auto":
        for name in BACKEND_ORDER:
            if unavailable_reason(name) is None:
                impl = get_backend_impl(name)
                devices = getattr(impl, "auto_device_types", None)
                if devices is not None and x.device.type not in devices:
                    continue
                skip = getattr(impl, "auto_skip_reason", None)
                if skip is not None and skip(x.device) is not None:
                    continue
                if impl.reject_reason(x, weight, lora_A, lora_B) is None:
                    return impl
        raise BackendUnavailableError(f"no lora_fused backend accepts {x.dtype} tensors on {x.device}")
    _check_choice(requested)
    impl = get_backend_impl(requested)
    reason = impl.reject_reason(x, weight, lora_A, lora_B)
    if reason is not None:
        raise BackendUnavailableError(f"lora_fused backend {requested!r} cannot run these tensors: {reason}")
    return impl


_selection_cache: dict = {}
_BIG = 2**31
_env_raw = raw_reader("LORA_FUSED_BACKEND")  # the raw value: part of the selection cache's key


def backend_for(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """The backend object that runs these tensors for the name requested in this context (``get_backend``),
    for tensors that share ``x``'s dtype and device (the ops check that first); ``x`` is (..., K).

    The answer is remembered per (context choice, process default, ``LORA_FUSED_BACKEND`` value, device,
    dtype, adapter shapes): every backend's ``reject_reason`` is a function of these and of the size class
    (calls with ``x`` or ``weight`` of 2**31 elements or more are never remembered nor answered from memory).
    So ``use_backend``, ``set_backend`` and the environment variable take effect at once, and a named backend
    that cannot run raises on every call."""
    return backend_for_parts(x.device, x.dtype, lora_A.shape, lora_B.shape, x, weight, lora_A, lora_B)


def backend_for_parts(device, dtype, a_shape, b_shape, x, weight, lora_A, lora_B):
    """:func:`backend_for` with ``x.device``, ``x.dtype``, ``lora_A.shape`` and ``lora_B.shape`` already read
    by the caller (the op's fast path has them)."""
    key = (_context_choice.get(), _process_default, _env_raw(), device, dtype, a_shape, b_shape)
    hit = _selection_cache.get(key)
    if hit is None or x.numel() >= _BIG or weight.numel() >= _BIG:
        hit = _select_and_remember(key, x, weight, lora_A, lora_B)
    if isinstance(hit, BackendUnavailableError):
        raise BackendUnavailableError(str(hit))
    return hit


def _select_and_remember(key, x, weight, lora_A, lora_B):
    try:
        hit = select_backend(get_backend(), x.reshape(-1, weight.shape[1]), weight, lora_A, lora_B)
    except BackendUnavailableError as exc:
        hit = exc
    if x.numel() < _BIG and weight.numel() < _BIG:
        _selection_cache[key] = hit
    return hit


def describe_backends() -> List[tuple]:
    """``(name, available, reason)`` for every backend, for ``python -m lora_fused.info``."""
    return [(name, unavailable_reason(name) is None, unavailable_reason(name) or "available") for name in BACKEND_ORDER]
