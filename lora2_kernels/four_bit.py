"""QLoRA²: a bitsandbytes 4-bit (NF4 / FP4) base under a LoRA² adapter.

The frozen base stays packed (half a byte a value, plus one absmax per block of 64): no
full-precision copy of W is kept. The fused kernels dequantise W tile by tile inside their K
loops (``_load_weight`` in triton_kernels/lora_linear.py), in the same launches as the adapter. The
reference path (CPU, and the tests' oracle) dequantises the whole W with ``dequantize`` below for
each call, as bitsandbytes' own CPU forward does; ``dequantize`` is itself checked against
``bitsandbytes.functional.dequantize_4bit``.

Only bitsandbytes' ``Linear4bit`` is taken among the nn.Linear subclasses whose weight is not a
plain (out × in) floating-point tensor; ``unsupported_linear`` says why the others are refused.
"""

from __future__ import annotations

import torch
from torch import nn

BNB_INSTALL = "pip install bitsandbytes>=0.46 (its CPU backend runs without a GPU)"


def bnb():
    """bitsandbytes, or a clear error naming the install command."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"a 4-bit base needs bitsandbytes: {BNB_INSTALL}") from e
    return bitsandbytes


def is_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit (checked by its weight's class, so bitsandbytes need not be imported)."""
    return isinstance(module, nn.Linear) and type(module.weight).__name__ == "Params4bit"


def is_4bit_weight(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "Params4bit"


def unsupported_linear(module: nn.Module) -> str | None:
    """Why LoRA² cannot adapt this nn.Linear subclass, or None (a plain float weight, or Linear4bit)."""
    if is_linear4bit(module):
        if getattr(module.weight, "quant_state", None) is None:
            return ("its 4-bit weight is not quantised yet (bitsandbytes quantises when the layer is moved to a "
                    "device: call .to('cpu') or .to('cuda') first)")
        return None
    weight = getattr(module, "weight", None)
    shape = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else None
    if (not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter)
            or not weight.dtype.is_floating_point or (shape is not None and tuple(weight.shape) != shape)):
        kind = type(weight).__name__ if isinstance(weight, torch.Tensor) else type(weight).__name__
        dtype = getattr(weight, "dtype", None)
        return (f"its weight is a {kind} of {dtype} {tuple(getattr(weight, 'shape', ()))}, not a plain (out × in) "
                "floating-point tensor; LoRA² adapts nn.Linear, transformers' Conv1D and bitsandbytes' 4-bit "
                "Linear4bit (NF4 / FP4)")
    return None


def quant_of(weight: torch.Tensor):
    """The kernels' view (``Quant4``) of a quantised ``Params4bit``."""
    from .ops import triton_kernels

    state = weight.quant_state
    nested = bool(getattr(state, "nested", False))
    out_features, in_features = state.shape
    return triton_kernels().Quant4(
        packed=weight.data.reshape(-1), absmax=state.absmax, code=state.code.float(), blocksize=int(state.blocksize),
        shape=(int(out_features), int(in_features)),
        absmax2=state.state2.absmax.float() if nested else None, code2=state.state2.code.float() if nested else None,
        # the offset stays a tensor: float() here would be a host sync (and a graph break under torch.compile)
        blocksize2=int(state.state2.blocksize) if nested else 256, offset=state.offset if nested else 0.0)


def dequantize(quant, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (out × in) in ``dtype``: code[nibble] · absmax in fp32, rounded once (what the kernels compute)."""
    packed = quant.packed.reshape(-1)
    out_features, in_features = quant.shape
    values = torch.stack([quant.code[(packed >> 4).long()], quant.code[(packed & 15).long()]], dim=1).view(-1)
    if quant.nested:
        absmax = quant.code2[quant.absmax.long()]
        blocks2 = -(-absmax.numel() // quant.blocksize2)
        absmax = torch.nn.functional.pad(absmax, (0, blocks2 * quant.blocksize2 - absmax.numel()))
        absmax = (absmax.view(blocks2, quant.blocksize2) * quant.absmax2[:blocks2, None]).view(-1)
        absmax = absmax[: quant.absmax.numel()] + quant.offset
    else:
        absmax = quant.absmax.float()
    blocks = absmax.numel()
    values = torch.nn.functional.pad(values, (0, max(0, blocks * quant.blocksize - values.numel())))
    values = (values[: blocks * quant.blocksize].view(blocks, quant.blocksize) * absmax[:, None]).view(-1)
    return values[: out_features * in_features].view(out_features, in_features).to(dtype)


class _Linear4bit(torch.autograd.Function):
    """x·Wᵀ + b with W dequantised in the forward and again in the backward, so autograd keeps the packed
    weight rather than W: a step never holds more than one layer's full-precision W (bitsandbytes'
    MatMul4Bit does the same). The reference path's base GEMM over a 4-bit weight."""

    @staticmethod
    def forward(ctx, x, bias, quant):
        ctx.quant = quant
        return torch.nn.functional.linear(x, dequantize(quant, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_y @ dequantize(ctx.quant, grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


def linear_4bit(x: torch.Tensor, quant, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b for a 4-bit W (``Quant4``), W dequantised in x's dtype, never kept."""
    return _Linear4bit.apply(x, bias, quant)


def kernel_unsupported(quant) -> str | None:
    """Why the fused 4-bit kernels do not cover this weight, or None."""
    if quant.packed.numel() * 2 < quant.shape[0] * quant.shape[1]:
        return "the packed 4-bit weight holds fewer values than out × in"
    if quant.code.numel() != 16:
        return f"a 4-bit code table has 16 values, this one {quant.code.numel()}"
    if quant.blocksize < 2 or quant.blocksize % 2:
        return f"blocksize {quant.blocksize}: the kernels take even blocksizes (bitsandbytes uses 64 to 4096)"
    return None


def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = False,
                    compute_dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """``linear`` as a bitsandbytes Linear4bit (quantised on ``device``), the weight freed."""
    b = bnb()
    q = b.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        compute_dtype=compute_dtype or torch.float32, compress_statistics=double_quant,
                        quant_type=quant_type, device="meta")
    q.weight = b.nn.Params4bit(linear.weight.data.float().cpu(), requires_grad=False, quant_type=quant_type,
                               compress_statistics=double_quant, blocksize=64)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(device)


def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = False,
                   skip: tuple[str, ...] = ("lm_head", "classifier", "score"),
                   compute_dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> list[str]:
    """Replace every plain nn.Linear of ``model`` (but the heads in ``skip``: a trained head or a tied
    LM head stays in full precision, as transformers' BitsAndBytesConfig does) by a bitsandbytes
    Linear4bit, in place, one layer at a time. Returns the names quantised.

    This is what ``BitsAndBytesConfig(load_in_4bit=True)`` does to a loaded model, done directly with
    bitsandbytes, so it works where transformers' bitsandbytes path wants a GPU (e.g. the CPU)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type {quant_type!r}: bitsandbytes' 4-bit types are 'nf4' and 'fp4'.")
    bnb()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not any(n == s or n.endswith("." + s) or n.startswith(s + ".") or f".{s}." in n for s in skip)]
    for name in names:
        model.set_submodule(name, quantize_linear(model.get_submodule(name), quant_type, double_quant, compute_dtype,
                                                  device))
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's frozen linear weights as stored: packed 4-bit values plus their absmax
    (and nested tables) for Linear4bit, the tensor for any other linear."""
    total = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        total += weight.numel() * weight.element_size()
        if is_4bit_weight(weight):
            state = weight.quant_state
            total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
            if state.nested:
                total += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
    return total


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every Linear4bit of ``model`` by an nn.Linear holding its dequantised weight in ``dtype``,
    in place; the names replaced."""
    names = [n for n, m in model.named_modules() if is_linear4bit(m)]
    for name in names:
        q = model.get_submodule(name)
        with torch.device("meta"):
            linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        linear.weight = nn.Parameter(dequantize(quant_of(q.weight), dtype), requires_grad=False)
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    return names
