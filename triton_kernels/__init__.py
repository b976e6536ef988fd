"""lora2's Triton kernels, installed as ``lora2_kernels.triton_kernels``.

The folder sits at the top of the repository (the layout of the design card), but the import
name ``triton_kernels`` belongs to Triton's own kernel library and to a PyPI package, which other
libraries import when present; setup.py ships this folder under the lora2_kernels namespace only.
Run from a source checkout, the folder is still visible as a top-level name, so refuse it there:
a library that probes ``import triton_kernels`` then sees an ImportError, not lora2's kernels.
"""

if __name__ == "triton_kernels":
    raise ImportError("this is lora2's kernel folder, not Triton's triton_kernels package; "
                      "import it as lora2_kernels.triton_kernels")

from .lora_linear import (  # noqa: E402
    MAX_RANK, Factors, Quant4, dropout_keep_mask, factors_cast, lora2_backward, lora2_forward, warmup)

__all__ = ["MAX_RANK", "Factors", "Quant4", "dropout_keep_mask", "factors_cast", "lora2_backward", "lora2_forward",
           "warmup"]
