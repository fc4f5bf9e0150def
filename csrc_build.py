"""CUDA-extension build helper imported by ``setup.py`` (kept out of setup.py so the optional path is small)."""

import os


def make_extension(sources, gencode_flags, archs):
    """``([CUDAExtension], {"build_ext": BuildExtension})`` for ``lora_fused._C``; raises if torch or nvcc is missing."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        name="lora_fused._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", f'-DLORA_FUSED_ARCHS="{archs}"'],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", f'-DLORA_FUSED_ARCHS="{archs}"'] + gencode_flags,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
