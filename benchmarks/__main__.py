"""``python -m benchmarks``: the benchmark suite (``python -m benchmarks --help``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
