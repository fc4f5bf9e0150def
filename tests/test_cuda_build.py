"""CI proof that the CUDA extension compiles, links and imports on a machine without a GPU, and that its sm_90a
GEMMs are the Hopper kernels they claim to be.

Builds ``lora_fused._C`` from ``csrc/`` with nvcc through ``setup.py build_ext`` (``LORA_FUSED_FORCE_CUDA=1``,
``LORA_FUSED_CUDA_ARCHS=90a``, CUTLASS from the nvidia-cutlass wheel) into a temporary directory (never into the
source tree), imports it in a fresh interpreter (``python -m lora_fused.info`` reports it), and reads its SASS
with ``cuobjdump``: every sm_90a GEMM must issue wgmma (HGMMA), TMA loads (UTMALDG, multicast included) and TMA
stores (UTMASTG) and use no local memory; the small kernels must stream with cp.async (LDGSTS) into tensor-core
MMAs. Skipped, with the reason, only when nvcc, a CUDA build of torch or the CUTLASS headers are absent.
About 3 minutes on 2 cores (docs/cuda.md has the measurements).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_TIMEOUT_S = 900
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _skip_reason():
    if shutil.which("nvcc") is None:
        return "nvcc is not on the PATH: the CUDA extension cannot be built here"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build; the torch CUDA extension needs a CUDA build of torch"
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return "setuptools is not installed (torch.utils.cpp_extension needs it)"
    import csrc_build

    try:
        csrc_build.find_cutlass()
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def built_ext(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ)
    env.update(LORA_FUSED_FORCE_CUDA="1", LORA_FUSED_CUDA_ARCHS="90a", MAX_JOBS=env.get("MAX_JOBS", "2"))
    env.pop("LORA_FUSED_SKIP_CUDA", None)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp / "temp"), "--build-lib",
           str(tmp / "lib")]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"building the CUDA extension took more than {BUILD_TIMEOUT_S} s")
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-8000:]
        pytest.fail(f"building the CUDA extension failed (exit {proc.returncode}):\n{log}")
    print(f"\nbuilt lora_fused._C for sm_90a in {time.time() - t0:.0f} s (load average {os.getloadavg()[0]:.1f})")
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
        "cutlass": mod.cutlass_version(),
        "max_rank": mod.max_rank,
        "functions": sorted(n for n in ("forward", "backward", "keep_mask", "built_archs", "cutlass_version")
                            if hasattr(mod, n)),
        "ext_available": _cuda_ext.CUDA_EXT_AVAILABLE,
        "backend_reason": cuda_backend.BACKEND.unavailable_reason(),
        "gpu": torch.cuda.is_available(),
        "info": out.getvalue(),
    }))
    """
)


@pytest.mark.slow
def test_cuda_extension_builds_and_imports(built_ext):
    import csrc_build

    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT, built_ext], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"importing the built extension failed:\n{proc.stdout}\n{proc.stderr}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["archs"] == ["90a"]
    assert res["cutlass"] == csrc_build.find_cutlass()[2]
    assert res["max_rank"] == 128
    assert res["functions"] == ["backward", "built_archs", "cutlass_version", "forward", "keep_mask"]
    assert res["ext_available"] is True
    text = " ".join(res["info"].split())
    assert "CUDA extension : loaded" in text, res["info"]
    assert "['90a']" in text and f"CUTLASS : {res['cutlass']}" in text, res["info"]
    if not res["gpu"]:
        assert res["backend_reason"] == "no CUDA GPU is visible to PyTorch"


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


_OPS = ("HGMMA", "UTMALDG", "UTMALDG.MULTICAST", "UTMASTG", "USETMAXREG", "HMMA", "LDSM", "LDGSTS", "LDL", "STL",
        "SHFL")


def sass_counts(so_path):
    """``{kernel name: Counter(op -> count)}`` of the extension's SASS (ops of _OPS, by prefix)."""
    sass = subprocess.run([_cuobjdump(), "--dump-sass", so_path], capture_output=True, text=True, timeout=600)
    assert sass.returncode == 0, sass.stderr
    out, name = {}, None
    for line in sass.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = collections.Counter()
            continue
        if name is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            op = m.group(1)
            for key in _OPS:
                if op == key or op.startswith(key + "."):
                    out[name][key] += 1
            if op.startswith("UTMALDG") and "MULTICAST" in op:
                out[name]["UTMALDG.MULTICAST"] += 1
    return out


def _short(name):
    for pat, label in (
        (r"sm90.*GemmIN7cutlass10bfloat16_tELb0", "sm90 fwd bf16"),
        (r"sm90.*GemmIN7cutlass10bfloat16_tELb1", "sm90 dx bf16"),
        (r"sm90.*GemmIN7cutlass6half_tELb0", "sm90 fwd fp16"),
        (r"sm90.*GemmIN7cutlass6half_tELb1", "sm90 dx fp16"),
        (r"sm80.*GemmIN7cutlass10bfloat16_tELb0", "sm80 fwd bf16"),
        (r"sm80.*GemmIN7cutlass10bfloat16_tELb1", "sm80 dx bf16"),
        (r"sm80.*GemmIN7cutlass6half_tELb0", "sm80 fwd fp16"),
        (r"sm80.*GemmIN7cutlass6half_tELb1", "sm80 dx fp16"),
        (r"(down|dh_db|da)_kernelI(13__nv_bfloat16|6__half)Li(\d+)", None),
    ):
        m = re.search(pat, name)
        if m:
            if label:
                return label
            return f"{m.group(1)} {'bf16' if 'bfloat' in m.group(2) else 'fp16'} RB={m.group(3)}"
    return None


@pytest.mark.slow
def test_sm90_gemms_are_tma_wgmma_kernels(built_ext):
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel) to read the SASS")
    counts = sass_counts(built_ext)
    rows = {_short(k): v for k, v in counts.items() if _short(k)}
    print("\nSASS instruction counts (sm_90a build):")
    for label in sorted(rows):
        c = rows[label]
        print(f"  {label:<22} " + " ".join(f"{op}={c[op]}" for op in _OPS if c[op]))
    gemms = [k for k in rows if k.startswith("sm90 ")]
    assert sorted(gemms) == ["sm90 dx bf16", "sm90 dx fp16", "sm90 fwd bf16", "sm90 fwd fp16"]
    for k in gemms:
        c = rows[k]
        assert c["HGMMA"] > 0, f"{k}: no wgmma"
        assert c["UTMALDG"] > 0 and c["UTMALDG.MULTICAST"] > 0, f"{k}: no TMA loads (plain and multicast)"
        assert c["UTMASTG"] > 0, f"{k}: no TMA-store epilogue"
        assert c["USETMAXREG"] > 0, f"{k}: no register reallocation between producer and consumers"
        assert c["HMMA"] == 0 and c["LDL"] == 0 and c["STL"] == 0, f"{k}: mma.sync or local memory: {dict(c)}"
    assert rows["sm90 dx bf16"]["SHFL"] > 0, "dx shares each Philox call across a quad with shuffles"
    small = [k for k in rows if k.split()[0] in ("down", "dh_db", "da")]
    assert len(small) == 3 * 2 * 4
    for k in small:
        assert rows[k]["LDGSTS"] > 0 and rows[k]["HMMA"] > 0, f"{k}: {dict(rows[k])}"
        assert rows[k]["LDL"] == 0 and rows[k]["STL"] == 0, f"{k} spills: {dict(rows[k])}"
    # A 90a-only build compiles the sm80 family as stubs (on sm_90a the sm90 kernels run): no sm80 GEMM at all.
    assert not [k for k in rows if k.startswith("sm80 ")]
