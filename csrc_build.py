"""CUDA-extension build helper imported by ``setup.py`` (kept out of setup.py so the optional path is small).

Builds ``lora_fused._C`` from ``csrc/`` as a standard torch extension (``torch.utils.cpp_extension``): the
``.cu`` kernels include no torch header (fast nvcc), only ``csrc/binding.cpp`` does. See ``docs/cuda.md``.
"""

import glob
import os
import shutil
import sys


def _has_cuda_headers(home):
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def _locate_cuda_home():
    """Set ``CUDA_HOME`` before torch's extension builder reads it, when torch's own guess would be wrong.

    torch takes ``dirname(dirname(which nvcc))``; with a wrapper script such as ``/usr/local/bin/nvcc`` that is
    ``/usr/local``, which has no CUDA headers. Pick the first candidate that has them."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a one-line `exec /path/to/bin/nvcc "$@"` wrapper
            with open(nvcc, "rb") as f:
                head = f.read(512).decode("utf-8", "ignore")
            for tok in head.split():
                if tok.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    if candidates and _has_cuda_headers(candidates[0]):
        return
    for home in candidates[1:]:
        if _has_cuda_headers(home):
            os.environ["CUDA_HOME"] = home
            return


def _pip_cuda_dirs():
    """Include and library dirs of the CUDA wheels torch depends on (``nvidia/cu13``), when present: torch's
    ATen CUDA headers want e.g. ``cusparse.h``, which a minimal toolkit may lack."""
    incs, libs = [], []
    for base in sys.path:
        for sub in ("cu13", "cu12"):
            root = os.path.join(base, "nvidia", sub)
            if os.path.isdir(os.path.join(root, "include")):
                incs.append(os.path.join(root, "include"))
            if glob.glob(os.path.join(root, "lib", "libcudart.so*")):
                libs.append(os.path.join(root, "lib"))
        if incs:
            break
    return incs, libs


def make_extension(sources, gencode_flags, archs):
    """``([CUDAExtension], {"build_ext": BuildExtension})`` for ``lora_fused._C``; raises if torch or nvcc is missing."""
    for arch in [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]:
        digits = "".join(ch for ch in arch if ch.isdigit())
        if not digits or int(digits) < 80:
            raise ValueError(f"LORA_FUSED_CUDA_ARCHS={archs!r}: the kernels need sm_80 or newer (got {arch!r})")
    _locate_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None or not _has_cuda_headers(CUDA_HOME):
        raise RuntimeError(f"no CUDA toolkit with headers found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME")

    here = os.path.dirname(os.path.abspath(__file__))
    pip_incs, pip_libs = _pip_cuda_dirs()
    # The toolkit's own include dir first; the pip wheels' headers only fill what it lacks.
    include_dirs = [os.path.join(here, "csrc"), os.path.join(CUDA_HOME, "include")] + pip_incs
    library_dirs = []
    if not any(glob.glob(os.path.join(CUDA_HOME, sub, "libcudart.so")) for sub in ("lib64", "lib")):
        # -lcudart (added by CUDAExtension) needs an unversioned libcudart.so: point a symlink at the wheel's
        # libcudart.so.NN from a link-only directory under build/.
        for d in pip_libs:
            found = sorted(glob.glob(os.path.join(d, "libcudart.so.*")))
            if found:
                link_dir = os.path.join(here, "build", "cudart_link")
                os.makedirs(link_dir, exist_ok=True)
                link = os.path.join(link_dir, "libcudart.so")
                if not os.path.lexists(link):
                    os.symlink(found[0], link)
                library_dirs += [link_dir, d]
                break
    # Archs as one preprocessor token ("80;90a" -> 80_90a): no quotes or ';' to survive the ninja/shell round trip.
    archs_token = "_".join(a.strip() for a in archs.replace(",", ";").split(";") if a.strip())
    archs_define = f"-DLORA_FUSED_ARCHS={archs_token}"
    ext = CUDAExtension(
        name="lora_fused._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={
            # -g0: Python's sysconfig adds -g, which makes the torch-header-heavy binding slower to compile.
            "cxx": ["-O3", "-g0", archs_define],
            "nvcc": ["-O3", "-lineinfo", archs_define] + gencode_flags,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
