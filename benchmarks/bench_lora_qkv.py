"""Benchmark of ``LoRAQKV(targets="qv")``: floor (the frozen fused qkv), SAM-style plain LoRA
on q and v, PEFT on q and v of three separate linears (PEFT cannot target slices of a fused qkv) and lora_fused.

    python benchmarks/bench_lora_qkv.py [suite options]           # e.g. --shapes sam_h_qkv
    python -m benchmarks --ops qkv [options]                      # the same

Takes every option of ``python -m benchmarks`` (see ``--help``); ``--ops`` is fixed to ``qkv`` (shapes whose N splits in three).
``run_qkv(shape, ...)`` returns the result rows of one shape for use from Python.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli, suite  # noqa: E402

OP = "qkv"


def run_qkv(shape, **kwargs):
    """Rows of the ``qkv`` op on one :class:`benchmarks.harness.Shape` (keyword arguments of
    :func:`benchmarks.suite.run_case`)."""
    return suite.run_case(OP, shape, **kwargs)


def main(argv=None) -> int:
    return cli.main_for_op(OP, __file__, argv)

if __name__ == "__main__":
    raise SystemExit(main())
