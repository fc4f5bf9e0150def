"""CI proof that the CUDA extension compiles, links and imports, even on a machine without a GPU.

Builds ``lora_fused._C`` from ``csrc/`` with nvcc through ``setup.py build_ext`` (``LORA_FUSED_FORCE_CUDA=1``,
one arch, ``LORA_FUSED_CUDA_ARCHS=80``) into a temporary directory (never into the source tree), then imports
the built module in a fresh interpreter, checks ``built_archs()`` and that ``lora_fused`` picks it up
(``python -m lora_fused.info`` reports it). Skipped, with the reason, only when nvcc or a CUDA build of torch is
absent. About 2-4 minutes on 2 cores (see docs/cuda.md).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_TIMEOUT_S = 480


def _skip_reason():
    if shutil.which("nvcc") is None:
        return "nvcc is not on the PATH: the CUDA extension cannot be built here"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build; the torch CUDA extension needs a CUDA build of torch"
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return "setuptools is not installed (torch.utils.cpp_extension needs it)"
    return None


@pytest.fixture(scope="module")
def built_ext(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ)
    env.update(
        LORA_FUSED_FORCE_CUDA="1",
        LORA_FUSED_CUDA_ARCHS="80",
        MAX_JOBS=env.get("MAX_JOBS", "2"),
    )
    env.pop("LORA_FUSED_SKIP_CUDA", None)
    cmd = [
        sys.executable,
        "setup.py",
        "-q",
        "build_ext",
        "--build-temp",
        str(tmp / "temp"),
        "--build-lib",
        str(tmp / "lib"),
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"building the CUDA extension took more than {BUILD_TIMEOUT_S} s")
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-8000:]
        pytest.fail(f"building the CUDA extension failed (exit {proc.returncode}):\n{log}")
    found = glob.glob(str(tmp / "lib" / "lora_fused" / "_C*.so"))
    assert len(found) == 1, f"expected one lora_fused/_C*.so under {tmp / 'lib'}, found {found}"
    return found[0]


_IMPORT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, io, contextlib, json, sys
    import torch
    path = sys.argv[1]
    spec = importlib.util.spec_from_file_location("lora_fused._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["lora_fused._C"] = mod
    import lora_fused
    from lora_fused import _cuda_ext, info
    from lora_fused.backends import cuda_backend
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        info.main()
    print(json.dumps({
        "archs": list(mod.built_archs()),
        "max_rank": mod.max_rank,
        "functions": sorted(n for n in ("forward", "backward", "keep_mask", "built_archs") if hasattr(mod, n)),
        "ext_available": _cuda_ext.CUDA_EXT_AVAILABLE,
        "backend_reason": cuda_backend.BACKEND.unavailable_reason(),
        "gpu": torch.cuda.is_available(),
        "info": out.getvalue(),
    }))
    """
)


@pytest.mark.slow
def test_cuda_extension_builds_and_imports(built_ext):
    import json

    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT, built_ext], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"importing the built extension failed:\n{proc.stdout}\n{proc.stderr}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["archs"] == ["80"]
    assert res["max_rank"] == 128
    assert res["functions"] == ["backward", "built_archs", "forward", "keep_mask"]
    assert res["ext_available"] is True
    assert "CUDA extension : loaded" in " ".join(res["info"].split()), res["info"]
    assert "['80']" in res["info"]
    if not res["gpu"]:
        assert res["backend_reason"] == "no CUDA GPU is visible to PyTorch"
