"""The Triton kernels compile for a real GPU (sm_90, bf16, dropout on), checked on a machine without one.

The interpreter tests check the math; only the GPU compiler sees layouts, tl.dot operand types and shared-memory
budgets. ``lora_fused.kernels.triton.aot_check`` runs Triton's compiler (with its bundled ptxas) down to a cubin.
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed here")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "lora_fused.kernels.triton.aot_check", "--quick"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "0 failed of" in out.stdout
