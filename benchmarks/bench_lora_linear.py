"""Benchmark of ``LoRALinear`` alone: floor, plain PyTorch LoRA, PEFT and lora_fused (each backend).

    python benchmarks/bench_lora_linear.py [suite options]        # e.g. --shapes llm_4k --dtype bf16
    python -m benchmarks --ops linear [options]                   # the same

Takes every option of ``python -m benchmarks`` (see ``--help``); ``--ops`` is fixed to ``linear``.
``run_linear(shape, ...)`` returns the result rows of one shape for use from Python.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli, suite  # noqa: E402

OP = "linear"


def run_linear(shape, **kwargs):
    """Rows of the ``linear`` op on one :class:`benchmarks.harness.Shape` (keyword arguments of
    :func:`benchmarks.suite.run_case`)."""
    return suite.run_case(OP, shape, **kwargs)


def main(argv=None) -> int:
    return cli.main_for_op(OP, __file__, argv)

if __name__ == "__main__":
    raise SystemExit(main())
