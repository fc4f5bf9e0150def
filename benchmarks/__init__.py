"""lora_fused benchmark suite: ``python -m benchmarks`` (see ``docs/benchmarks.md``).

Modules: :mod:`benchmarks.harness` (shapes, timing, memory, environment), :mod:`benchmarks.methods` (what is
compared), :mod:`benchmarks.suite` (one comparison), :mod:`benchmarks.report` (CSV/JSON/markdown/PNG),
:mod:`benchmarks.cli` (the command). Per-op scripts: ``bench_lora_linear.py``, ``bench_lora_qkv.py``; the
training example: ``train_vit.py``; the GPU check: ``gpu_check.sh``.
"""
