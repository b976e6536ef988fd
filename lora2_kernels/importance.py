"""The rank allocator's importance update as one call for all adapted modules.

`importance_update` runs the compiled op ``torch.ops.lora2.importance_update`` (csrc/: a C++ CPU
kernel and a CUDA kernel) when the extension was built for the tensors' device, and otherwise the
PyTorch reference (`reference.importance_update`) after one warning that says how to get the
compiled op. Both read λ, B₁, A₂ and their ``.grad`` of every module in place (no stacked copies
in the compiled op), update the EMA state in place and return ``(scores, skipped)``, where
``skipped`` is a device flag (no host sync) set when a non-finite value or gradient made the call
leave the state unchanged. The op has a fake implementation, so it traces under torch.compile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import reference
from ._extension import compiled_op_available, extension_error

logger = logging.getLogger(__name__)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


if compiled_op_available("cpu"):  # the schema exists only once the extension is loaded

    @torch.library.register_fake("lora2::importance_update")
    def _importance_update_fake(singular_values, q_up, p_down, singular_values_grad, q_up_grad, p_down_grad,
                                ema_lambda, unc_lambda, ema_q_up, unc_q_up, ema_p_down, unc_p_down, beta1, beta2):
        return ema_lambda.new_empty(ema_lambda.shape), ema_lambda.new_empty((), dtype=torch.int32)


def importance_update(singular_values: Sequence[torch.Tensor], q_up: Sequence[torch.Tensor],
                      p_down: Sequence[torch.Tensor], state: dict[str, torch.Tensor], beta1: float,
                      beta2: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the current gradients of every module's λ, B₁, A₂ into ``state``; return (scores, skipped).

    ``backend``: "auto" (the compiled op where built for this device, else the reference with a
    one-time warning), "compiled" (error if it is missing) or "reference".
    """
    if backend not in ("auto", "compiled", "reference"):
        raise ValueError(f"backend must be 'auto', 'compiled' or 'reference', got {backend!r}.")
    device = singular_values[0].device
    grads = ([p.grad for p in singular_values], [p.grad for p in q_up], [p.grad for p in p_down])
    use_compiled = backend != "reference" and compiled_op_available(device.type)
    if backend == "compiled" and not use_compiled:
        raise RuntimeError(f"the compiled importance op is not available for {device.type} tensors: "
                           f"{extension_error(device.type)}")
    if use_compiled:
        return torch.ops.lora2.importance_update(
            list(singular_values), list(q_up), list(p_down), *(list(g) for g in grads),
            *(state[name] for name in reference.STATE_NAMES), float(beta1), float(beta2))
    if backend == "auto" and device.type != "meta":
        _warn_once(device.type, f"lora2_kernels: the compiled importance op is not available for {device.type} "
                                f"tensors ({extension_error(device.type)}); using the PyTorch reference, which "
                                "stacks copies of λ, B₁, A₂ every step.")
    return reference.importance_update(list(singular_values), list(q_up), list(p_down), *grads, state, beta1, beta2)
