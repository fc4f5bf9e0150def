"""CPU tests of the CUDA backend's host side: the planning and index logic of ``csrc/`` (a C++ program built
with the host compiler: tile order, the low-rank K-block switch, small-kernel grids, alignment rules, the
accumulator maps and the quad-shared dropout mask), the same maps checked against CuTe's partitioning of the
kernels' real MMA types (host code built with nvcc), the build helper ``csrc_build.py``, and the backend's
operand policy (strides, unneeded ``x``/``h``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import csrc_build  # noqa: E402
from lora_fused.backends import cuda_backend  # noqa: E402


def _cxx():
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _run_program(cmd, exe, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compiling failed:\n{proc.stdout}\n{proc.stderr}"
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "checks passed" in run.stdout, run.stdout + run.stderr
    return run.stdout


@pytest.mark.skipif(_cxx() is None, reason="no host C++ compiler (c++, g++ or clang++) on the PATH")
def test_plan_and_mask_logic(tmp_path):
    """csrc/tests/test_plan.cpp: every function of lora_plan.h and the fragment mask scheme, on the CPU."""
    exe = str(tmp_path / "test_plan")
    out = _run_program([_cxx(), "-std=c++17", "-O1", "-I", CSRC, os.path.join(CSRC, "tests", "test_plan.cpp"), "-o",
                        exe], exe, ROOT)
    assert "all" in out


def _cutlass_or_skip():
    try:
        return csrc_build.find_cutlass()
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_accumulator_maps_match_cute(tmp_path):
    """csrc/tests/test_layouts.cu: the maps the mask and the epilogues use equal CuTe's partitioning of the
    kernels' TiledMMAs (sm90 and sm80, bf16 and fp16, forward and dx); ~20 s of host-only nvcc."""
    inc, util, _, _ = _cutlass_or_skip()
    exe = str(tmp_path / "test_layouts")
    cmd = ["nvcc", "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-I", CSRC, "-I", inc]
    cmd += ["-I", util] if util else []
    cmd += [os.path.join(CSRC, "tests", "test_layouts.cu"), "-o", exe]
    out = _run_program(cmd, exe, ROOT)
    assert "sm90 dx bf16" in out


# ------------------------------------------------------------------------------------------------ csrc_build
def test_parse_archs_and_gencode():
    assert csrc_build.parse_archs("90a;80") == ["90a", "80"]
    assert csrc_build.parse_archs(" 80 , 86 ") == ["80", "86"]
    assert csrc_build.gencode_flags("90a") == ["-gencode", "arch=compute_90a,code=sm_90a"]
    for bad in ("75", "", "sm_90", "90a;70"):
        with pytest.raises(ValueError):
            csrc_build.parse_archs(bad)
    assert csrc_build.DEFAULT_ARCHS == "90a;80"


def _fake_cutlass(root, version=(9, 8, 7)):
    inc = root / "include"
    (inc / "cutlass").mkdir(parents=True)
    (inc / "cute").mkdir()
    (inc / "cutlass" / "version.h").write_text(
        "#define CUTLASS_MAJOR {}\n#define CUTLASS_MINOR {}\n#define CUTLASS_PATCH {}\n".format(*version)
    )
    return inc


def test_find_cutlass_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_CUTLASS_DIR", str(tmp_path / "nothing"))
    with pytest.raises(RuntimeError, match="LORA_FUSED_CUTLASS_DIR"):
        csrc_build.find_cutlass()
    # a checkout (include/ at the root) and an unpacked wheel (cutlass_library/source/include) are both found
    inc = _fake_cutlass(tmp_path / "checkout")
    monkeypatch.setenv("LORA_FUSED_CUTLASS_DIR", str(tmp_path / "checkout"))
    found_inc, util, version, origin = csrc_build.find_cutlass()
    assert found_inc == str(inc) and util is None and version == "9.8.7" and "LORA_FUSED_CUTLASS_DIR" in origin
    inc = _fake_cutlass(tmp_path / "wheel" / "cutlass_library" / "source", (4, 2, 0))
    (tmp_path / "wheel" / "cutlass_library" / "source" / "tools" / "util" / "include").mkdir(parents=True)
    monkeypatch.setenv("LORA_FUSED_CUTLASS_DIR", str(tmp_path / "wheel"))
    found_inc, util, version, _ = csrc_build.find_cutlass()
    assert found_inc == str(inc) and util.endswith(os.path.join("tools", "util", "include")) and version == "4.2.0"


def test_find_cutlass_from_the_wheel(monkeypatch):
    monkeypatch.delenv("LORA_FUSED_CUTLASS_DIR", raising=False)
    try:
        inc, _, version, origin = csrc_build.find_cutlass()
    except RuntimeError as exc:
        assert "pip install nvidia-cutlass" in str(exc)
        pytest.skip("nvidia-cutlass is not installed here")
    assert os.path.isfile(os.path.join(inc, "cute", "tensor.hpp")) and origin == "the nvidia-cutlass wheel"
    assert int(version.split(".")[0]) >= 4


def test_setup_uses_the_default_archs():
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    assert "DEFAULT_ARCHS" in text and '"80;90a"' not in text


# ------------------------------------------------------------------------------------------------ operand policy
def test_rows_in_place():
    base = torch.zeros(16, 128, dtype=torch.bfloat16)
    assert cuda_backend.rows_in_place(base)
    assert cuda_backend.rows_in_place(base[:, :64])  # a column slice: row stride 128, read in place
    assert not cuda_backend.rows_in_place(base[:, 1:65])  # starts 2 bytes into a row
    assert not cuda_backend.rows_in_place(base.t())  # transposed: columns are not contiguous
    assert not cuda_backend.rows_in_place(torch.zeros(16, 36, dtype=torch.float16))  # 72-byte rows
    assert not cuda_backend.rows_in_place(torch.zeros(1, 64, dtype=torch.float16).expand(16, 64))  # aliased rows


def test_unaligned_operand_is_copied_with_one_warning(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_warned", set())
    t = torch.randn(64, 16, dtype=torch.bfloat16).t()
    with pytest.warns(UserWarning, match="x with shape"):
        out = cuda_backend._rows_operand(t, "x")
    assert out.is_contiguous() and torch.equal(out, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_backend._rows_operand(t, "x")  # the reason was given once
        ok = torch.randn(8, 16, dtype=torch.bfloat16)
        assert cuda_backend._rows_operand(ok, "weight") is ok  # in place: no copy, no warning


def test_reject_reasons(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_DEVICE_TYPE", "cpu")
    be = cuda_backend.CudaBackend()
    mk = lambda *s, dt=torch.bfloat16: torch.zeros(*s, dtype=dt)  # noqa: E731
    assert be.reject_reason(mk(5, 64), mk(48, 64), mk(8, 64), mk(48, 8)) is None
    assert be.reject_reason(None, mk(48, 64), mk(8, 64), mk(48, 8)) is None  # backward without x
    assert "multiples of 8" in be.reject_reason(mk(5, 36), mk(48, 36), mk(8, 36), mk(48, 8))
    assert "multiples of 8" in be.reject_reason(mk(5, 64), mk(44, 64), mk(8, 64), mk(44, 8))
    assert "float16 and bfloat16" in be.reject_reason(*(mk(*s, dt=torch.float32) for s in ((5, 64), (48, 64), (8, 64), (48, 8))))
    assert "rank" in be.reject_reason(mk(5, 64), mk(48, 64), mk(129, 64), mk(48, 129))
    assert "targets" in be.reject_reason(mk(5, 64), mk(48, 64), mk(32, 64), mk(48, 8))


def test_backward_passes_none_for_unneeded_x_and_h(monkeypatch):
    calls = []

    def fake_backward(g, x, w, a, b, h, s, p, seed, slices, needs):
        calls.append((x, h, needs))
        return [None] * 5

    monkeypatch.setattr(cuda_backend._cuda_ext, "_C", types.SimpleNamespace(backward=fake_backward))
    be = cuda_backend.CudaBackend()
    g, x, w = torch.zeros(4, 16), torch.zeros(4, 8), torch.zeros(16, 8)
    a, b, h = torch.zeros(2, 8), torch.zeros(16, 2), torch.zeros(4, 2)
    be.backward(g, None, w, a, b, None, 1.0, 0.0, None, [0, 16], [True, False, False, False, False])
    be.backward(g, x, w, a, b, h, 1.0, 0.0, None, [0, 16], [True, False, False, False, False])
    be.backward(g, x, w, a, b, h, 1.0, 0.0, None, [0, 16], [False, False, False, True, True])
    assert calls[0][0] is None and calls[0][1] is None
    assert calls[1][0] is None and calls[1][1] is None  # given but not needed: not passed on
    assert calls[2][0] is x and calls[2][1] is h


def test_info_reports_archs_and_cutlass(monkeypatch):
    from lora_fused import _cuda_ext, info

    fake = types.SimpleNamespace(built_archs=lambda: ["90a", "80"], cutlass_version=lambda: "4.2.0")
    monkeypatch.setattr(_cuda_ext, "_C", fake)
    got = info.collect()
    assert got["CUDA extension archs"] == ["90a", "80"] and got["CUTLASS"] == "4.2.0"
