"""Build of lora2: the Python packages (metadata in pyproject.toml) plus the compiled importance op.

    pip install torch==2.13.0                      # or the CUDA torch you train with: installed FIRST
    pip install setuptools wheel ninja
    pip install --no-build-isolation -e .          # builds lora2_kernels._C against that torch

`--no-build-isolation` is required: the extension compiles against the torch already installed,
and an isolated build would download a torch of its own (a multi-GB CUDA build on a CPU machine).

What gets built (the C++ CPU op always; the CUDA op where it can be):
    LORA2_BUILD_CUDA=auto (default)  CUDA op if this torch is a CUDA build and nvcc is found
    LORA2_BUILD_CUDA=1               CUDA op, or fail with the reason
    LORA2_BUILD_CUDA=0               CPU op only
    LORA2_NO_EXTENSION=1             no compiled op at all: lora2_kernels falls back to the
                                     PyTorch reference (and says so once, at first use)
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions() -> tuple[list, dict]:
    if os.environ.get("LORA2_NO_EXTENSION", "0") == "1":
        print("lora2: LORA2_NO_EXTENSION=1, building no compiled op", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("lora2: setup.py needs torch installed first, and pip's --no-build-isolation so it is seen:\n"
                 "    pip install torch==2.13.0 && pip install --no-build-isolation -e .")

    wanted = os.environ.get("LORA2_BUILD_CUDA", "auto").lower()
    if wanted not in ("auto", "0", "1"):
        sys.exit(f"lora2: LORA2_BUILD_CUDA must be auto, 0 or 1, got {wanted!r}")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if wanted == "1" and not cuda_possible:
        reason = "this torch is a CPU build" if torch.version.cuda is None else "nvcc (CUDA_HOME) was not found"
        sys.exit(f"lora2: LORA2_BUILD_CUDA=1 but the CUDA op cannot be built: {reason}.")
    with_cuda = wanted == "1" or (wanted == "auto" and cuda_possible)

    sources = [os.path.join("csrc", "importance.cpp")]
    cxx = ["-O3", "-std=c++17"]
    if with_cuda:
        extension = CUDAExtension(
            "lora2_kernels._C", sources + [os.path.join("csrc", "importance_cuda.cu")],
            define_macros=[("LORA2_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        extension = CppExtension("lora2_kernels._C", sources, extra_compile_args={"cxx": cxx})
    print(f"lora2: building lora2_kernels._C with the {'CPU and CUDA' if with_cuda else 'CPU'} op",
          file=sys.stderr)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
