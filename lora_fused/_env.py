"""Environment variables read on per-call paths (a backend choice, a kernel switch), each call.

``os.environ.get`` of an unset variable costs about 0.5 µs in CPython (``Mapping.get`` raises and catches a
KeyError); CPython's ``os.environ`` keeps its values in a dict (``_data``, encoded keys), read here directly.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

_OFF = frozenset(("0", "", "false", "False"))


def raw_reader(name: str) -> Callable[[], Optional[object]]:
    """A function returning ``name``'s current value as CPython stores it (``bytes`` on POSIX, ``str`` elsewhere),
    or None when unset: a cheap value to compare or use as a cache key, not to display."""
    try:
        data, key = os.environ._data, os.environ.encodekey(name)  # type: ignore[attr-defined]
    except AttributeError:  # another os.environ implementation: read it the ordinary way
        return lambda: os.environ.get(name)
    return lambda: data.get(key)


def switch(name: str, default: bool = True) -> Callable[[], bool]:
    """A function returning whether the switch ``name`` is on: unset gives ``default``; ``0``, empty, ``false``
    and ``False`` are off, anything else on."""
    read = raw_reader(name)

    def on() -> bool:
        raw = read()
        if raw is None:
            return default
        if isinstance(raw, bytes):
            raw = os.fsdecode(raw)
        return raw not in _OFF

    return on
