"""lora2_kernels: the compiled and Triton kernels of LoRA², and the layer that runs them.

    from lora2_kernels import LoRA2Linear
    layer = LoRA2Linear(768, 768, r=8, k=8)          # a drop-in nn.Linear with a LoRA² adapter

- ``LoRA2Linear`` (linear.py): nn.Linear + adapter; forward through ``ops.lora2_linear``.
- ``ops`` (ops.py): autograd / torch.library layer over the fused Triton kernels
  (triton_kernels/lora_linear.py, installed as ``lora2_kernels.triton_kernels``).
- ``importance_update`` (importance.py): the rank allocator's importance update, a compiled
  C++/CUDA op (csrc/) over all adapted modules at once.
- ``reference`` (reference.py): every op above in plain PyTorch: the tests' oracle and the path
  where no kernel applies.
- ``available_backends()``: which of the compiled and Triton paths this installation has.
"""

from __future__ import annotations

from . import reference
from ._extension import compiled_op_available, extension_error
from .importance import importance_update
from .linear import ADAPTER_PARAMETER_NAMES, LoRA2Linear, is_conv1d, is_supported_linear
from .ops import lora2_linear, triton_importable, triton_interpreting

__version__ = "0.2.0"


def available_backends() -> dict[str, bool | str | None]:
    """What this installation can run, e.g. ``{'importance_cpu': True, 'importance_cuda': False,
    'triton': True, 'triton_interpreter': False, 'cuda_device': False, ...}``."""
    import torch

    triton_version = None
    if triton_importable():
        from importlib.metadata import PackageNotFoundError, version

        try:
            triton_version = version("triton")
        except PackageNotFoundError:
            triton_version = "unknown"
    return {
        "importance_cpu": compiled_op_available("cpu"),
        "importance_cuda": compiled_op_available("cuda"),
        "extension_error": None if compiled_op_available("cpu") else extension_error("cpu"),
        "triton": triton_importable(),
        "triton_version": triton_version,
        "triton_interpreter": triton_interpreting(),
        "cuda_device": torch.cuda.is_available(),
    }


def warmup(model, tokens: int, dtype=None, eval_tokens: int | None = None) -> int:
    """Autotune the Triton kernels now for every LoRA2Linear shape in ``model`` at ``tokens`` rows (and at
    ``eval_tokens`` rows without dropout: the evaluations' forward), so no training step and no evaluation
    waits on it (Triton caches the choices on disk). The short last batch's smaller token buckets are
    tuned too (``triton_kernels.warmup``). Returns the keys tuned; 0 when the model is not on a GPU."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, LoRA2Linear)]
    if not layers or layers[0].weight.device.type != "cuda":
        return 0
    from .triton_kernels import warmup as tune

    dtype = dtype or (torch.bfloat16 if layers[0].weight.dtype == torch.float32 else layers[0].weight.dtype)
    return tune(sorted(warmup_keys(model, tokens, eval_tokens)), dtype=dtype, device=layers[0].weight.device)


def warmup_keys(model, tokens: int, eval_tokens: int | None = None) -> set[tuple[int, int, int, int, int, bool, float]]:
    """(tokens, in, out, k, r, bias, dropout) of every LoRA2Linear in ``model``: the autotuning keys its
    training steps will use (bias-free layers, as in LLaMA, and dropout are keys of their own) and, with
    ``eval_tokens``, its evaluations' (dropout off: a key of its own too)."""
    layers = [m for m in model.modules() if isinstance(m, LoRA2Linear)]
    keys = {(tokens, m.in_features, m.out_features, m.k, m.r, m.bias is not None,
             m.dropout.p if hasattr(m.dropout, "p") else 0.0) for m in layers}
    if eval_tokens:
        keys |= {(eval_tokens, m.in_features, m.out_features, m.k, m.r, m.bias is not None, 0.0) for m in layers}
    return keys


__all__ = ["ADAPTER_PARAMETER_NAMES", "LoRA2Linear", "available_backends", "compiled_op_available",
           "importance_update", "is_conv1d", "is_supported_linear", "lora2_linear", "reference", "warmup",
           "warmup_keys",
           "__version__"]
