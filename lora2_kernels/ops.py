"""The torch layer over the fused kernels: ``lora_linear(x, W, b, down, up)`` with autograd.

    y = x·Wᵀ + b + (x·downᵀ)·upᵀ

``backend="triton"`` runs triton_kernels/lora_linear.py (one fused launch forward, three
backward); ``backend="reference"`` runs lora2_kernels/reference.py under plain autograd (what CPU
tensors use). Both have the same contract, and the tests hold the first to the second.

Two entry points to the same host functions, because they cost differently:

- eager: ``LoRALinearFunction``, a plain autograd.Function (a custom op's dispatch costs ~30 µs
  more per call on the host, which adds up over the ~150 adapted layers of a 1B model);
- under ``torch.compile``: the ``lora2::lora_linear`` / ``lora2::lora_linear_backward`` custom ops,
  with fake implementations and registered autograd, so dynamo and AOTAutograd treat the kernels
  as opaque ops: no graph break, and nothing traces into a Triton launch.

Only x and the fp32 rank-k hidden h are saved for the backward (plus W, down and up, which exist
anyway); nothing out × in is ever built.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from . import reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")


def triton_kernels():
    """The Triton kernel module (imported on first use: importing Triton costs about a second)."""
    from . import triton_kernels as module

    return module


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unsupported(x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run this call, or None when they can."""
    if not triton_importable():
        return "Triton is not installed (it comes with CUDA builds of PyTorch on Linux)"
    if x.device.type != "cuda" and not (triton_interpreting() and x.device.type == "cpu"):
        return (f"the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); "
                f"the input is on {x.device.type}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernels take float16, bfloat16 or float32 inputs, not {x.dtype}"
    if weight.dtype != x.dtype:
        return f"the input is {x.dtype} but the weight is {weight.dtype} (outside autocast they must match)"
    if down.shape[0] > triton_kernels().MAX_RANK:
        return f"inner width k={down.shape[0]} is above the kernels' maximum of {triton_kernels().MAX_RANK}"
    return None


# --- host functions for both entry points ----------------------------------------------------------


def _forward(x, weight, bias, down, up, fan_in_fan_out: bool, backend: str):
    if backend == "triton":
        return triton_kernels().lora_linear_forward(x, weight, bias, down, up, fan_in_fan_out)
    return reference.lora_linear_forward(x, weight, bias, down, up, fan_in_fan_out)


def _backward(grad_y, x, weight, down, up, hidden, fan_in_fan_out: bool, backend: str, needs: tuple[bool, ...]):
    needs_x, needs_w, needs_b = needs
    if backend == "triton":
        return triton_kernels().lora_linear_backward(grad_y, x, weight, down, up, hidden, fan_in_fan_out,
                                                     needs_input_grad=needs_x, needs_weight_grad=needs_w,
                                                     needs_bias_grad=needs_b)
    grads = reference.lora_linear_backward(grad_y, x, weight, down, up, hidden, fan_in_fan_out, needs_w, needs_b)
    return (grads[0] if needs_x else None, *grads[1:])


# --- eager: autograd.Function ------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, fan_in_fan_out: bool, backend: str):
        y, hidden = _forward(x, weight, bias, down, up, fan_in_fan_out, backend)
        ctx.save_for_backward(x, weight, down, up, hidden)
        ctx.fan_in_fan_out, ctx.backend, ctx.has_bias = fan_in_fan_out, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, down, up, hidden = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_w, grad_b, grad_down, grad_up = _backward(
            grad_y.contiguous(), x, weight, down, up, hidden, ctx.fan_in_fan_out, ctx.backend,
            (needs[0], needs[1], needs[2] and ctx.has_bias))
        return (grad_x, grad_w, grad_b, grad_down if needs[3] else None, grad_up if needs[4] else None, None, None)


# --- torch.compile: custom ops ------------------------------------------------------------------------


@torch.library.custom_op("lora2::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                   up: torch.Tensor, fan_in_fan_out: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, hidden = _forward(x, weight, bias, down, up, fan_in_fan_out, backend)
    return y, hidden


@lora_linear_op.register_fake
def _lora_linear_fake(x, weight, bias, down, up, fan_in_fan_out, backend):
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    hidden_dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.new_empty((*x.shape[:-1], out_features)),
            x.new_empty((*x.shape[:-1], down.shape[0]), dtype=hidden_dtype))


@torch.library.custom_op("lora2::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor,
                            up: torch.Tensor, hidden: torch.Tensor, fan_in_fan_out: bool, backend: str,
                            needs_input_grad: bool, needs_weight_grad: bool,
                            needs_bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """(dX, dW, db, d down, d up); a gradient that was not asked for is an empty tensor (custom ops
    cannot return None)."""
    grads = _backward(grad_y, x, weight, down, up, hidden, fan_in_fan_out, backend,
                      (needs_input_grad, needs_weight_grad, needs_bias_grad))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(grad_y, x, weight, down, up, hidden, fan_in_fan_out, backend, needs_input_grad,
                               needs_weight_grad, needs_bias_grad):
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return (x.new_empty(x.shape) if needs_input_grad else x.new_empty(0),
            weight.new_empty(weight.shape) if needs_weight_grad else x.new_empty(0),
            grad_y.new_empty((out_features,)) if needs_bias_grad else x.new_empty(0),
            down.new_empty(down.shape), up.new_empty(up.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, down, up, fan_in_fan_out, backend = inputs
    ctx.save_for_backward(x, weight, down, up, output[1])
    ctx.fan_in_fan_out, ctx.backend, ctx.has_bias = fan_in_fan_out, backend, bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward_op(ctx, grad_y, grad_hidden):
    x, weight, down, up, hidden = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_w, grad_b, grad_down, grad_up = torch.ops.lora2.lora_linear_backward(
        grad_y.contiguous(), x, weight, down, up, hidden, ctx.fan_in_fan_out, ctx.backend, needs[0], needs[1],
        needs[2] and ctx.has_bias)
    return (grad_x if needs[0] else None, grad_w if needs[1] else None, grad_b if needs[2] and ctx.has_bias else None,
            grad_down if needs[3] else None, grad_up if needs[4] else None, None, None)


lora_linear_op.register_autograd(_backward_op, setup_context=_setup_context)


# --- the public function -------------------------------------------------------------------------------


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, fan_in_fan_out: bool = False, backend: str = "triton") -> torch.Tensor:
    """y = x·Wᵀ + b + (x·downᵀ)·upᵀ with autograd, through the Triton kernels or the reference.

    x: (..., in); weight: out × in (in × out with ``fan_in_fan_out``, GPT-2's Conv1D); down: k × in;
    up: out × k. ``backend`` is "triton" or "reference" (LoRA2Linear resolves "auto" before this).
    """
    if backend == "reference":
        return reference.lora_linear_forward(x, weight, bias, down, up, fan_in_fan_out)[0]
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'reference' here, got {backend!r}.")
    x = x.contiguous() if x.stride(-1) != 1 else x
    if torch.compiler.is_compiling():
        return torch.ops.lora2.lora_linear(x, weight, bias, down, up, fan_in_fan_out, backend)[0]
    return LoRALinearFunction.apply(x, weight, bias, down, up, fan_in_fan_out, backend)
