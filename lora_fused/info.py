"""``python -m lora_fused.info``: versions and which backends can run here, and why not."""

from __future__ import annotations

import importlib
import platform


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report anything that stops the import
        return f"not available ({type(exc).__name__}: {exc})"


def collect() -> dict:
    """A dict of what ``main`` prints: versions, devices, backends."""
    import torch

    import lora_fused
    from lora_fused import _cuda_ext
    from lora_fused.backends import describe_backends

    cuda = torch.cuda.is_available()
    info = {
        "lora_fused": lora_fused.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "peft": _version("peft"),
        "CUDA GPU": torch.cuda.get_device_name(0) if cuda else "none visible",
        "CUDA extension": "loaded" if _cuda_ext.CUDA_EXT_AVAILABLE else f"not loaded: {_cuda_ext.CUDA_EXT_ERROR}",
        "default backend": lora_fused.get_backend(),
    }
    ext = _cuda_ext._C
    if ext is not None:
        archs = getattr(ext, "built_archs", None)
        if archs is not None:
            info["CUDA extension archs"] = archs() if callable(archs) else str(archs)
        cutlass = getattr(ext, "cutlass_version", None)
        if cutlass is not None:
            info["CUTLASS"] = cutlass() if callable(cutlass) else str(cutlass)
    info["backends"] = describe_backends()
    return info


def main() -> None:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    print("backends (dispatch order cuda → triton → torch):")
    for name, ok, reason in backends:
        print(f"  {name:<7} {'yes' if ok else 'no '}  {reason}")


if __name__ == "__main__":
    main()
