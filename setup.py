"""Build script. ``pip install -e .`` works without nvcc or a GPU; the CUDA extension is optional.

Environment flags:
  LORA_FUSED_SKIP_CUDA=1     never build the CUDA extension.
  LORA_FUSED_FORCE_CUDA=1    build it even where nvcc/GPU detection says no, and fail loudly if it fails.
  LORA_FUSED_CUDA_ARCHS      ';'-separated archs, default "90a;80" (e.g. "90a" for H100/H200 only).
  LORA_FUSED_CUTLASS_DIR     CUTLASS headers to build with (a checkout or an unpacked nvidia-cutlass wheel);
                             default: the installed nvidia-cutlass wheel.
  MAX_JOBS                   parallel ninja jobs.

The extension needs torch importable at build time (a CUDA build of torch), nvcc and the CUTLASS headers:
``pip install nvidia-cutlass && LORA_FUSED_FORCE_CUDA=1 pip install --no-build-isolation -e .``. Without them the
package installs pure Python (torch and Triton backends) and ``python -m lora_fused.info`` says why the CUDA
backend is absent.
"""

import glob
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from csrc_build import DEFAULT_ARCHS  # noqa: E402  (kept beside setup.py; imports only the standard library)

SKIP_CUDA = os.environ.get("LORA_FUSED_SKIP_CUDA", "0") == "1"
FORCE_CUDA = os.environ.get("LORA_FUSED_FORCE_CUDA", "0") == "1"
CUDA_ARCHS = os.environ.get("LORA_FUSED_CUDA_ARCHS", DEFAULT_ARCHS)


def _version():
    scope = {}
    with open(os.path.join(HERE, "lora_fused", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def cuda_extension():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty when it is skipped or cannot build."""
    if SKIP_CUDA:
        return [], {}
    if not FORCE_CUDA and shutil.which("nvcc") is None:
        return [], {}
    # The kernels and the binding; csrc/tests/ holds host-side test programs, not part of the extension.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        if FORCE_CUDA:
            raise RuntimeError("LORA_FUSED_FORCE_CUDA=1 but csrc/ has no sources")
        return [], {}
    try:
        from csrc_build import make_extension  # noqa: E402

        return make_extension(sources, CUDA_ARCHS)
    except Exception as exc:  # noqa: BLE001
        if FORCE_CUDA:
            raise
        hint = ""
        if isinstance(exc, ImportError) and "torch" in str(exc):
            hint = (
                "; torch is not importable in this build environment (pip's build isolation): to build the "
                "extension, LORA_FUSED_FORCE_CUDA=1 pip install --no-build-isolation -e ."
            )
        warnings.warn(f"lora_fused: skipping the optional CUDA extension ({type(exc).__name__}: {exc}){hint}")
        return [], {}


ext_modules, cmdclass = cuda_extension()

setup(
    name="lora_fused",
    version=_version(),
    description="Fused LoRA kernels and drop-in LoRA layers for PyTorch",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lora_fused", "lora_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "safetensors>=0.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "peft": ["peft>=0.10"],
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "peft>=0.10",
            "transformers>=4.40",
            "timm>=1.0",
            "triton>=3.0",
            "matplotlib>=3.5",
            "ruff>=0.5",
            "segment-anything>=1.0",
            "nvidia-cutlass>=4.2",  # CUTLASS headers: CI builds the CUDA extension for sm_90a and reads its SASS
            "ninja>=1.10",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.2",  # torch.onnx.export(dynamo=True)
        ],
        "bench": ["matplotlib>=3.5", "tqdm>=4", "peft>=0.10", "pytest-benchmark>=4", "triton>=3.0"],
        "build": ["pybind11>=2.10", "ninja>=1.10", "nvidia-cutlass>=4.2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
