"""The torch layer over the fused kernels: ``lora2_linear(x, W, b, A₁, B₁, λ, A₂, B₂, m, ...)``, autograd.

    y = x·Wᵀ + b + d(x)·ΔWᵀ,   ΔW = s·B₂·A₂·diag(λ⊙m)·B₁·A₁,   s = α/r (or α/kept),   d: adapter dropout

``backend="triton"`` runs triton_kernels/lora_linear.py: the whole layer, core included, in one
launch forward (plus one cast launch for half inputs) and two backward, every factor's gradient
out of the kernels. ``backend="reference"`` runs lora2_kernels/reference.py under plain autograd
(what CPU tensors use). Both have the same contract; the tests hold the first to a float64 oracle.

Two entry points to the same host functions, because they cost differently:

- eager: ``LoRA2Function``, a plain autograd.Function (a custom op's dispatch costs ~30 µs more per
  call on the host, which adds up over the ~150 adapted layers of a 1B model);
- under ``torch.compile``: the ``lora2::lora2_linear`` / ``lora2::lora2_linear_backward`` custom ops,
  with fake implementations whose outputs match the real ones (shape, dtype and strides) and
  registered autograd, so dynamo, AOTAutograd and inductor treat the kernels as opaque ops: no graph
  break, and nothing traces into a Triton launch.

Saved for the backward: x, the fp32 rank-k hidden h = d(x)·A₁ᵀ and (half inputs) B₂ in x's dtype;
nothing out × in is ever built. The dropout mask is not saved either: the backward regenerates it
from the seed, an int64 tensor on x's device that the kernels read there. It is drawn on the device by
torch's generator (one draw per call here, or one for every layer of a model per forward, see
``linear.DropoutSeeds``), so no launch takes a host value that changes between steps: a captured CUDA
graph replays a new draw, torch.utils.checkpoint's recompute restores the same one, and a new seed
each step is data, not a recompile.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os

import torch
import torch.nn.functional as F

from . import reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")
FACTOR_NAMES = ("q_down", "q_up", "singular_values", "p_down", "p_up")


_KERNELS = None


def triton_kernels():
    """The Triton kernel module (imported on first use: importing Triton costs about a second)."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_kernels as module

        _KERNELS = module
    return _KERNELS


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unsupported(x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, r: int = 1, quant=None) -> str | None:
    """Why the Triton kernels cannot run this call, or None when they can."""
    if not triton_importable():
        return "Triton is not installed (it comes with CUDA builds of PyTorch on Linux)"
    if x.device.type != "cuda" and not (triton_interpreting() and x.device.type == "cpu"):
        return (f"the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); "
                f"the input is on {x.device.type}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernels take float16, bfloat16 or float32 inputs, not {x.dtype}"
    if quant is not None:
        from .four_bit import kernel_unsupported

        reason = kernel_unsupported(quant)
        if reason is not None:
            return reason
    elif weight.dtype != x.dtype:
        return f"the input is {x.dtype} but the weight is {weight.dtype} (outside autocast they must match)"
    if down.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernels take float16, bfloat16 or float32 adapter factors, not {down.dtype}"
    limit = triton_kernels().MAX_RANK
    if down.shape[-2] > limit or r > limit:
        return f"k={down.shape[-2]}, r={r}: the kernels cover k and r up to {limit}"
    return None


def _factors(q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha, scale_by_kept, segments=None):
    return triton_kernels().Factors(q_down, q_up, singular_values, p_down, p_up, rank_mask, float(alpha),
                                    bool(scale_by_kept), segments)


def _gradients(grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The kernels' factor gradients (already in each factor's dtype), in the factors' order."""
    return [grads[name] for name in FACTOR_NAMES]


def draw_seeds(count: int, device: torch.device | str) -> torch.Tensor:
    """``count`` independent 64-bit dropout seeds (int64) drawn on ``device`` by torch's generator: one launch,
    which CUDA graphs and torch.utils.checkpoint treat as any torch random op (new values each replay, the
    same ones in a recompute)."""
    info = torch.iinfo(torch.int64)
    return torch.randint(info.min, info.max, (count,), dtype=torch.int64, device=device)


# --- eager: autograd.Function ------------------------------------------------------------------------


class LoRA2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha, scale_by_kept,
                fan_in_fan_out, dropout_p, seed, quant=None, segments=None):
        f = _factors(q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha, scale_by_kept, segments)
        y, hidden, b2 = triton_kernels().lora2_forward(x, weight, bias, f, fan_in_fan_out, dropout_p, seed, quant)
        ctx.save_for_backward(x, weight, q_down, q_up, singular_values, p_down, p_up, rank_mask, hidden, b2, seed,
                              segments)
        ctx.settings = (alpha, scale_by_kept, fan_in_fan_out, dropout_p, bias is not None)
        ctx.quant = quant  # a 4-bit weight's absmax and code tables (frozen: no gradient)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *params, rank_mask, hidden, b2, seed, segments = ctx.saved_tensors
        alpha, scale_by_kept, fan_in_fan_out, dropout_p, has_bias = ctx.settings
        needs = ctx.needs_input_grad
        f = _factors(*params, rank_mask, alpha, scale_by_kept, segments)
        grad_x, grad_w, grad_b, grads = triton_kernels().lora2_backward(
            grad_y.contiguous(), x, weight, f, hidden, b2, fan_in_fan_out, dropout_p, seed,
            needs_input_grad=needs[0], needs_weight_grad=needs[1] and ctx.quant is None,
            needs_bias_grad=needs[2] and has_bias, quant=ctx.quant)
        return (grad_x, grad_w, grad_b, *_gradients(grads), None, None, None, None, None, None, None, None)


# --- torch.compile: custom ops ------------------------------------------------------------------------


# A 4-bit W enters the ops as its tensors (custom ops take tensors and scalars, not a Quant4): weight is
# the packed bytes, then absmax, code, the double quantisation's absmax2 / code2 / offset (None when
# not nested), its blocksizes, and the layer's out_features (the packed shape does not say it).
def _quant(weight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features):
    if absmax is None:
        return None
    return triton_kernels().Quant4(packed=weight, absmax=absmax, code=code, blocksize=blocksize,
                                   shape=(out_features, in_features), absmax2=absmax2, code2=code2,
                                   blocksize2=blocksize2, offset=offset if offset is not None else 0.0)


def _quant_tensors(quant) -> tuple:
    """The op arguments of a Quant4 (or of none), in _quant's order after weight."""
    if quant is None:
        return (None, None, None, None, None, 0, 256, 0)
    offset = quant.offset if isinstance(quant.offset, torch.Tensor) else None
    return (quant.absmax, quant.code, quant.absmax2, quant.code2, offset, int(quant.blocksize),
            int(quant.blocksize2), int(quant.shape[0]))


@torch.library.custom_op("lora2::lora2_linear", mutates_args=())
def lora2_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q_down: torch.Tensor,
                    q_up: torch.Tensor, singular_values: torch.Tensor, p_down: torch.Tensor, p_up: torch.Tensor,
                    rank_mask: torch.Tensor, alpha: float, scale_by_kept: bool, fan_in_fan_out: bool,
                    dropout_p: float, seed: torch.Tensor | None, absmax: torch.Tensor | None = None,
                    code: torch.Tensor | None = None, absmax2: torch.Tensor | None = None,
                    code2: torch.Tensor | None = None, offset: torch.Tensor | None = None, blocksize: int = 0,
                    blocksize2: int = 256, out_features: int = 0, segments: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, B₂ᵀ in x's dtype), the last an empty tensor where B₂ already has that dtype (an output
    may not alias an input)."""
    f = _factors(q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha, scale_by_kept, segments)
    quant = _quant(weight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, x.shape[-1])
    y, hidden, b2 = triton_kernels().lora2_forward(x, weight, bias, f, fan_in_fan_out, dropout_p, seed, quant)
    return y, hidden, (b2 if triton_kernels().factors_cast(f, x.dtype) else x.new_empty(0))


@lora2_linear_op.register_fake
def _lora2_linear_fake(x, weight, bias, q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha, scale_by_kept,
                       fan_in_fan_out, dropout_p, seed, absmax=None, code=None, absmax2=None, code2=None, offset=None,
                       blocksize=0, blocksize2=256, out_features=0, segments=None):
    if absmax is None:
        out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    cast = q_down.dtype != x.dtype or p_up.dtype != x.dtype
    k = p_up.shape[-1]
    return (x.new_empty((*x.shape[:-1], out_features)), x.new_empty((*x.shape[:-1], k), dtype=torch.float32),
            x.new_empty((k, p_up.numel() // k)) if cast else x.new_empty(0))


@torch.library.custom_op("lora2::lora2_linear_backward", mutates_args=())
def lora2_linear_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, q_down: torch.Tensor, q_up: torch.Tensor,
    singular_values: torch.Tensor, p_down: torch.Tensor, p_up: torch.Tensor, rank_mask: torch.Tensor,
    hidden: torch.Tensor, b2: torch.Tensor, alpha: float, scale_by_kept: bool, fan_in_fan_out: bool, dropout_p: float,
    seed: torch.Tensor | None, needs_input_grad: bool, needs_weight_grad: bool, needs_bias_grad: bool,
    absmax: torch.Tensor | None = None, code: torch.Tensor | None = None, absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None, offset: torch.Tensor | None = None, blocksize: int = 0, blocksize2: int = 256,
    out_features: int = 0, segments: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[dX, dW, db, dA₁, dB₁, dλ, dA₂, dB₂]; a gradient that was not asked for is an empty tensor
    (custom ops cannot return None). Every output is a fresh contiguous tensor, as the fake says."""
    params = (q_down, q_up, singular_values, p_down, p_up)
    f = _factors(*params, rank_mask, alpha, scale_by_kept, segments)
    quant = _quant(weight, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, x.shape[-1])
    grad_x, grad_w, grad_b, grads = triton_kernels().lora2_backward(
        grad_y, x, weight, f, hidden, b2 if b2.numel() else p_up, fan_in_fan_out, dropout_p, seed,
        needs_input_grad=needs_input_grad, needs_weight_grad=needs_weight_grad, needs_bias_grad=needs_bias_grad,
        quant=quant)
    return [t if t is not None else x.new_empty(0) for t in (grad_x, grad_w, grad_b)] + _gradients(grads)


@lora2_linear_backward_op.register_fake
def _lora2_linear_backward_fake(grad_y, x, weight, q_down, q_up, singular_values, p_down, p_up, rank_mask, hidden, b2,
                                alpha, scale_by_kept, fan_in_fan_out, dropout_p, seed, needs_input_grad,
                                needs_weight_grad, needs_bias_grad, absmax=None, code=None, absmax2=None, code2=None,
                                offset=None, blocksize=0, blocksize2=256, out_features=0, segments=None):
    if absmax is None:
        out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return [x.new_empty(x.shape) if needs_input_grad else x.new_empty(0),
            weight.new_empty(weight.shape) if needs_weight_grad else x.new_empty(0),
            grad_y.new_empty((out_features,)) if needs_bias_grad else x.new_empty(0),
            *(p.new_empty(p.shape) for p in (q_down, q_up, singular_values, p_down, p_up))]


def _setup_context(ctx, inputs, output):
    x, weight, bias, q_down, q_up, singular_values, p_down, p_up, rank_mask, *settings = inputs
    alpha, scale_by_kept, fan_in_fan_out, dropout_p, seed, *quant = settings
    quant = quant or _quant_tensors(None)
    segments = quant[8] if len(quant) > 8 else None
    absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features = quant[:8]
    ctx.save_for_backward(x, weight, q_down, q_up, singular_values, p_down, p_up, rank_mask, output[1], output[2],
                          seed, segments, absmax, code, absmax2, code2, offset)
    ctx.settings = (alpha, scale_by_kept, fan_in_fan_out, dropout_p, bias is not None, blocksize, blocksize2,
                    out_features)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_op(ctx, grad_y, grad_hidden, grad_b2):
    (x, weight, q_down, q_up, singular_values, p_down, p_up, rank_mask, hidden, b2, seed, segments,
     *quant_tensors) = ctx.saved_tensors
    alpha, scale_by_kept, fan_in_fan_out, dropout_p, has_bias, *quant_sizes = ctx.settings
    needs = ctx.needs_input_grad
    four_bit = quant_tensors[0] is not None
    grads = torch.ops.lora2.lora2_linear_backward(
        grad_y.contiguous(), x, weight, q_down, q_up, singular_values, p_down, p_up, rank_mask, hidden, b2, alpha,
        scale_by_kept, fan_in_fan_out, dropout_p, seed, needs[0], needs[1] and not four_bit, needs[2] and has_bias,
        *quant_tensors, *quant_sizes, segments)
    grad_x, grad_w, grad_b, *factor_grads = grads
    return (grad_x if needs[0] else None, grad_w if needs[1] and not four_bit else None,
            grad_b if needs[2] and has_bias else None,
            *(g if need else None for g, need in zip(factor_grads, needs[3:8])), *([None] * (len(needs) - 8)))


lora2_linear_op.register_autograd(_backward_op, setup_context=_setup_context)


# --- the public function -------------------------------------------------------------------------------


def reference_forward(x, weight, bias, q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha: float,
                      scale_by_kept: bool = False, fan_in_fan_out: bool = False, dropout_p: float = 0.0, quant=None,
                      segments: torch.Tensor | None = None):
    """The same layer through lora2_kernels/reference.py (plain autograd; torch's dropout RNG). A 4-bit
    weight (``quant``) is dequantised whole, in x's dtype, for this call. Several adapters (stacked factors,
    ``segments``): each segment of x's rows (flattened) through its adapter, one call each."""
    if segments is not None:
        rows = x.reshape(-1, x.shape[-1])
        bounds = segments.tolist()
        parts = [reference_forward(rows[start:end], weight, bias, *(t[i] for t in (q_down, q_up, singular_values,
                                                                                 p_down, p_up, rank_mask)),
                                   alpha, scale_by_kept, fan_in_fan_out, dropout_p, quant)
                 for i, (start, end) in enumerate(itertools.pairwise(bounds))]
        y = torch.cat(parts)
        return y.view(*x.shape[:-1], y.shape[-1])
    base = None
    if quant is not None:  # W dequantised for the GEMM and again for dX, never kept by autograd
        from .four_bit import linear_4bit

        base = linear_4bit(x, quant, bias)
    scale = alpha / rank_mask.sum().clamp_min(1.0) if scale_by_kept else alpha / singular_values.shape[0]
    up = p_up @ reference.core(singular_values, rank_mask, q_up, p_down, scale)
    adapter_x = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else None
    return reference.lora_linear_forward(x, weight, bias, q_down, up, fan_in_fan_out, adapter_x=adapter_x,
                                         base=base)[0]


def lora2_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q_down: torch.Tensor,
                 q_up: torch.Tensor, singular_values: torch.Tensor, p_down: torch.Tensor, p_up: torch.Tensor,
                 rank_mask: torch.Tensor, alpha: float, scale_by_kept: bool = False, fan_in_fan_out: bool = False,
                 dropout_p: float = 0.0, backend: str = "triton", seed: torch.Tensor | None = None,
                 quant=None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """A LoRA² layer's output with autograd, through the fused kernels or the reference.

    x: (..., in); weight: out × in (in × out with ``fan_in_fan_out``, GPT-2's Conv1D); q_down: k × in;
    q_up: r × k; singular_values, rank_mask: r; p_down: k × r; p_up: out × k (the factors contiguous).
    ``dropout_p`` > 0: the adapter sees dropout(x), the base x (a new mask each call unless ``seed``, an
    int64 tensor on x's device whose first element is the seed, is given). ``backend``: "triton" or "reference". ``quant``: W is
    bitsandbytes' packed 4-bit weight and this (``Quant4``) its tables; the kernels dequantise it.

    Several adapters over the one base (one launch each way for all of them): every factor stacked,
    (adapters, ...), and ``segments`` their rows: an int32 tensor of adapters + 1 ascending offsets into x's
    rows (flattened to tokens × in) from 0 to the token count, on x's device (the kernels read it there;
    nothing is read on the host). Rows [segments[i], segments[i + 1]) go through adapter i.
    """
    if quant is not None:
        weight = quant.packed
        out_features, in_features = quant.shape
    else:
        in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"lora2_linear: the input's last dimension is {x.shape[-1]} but the layer takes "
                         f"{in_features} features (weight {tuple(weight.shape)}); pass (..., {in_features}) inputs.")
    _check_adapters(x, (q_down, q_up, singular_values, p_down, p_up, rank_mask), segments)
    if backend == "reference":
        return reference_forward(x, weight, bias, q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha,
                                 scale_by_kept, fan_in_fan_out, dropout_p, quant, segments)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'reference' here, got {backend!r}.")
    x = x.contiguous() if x.stride(-1) != 1 else x
    # the kernels index the factors, the mask and the bias as contiguous tensors (no-ops when they are)
    q_down, q_up, singular_values, p_down, p_up, rank_mask = (
        t.contiguous() for t in (q_down, q_up, singular_values, p_down, p_up, rank_mask))
    bias = bias.contiguous() if bias is not None else None
    if quant is None:
        out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    if not (q_down.dim() == p_up.dim() and q_down.shape[-1] == in_features and p_up.shape[-2] == out_features
            and p_up.shape[-1] == q_down.shape[-2]):
        raise ValueError(f"lora2_linear: q_down {tuple(q_down.shape)} and p_up {tuple(p_up.shape)} do not fit a layer "
                         f"of {in_features} → {out_features} features (q_down must be k × {in_features}, p_up "
                         f"{out_features} × k).")
    if dropout_p > 0 and seed is None:  # drawn on the device by torch's generator (graph-safe)
        seed = draw_seeds(1, x.device)
    elif seed is not None and seed.device != x.device:
        seed = seed.to(x.device)
    if torch.compiler.is_compiling():
        return torch.ops.lora2.lora2_linear(x, weight, bias, q_down, q_up, singular_values, p_down, p_up, rank_mask,
                                            float(alpha), bool(scale_by_kept), fan_in_fan_out, float(dropout_p),
                                            seed, *_quant_tensors(quant), segments)[0]
    return LoRA2Function.apply(x, weight, bias, q_down, q_up, singular_values, p_down, p_up, rank_mask, alpha,
                               scale_by_kept, fan_in_fan_out, dropout_p, seed, quant, segments)


def _check_adapters(x: torch.Tensor, factors: tuple, segments: torch.Tensor | None) -> None:
    """Stacked factors come with ``segments`` that fit them, and 2-D ones without (shapes only: the offsets
    themselves stay on the device)."""
    stacked = factors[0].dim() == 3
    if not stacked:
        if segments is not None:
            raise ValueError("lora2_linear: segments are for several adapters, whose factors are stacked "
                             f"(adapters, ...); q_down is {tuple(factors[0].shape)}.")
        return
    adapters = factors[0].shape[0]
    names = ("q_down", "q_up", "singular_values", "p_down", "p_up", "rank_mask")
    dims = (3, 3, 2, 3, 3, 2)
    wrong = [f"{n} {tuple(t.shape)}" for n, t, d in zip(names, factors, dims) if t.dim() != d or t.shape[0] != adapters]
    if wrong:
        raise ValueError(f"lora2_linear: q_down holds {adapters} adapters, but not every factor is stacked alike: "
                         f"{', '.join(wrong)}; stack each factor over the adapters (torch.stack).")
    if segments is None or segments.dim() != 1 or segments.numel() != adapters + 1 or segments.dtype != torch.int32:
        got = "none" if segments is None else f"{segments.dtype} of shape {tuple(segments.shape)}"
        raise ValueError(f"lora2_linear: {adapters} adapters need segments, an int32 tensor of {adapters + 1} row "
                         f"offsets (0, …, tokens), got {got}.")
    if segments.device != x.device:
        raise ValueError(f"lora2_linear: segments are on {segments.device}, the input on {x.device}: build them on "
                         "the input's device (the kernels read them there).")
