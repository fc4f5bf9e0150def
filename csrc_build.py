"""CUDA-extension build helper imported by ``setup.py`` (kept out of setup.py so the optional path is small).

Builds ``lora_fused._C`` from ``csrc/`` as a standard torch extension (``torch.utils.cpp_extension``): the
``.cu`` kernels include CUTLASS/CuTe and no torch header, only ``csrc/binding.cpp`` includes torch. CUTLASS is
not vendored: its headers come from the ``nvidia-cutlass`` wheel (``cutlass_library/source/include``) or from
the directory in ``LORA_FUSED_CUTLASS_DIR`` (a CUTLASS checkout, the wheel's ``source`` folder, or an unpacked
wheel). See ``docs/cuda.md``.
"""

import glob
import importlib.util
import os
import re
import shutil
import sys

DEFAULT_ARCHS = "90a;80"


def parse_archs(archs):
    """``"90a;80"`` -> ``["90a", "80"]``; raises for archs below sm_80 (the kernels use bf16 tensor cores)."""
    out = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not out:
        raise ValueError(f"LORA_FUSED_CUDA_ARCHS={archs!r} names no arch")
    for arch in out:
        if not re.fullmatch(r"\d{2,3}[af]?", arch) or int(re.sub(r"\D", "", arch)) < 80:
            raise ValueError(f"LORA_FUSED_CUDA_ARCHS={archs!r}: the kernels need sm_80 or newer (got {arch!r})")
    return out


def gencode_flags(archs):
    """One ``-gencode arch=compute_X,code=sm_X`` per arch (SASS only, no PTX)."""
    flags = []
    for arch in parse_archs(archs):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _cutlass_roots_from(path):
    """The (include, util include) pair under ``path`` if it holds CUTLASS, else None."""
    for root in (path, os.path.join(path, "source"), os.path.join(path, "cutlass_library", "source")):
        inc = os.path.join(root, "include")
        if os.path.isfile(os.path.join(inc, "cutlass", "version.h")) and os.path.isdir(os.path.join(inc, "cute")):
            util = os.path.join(root, "tools", "util", "include")
            return inc, util if os.path.isdir(util) else None
    return None


def find_cutlass():
    """``(include_dir, util_include_dir or None, version, origin)`` of the CUTLASS headers to build with.

    ``LORA_FUSED_CUTLASS_DIR`` wins when set (an error if it holds no CUTLASS); otherwise the installed
    ``nvidia-cutlass`` wheel (module ``cutlass_library``). Raises RuntimeError saying how to get one."""
    env = os.environ.get("LORA_FUSED_CUTLASS_DIR")
    if env:
        found = _cutlass_roots_from(os.path.abspath(os.path.expanduser(env)))
        if found is None:
            raise RuntimeError(
                f"LORA_FUSED_CUTLASS_DIR={env!r} holds no CUTLASS headers (expected include/cutlass/version.h and "
                "include/cute/ under it, under source/, or under cutlass_library/source/)"
            )
        return (*found, cutlass_header_version(found[0]), f"LORA_FUSED_CUTLASS_DIR={env}")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        found = _cutlass_roots_from(os.path.dirname(spec.origin))
        if found is not None:
            return (*found, cutlass_header_version(found[0]), "the nvidia-cutlass wheel")
    raise RuntimeError(
        "CUTLASS headers not found: pip install nvidia-cutlass (the build extra: pip install -e '.[build]'), or "
        "set LORA_FUSED_CUTLASS_DIR to a CUTLASS checkout or an unpacked nvidia-cutlass wheel"
    )


def cutlass_header_version(include_dir):
    """``"4.2.0"`` from ``cutlass/version.h``."""
    with open(os.path.join(include_dir, "cutlass", "version.h")) as f:
        text = f.read()
    parts = [re.search(rf"#define CUTLASS_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) if p else "?" for p in parts)


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


# nvcc flags of the kernels. -DNDEBUG: CuTe's device asserts would split the wgmma pipeline across function
# calls (ptxas C7510, serialized wgmmas). torch defines __CUDA_NO_HALF*_ for its own files; CUTLASS's half_t
# and bfloat16_t use those conversions, so they are undefined again here.
NVCC_FLAGS = [
    "-O3",
    "-DNDEBUG",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]


def make_extension(sources, archs):
    """``([CUDAExtension], {"build_ext": BuildExtension})`` for ``lora_fused._C``; raises if torch, nvcc or CUTLASS
    is missing."""
    arch_list = parse_archs(archs)
    _locate_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    cutlass_inc, cutlass_util, cutlass_version, cutlass_origin = find_cutlass()

    if CUDA_HOME is None or not _has_cuda_headers(CUDA_HOME):
        raise RuntimeError(f"no CUDA toolkit with headers found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME")

    here = os.path.dirname(os.path.abspath(__file__))
    pip_incs, pip_libs = _pip_cuda_dirs()
    # The toolkit's own include dir first; the pip wheels' headers only fill what it lacks.
    include_dirs = [os.path.join(here, "csrc"), cutlass_inc] + ([cutlass_util] if cutlass_util else [])
    include_dirs += [os.path.join(CUDA_HOME, "include")] + pip_incs
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
    # Archs as one preprocessor token ("90a;80" -> 90a_80): no quotes or ';' to survive the ninja/shell round trip.
    archs_define = f"-DLORA_FUSED_ARCHS={'_'.join(arch_list)}"
    # The sm_90a GEMMs run only on sm_90a; every other arch runs the sm_80 family (compiled as stubs when unused).
    family_defines = [
        f"-DLF_BUILD_SM90_GEMMS={int('90a' in arch_list)}",
        f"-DLF_BUILD_SM80_GEMMS={int(any(a != '90a' for a in arch_list))}",
    ]
    print(f"lora_fused: building the CUDA extension for sm_{', sm_'.join(arch_list)} with CUTLASS {cutlass_version} "
          f"from {cutlass_origin} ({cutlass_inc})")
    ext = CUDAExtension(
        name="lora_fused._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={
            # -g0: Python's sysconfig adds -g, which makes the torch-header-heavy binding slower to compile.
            "cxx": ["-O3", "-g0", archs_define],
            "nvcc": NVCC_FLAGS + [archs_define] + family_defines + gencode_flags(archs),
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
