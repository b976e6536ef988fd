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

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

BNB_INSTALL = "pip install 'bitsandbytes>=0.46,<0.51' (its CPU backend runs without a GPU)"
BLOCKSIZE = 64  # values per absmax block: what quantize_model uses (bitsandbytes' default for 4 bits)


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes >= 0.50 tries, when it is imported on a CPU with AVX512-BF16 (peft imports it even for a
    run without a 4-bit base), to fetch an optional CPU inference kernel from a hub through the ``kernels``
    package, which logs about the hub, and bitsandbytes logs a warning when it cannot. That kernel serves only
    the repacked inference layout, which lora2 switches off (see ``keep_standard_layout``), so both notices
    are noise a newcomer reads as an error. Only these two messages are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Failed to load CPU gemm_4bit_forward")
                    or "kernels-community/quantization-bitsandbytes" in message)


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_DropOptionalKernelNotice())


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


def keep_standard_layout(module: nn.Module) -> None:
    """Keep every bitsandbytes Linear4bit in ``module`` in the standard packed layout the kernels read.

    bitsandbytes >= 0.48, on a CPU with AVX512-BF16, repacks a Linear4bit's weight into a CPU inference
    layout on its first eval-mode forward without gradients, and rounds its absmax to bf16 while at it: the
    layer's values change, the packed tensor no longer holds (out·in/2) values in order, and the next
    training forward fails inside bitsandbytes. lora2 switches that off per layer (bitsandbytes reads the
    instance flag in every forward) and brings a layer already repacked back to the standard layout (its
    absmax keeps the bf16 rounding bitsandbytes gave it, which is logged)."""
    for name, layer in module.named_modules():
        if not is_linear4bit(layer):
            continue
        layer.support_avx512bf16_for_cpu = False
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
            standard_layout(layer.weight)
            logger.warning("%s had been repacked by bitsandbytes into its CPU inference layout (an eval forward); "
                           "it is back in the standard layout, with the absmax bitsandbytes rounded to bf16",
                           name or type(layer).__name__)


def standard_layout(weight: torch.Tensor) -> None:
    """Undo bitsandbytes' CPU inference repacking of a ``Params4bit`` in place (see keep_standard_layout)."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = bool(getattr(state, "original_nested", False))
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:  # the inverse re-flattens a nested absmax only; a plain one is still (in/64 × out) bf16
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    weight.data, weight.quant_state = data, state


def as_params4bit(weight: torch.Tensor) -> nn.Parameter:
    """A ``Params4bit`` again for a Parameter that lost its class in pickling (torch.save of a whole module
    rebuilds every Parameter as a plain one, keeping its attributes, quant_state among them)."""
    if is_4bit_weight(weight) or getattr(weight, "quant_state", None) is None:
        return weight
    state = weight.quant_state
    return bnb().nn.Params4bit(weight.data, requires_grad=False, quant_state=state, blocksize=int(state.blocksize),
                               compress_statistics=bool(state.nested), quant_type=state.quant_type,
                               quant_storage=weight.dtype, bnb_quantized=True)


def quant_of(weight: torch.Tensor):
    """The kernels' view (``Quant4``) of a quantised ``Params4bit``."""
    from .ops import triton_kernels

    standard_layout(weight)  # a layer the caller let bitsandbytes repack (keep_standard_layout prevents it)
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
                               compress_statistics=double_quant, blocksize=BLOCKSIZE)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to(device)
    keep_standard_layout(q)
    return q


def straddles_rows(linear: nn.Linear) -> bool:
    """A linear whose rows are not a whole number of absmax blocks (in_features not a multiple of 64), so
    blocks straddle rows. bitsandbytes' CPU kernels assume they do not: 0.50's CPU dequantize_4bit returns
    other values than were quantised for an even width such as 160 (its forward computes with them), and its
    CPU inference layout cannot hold a layer narrower than a block. Real models' widths are multiples of 64;
    the fused kernels and lora2's own dequantise take any width (they are tested on 70)."""
    return linear.in_features % BLOCKSIZE != 0


def _named(name: str, patterns: list[str] | str) -> bool:
    """The surgery's rule (lora2.model._matches): a regex matched whole, or a list of names / name suffixes."""
    import re

    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = False,
                   skip: tuple[str, ...] = ("lm_head", "classifier", "score"),
                   compute_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   modules: list[str] | str | None = None) -> list[str]:
    """Replace plain nn.Linear layers of ``model`` by bitsandbytes Linear4bit layers, in place, one layer at a
    time. Returns the names quantised.

    Which: ``modules`` (names or name suffixes, or one regex, as ``target_modules``; lora2 train passes the
    adapter's target modules, so a layer nobody adapts, e.g. BERT's pooler, keeps its precision), or with
    ``modules=None`` every linear but the heads in ``skip`` (a trained head or a tied LM head stays in full
    precision, as transformers' BitsAndBytesConfig does). Never a layer whose rows are not whole blocks
    (``straddles_rows``: bitsandbytes' CPU kernels cannot hold it).

    This is what ``BitsAndBytesConfig(load_in_4bit=True)`` does to a loaded model, done directly with
    bitsandbytes, so it works where transformers' bitsandbytes path wants a GPU (e.g. the CPU)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type {quant_type!r}: bitsandbytes' 4-bit types are 'nf4' and 'fp4'.")
    bnb()

    def wanted(name: str) -> bool:
        if modules is not None:
            return _named(name, modules)
        return not any(name == s or name.endswith("." + s) or name.startswith(s + ".") or f".{s}." in name
                       for s in skip)

    chosen = [n for n, m in model.named_modules() if n and type(m) is nn.Linear and wanted(n)]
    narrow = [n for n in chosen if straddles_rows(model.get_submodule(n))]
    if narrow:
        logger.info("not quantised (in_features not a multiple of %d: bitsandbytes' CPU kernels need whole blocks "
                    "per row): %s", BLOCKSIZE, ", ".join(narrow[:4]) +
                    (f" and {len(narrow) - 4} more" if len(narrow) > 4 else ""))
    names = [n for n in chosen if n not in narrow]
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
