"""Loading of the compiled extension ``lora2_kernels._C`` (csrc/), which never makes an import fail.

The extension registers ``torch.ops.lora2.importance_update`` with a CPU kernel always and a CUDA
kernel when it was built with CUDA (see setup.py). If it is missing (``LORA2_NO_EXTENSION=1``, a
build that failed, a source checkout that was not installed), the ops fall back to the PyTorch
reference and say so once; `lora2_kernels.available_backends()` reports what is there.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    """None when loaded, else why not."""
    try:
        from . import _C  # noqa: F401  (importing registers the op)
    except ImportError as e:
        return (f"lora2_kernels._C is not built ({e}); reinstall with "
                "`pip install --no-build-isolation -e .` after installing torch")
    return None


def compiled_op_available(device_type: str) -> bool:
    """Whether the compiled importance op has a kernel for ``device_type`` ("cpu", "cuda", "meta")."""
    if _load() is not None:
        return False
    if device_type == "meta":  # the fake implementation (registered in importance.py) serves meta
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("lora2::importance_update", key)


def extension_error(device_type: str) -> str:
    reason = _load()
    if reason is not None:
        return reason
    if device_type == "cuda":
        return ("lora2_kernels._C was built without its CUDA kernel (CPU torch or no nvcc at build time); "
                "rebuild with a CUDA torch and nvcc, or force it with LORA2_BUILD_CUDA=1")
    return f"lora2_kernels._C has no kernel for {device_type} tensors"
