"""``LoRA2Linear``: an ``nn.Linear`` with a LoRA² adapter, computed by the fused kernels.

A drop-in for ``nn.Linear`` (it is one: ``weight`` and ``bias`` keep their state-dict keys, so a
pretrained nn.Linear state dict loads into it, and at init its output is the nn.Linear's):

    layer = LoRA2Linear(768, 768, r=8, k=8)              # a new layer, as nn.Linear(768, 768)
    layer = LoRA2Linear.from_linear(model.fc)            # adapt an existing nn.Linear / GPT-2 Conv1D
    layer.merge(); layer.unmerge()                       # fold ΔW into W and back

The frozen weight W (out × in) gets ΔW = s · P · diag(λ ⊙ m) · Q with P = B₂·A₂ and Q = B₁·A₁:

    q_down  = A₁   k × in        q_up   = B₁  r × k       singular_values = λ   r
    p_down  = A₂   k × r         p_up   = B₂  out × k     rank_mask       = m   r   (a buffer)

The forward runs ``ops.lora2_linear(x, W, b, A₁, B₁, λ, A₂, B₂, m, ...)``: the fused kernels fold
the three middle factors into the k × k core C = s·A₂·diag(λ⊙m)·B₁ themselves and compute the base
GEMM, the rank-k adapter (with adapter dropout) and every factor's gradient: 4 launches a training
step (3 in fp32), no torch glue around them.

Several adapters over the one frozen base (``adapters=N``: a learning-rate sweep in one run): every factor
stacked, (N, ...), and each batch's rows split between them (``set_adapter_rows``): row block i goes through
adapter i, in the same launches as one adapter (see triton_kernels/lora_linear.py). ``select_adapter(i)``
gives adapter i as a layer of its own (to merge, save or evaluate it). N = 1 is the plain layer above.

Backends: "auto" (Triton on CUDA tensors when it applies, the PyTorch reference otherwise — on a
GPU a layer the kernels cannot take logs why, once), "triton" (always; an error if it cannot
run), "reference" (always the reference). Scale: s = α / r, constant for the whole run as in the
paper and AdaLoRA; ``scale_by_kept=True`` gives lora2 0.1's α / (kept values) instead.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import four_bit, ops, reference

logger = logging.getLogger(__name__)

ADAPTER_PARAMETER_NAMES = ("q_down", "q_up", "singular_values", "p_down", "p_up")
INITS = ("orthogonal", "normal")


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is only needed to adapt GPT-2 style Conv1D layers
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (any subclass) or transformers' Conv1D: what a user may mean to adapt."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_supported_linear(module: nn.Module) -> bool:
    """nn.Linear with a plain float weight, transformers' Conv1D, or bitsandbytes' 4-bit Linear4bit
    (a LoRA2Linear is an nn.Linear too)."""
    return is_conv1d(module) or (isinstance(module, nn.Linear) and four_bit.unsupported_linear(module) is None)


_warned: set[str] = set()


def _on_gpu(x: torch.Tensor) -> bool:
    """Where "auto" wants the kernels (and explains when it cannot use them)."""
    return x.device.type == "cuda"


def _warn_once(message: str) -> None:
    if message not in _warned and not torch.compiler.is_compiling():
        _warned.add(message)
        logger.warning(message)


class LoRA2Linear(nn.Linear):
    """``nn.Linear`` plus a LoRA² adapter (see the module docstring for the factors and backends)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8, k: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, init: str = "orthogonal", init_std: float = 0.02,
                 backend: str = "auto", scale_by_kept: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, adapters: int = 1) -> None:
        _check_adapter_arguments(r, k, alpha, dropout, init, init_std, backend, adapters)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fan_in_fan_out = False
        self._init_adapter(r, k, alpha, dropout, init, init_std, backend, scale_by_kept, adapters)

    @classmethod
    def from_linear(cls, module: nn.Module, *, r: int = 8, k: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    init: str = "orthogonal", init_std: float = 0.02, backend: str = "auto",
                    scale_by_kept: bool = False, adapters: int = 1) -> LoRA2Linear:
        """Adapt an existing ``nn.Linear`` or GPT-2 ``Conv1D``: the new layer shares its weight and
        bias Parameters (no copy) and freezes them. A Conv1D keeps its transposed (in × out)
        storage and state-dict layout, flagged by ``fan_in_fan_out``."""
        if isinstance(module, LoRA2Linear):
            raise ValueError("this module is already a LoRA2Linear; adapt the plain nn.Linear.")
        if not is_supported_linear(module):
            why = four_bit.unsupported_linear(module) if isinstance(module, nn.Linear) else None
            raise TypeError(f"LoRA2Linear cannot adapt this {type(module).__name__}: "
                            f"{why or 'LoRA2Linear adapts nn.Linear, transformers Conv1D and bitsandbytes Linear4bit'}"
                            "; remove this module from target_modules.")
        _check_adapter_arguments(r, k, alpha, dropout, init, init_std, backend, adapters)
        conv = is_conv1d(module)
        if four_bit.is_linear4bit(module):  # the packed weight's shape is (out·in/2, 1): take the layer's
            four_bit.keep_standard_layout(module)  # undo bitsandbytes' CPU inference repacking, if it happened
            in_features, out_features = module.in_features, module.out_features
        else:
            in_features, out_features = module.weight.shape if conv else module.weight.shape[::-1]
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)  # not nn.Linear.__init__: that would allocate a weight we do not want
        layer.in_features, layer.out_features = int(in_features), int(out_features)
        layer.weight = module.weight
        layer.register_parameter("bias", module.bias)
        layer.fan_in_fan_out = conv
        layer._init_adapter(r, k, alpha, dropout, init, init_std, backend, scale_by_kept, adapters)
        layer.train(module.training)
        return layer

    def __getstate__(self) -> dict:
        # a model's seed source is the model's: a copy or a pickle of the layer alone draws its own seeds
        state = dict(super().__getstate__())
        state.pop("_seed_source", None)
        state.pop("_rows_source", None)
        return state

    def __setstate__(self, state: dict) -> None:
        # torch.save of a whole layer pickles its Parameters as plain ones: a 4-bit weight comes back a
        # uint8 Parameter that still carries its quant_state; make it bitsandbytes' Params4bit again
        super().__setstate__(state)
        weight = self._parameters.get("weight")
        if weight is not None and not self.is_4bit and getattr(weight, "quant_state", None) is not None:
            self._parameters["weight"] = four_bit.as_params4bit(weight)

    def _init_adapter(self, r: int, k: int, alpha: float, dropout: float, init: str, init_std: float, backend: str,
                      scale_by_kept: bool, adapters: int = 1) -> None:
        self.r, self.k, self.alpha, self.adapters = int(r), int(k), float(alpha), int(adapters)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init, self.init_std, self.backend, self.scale_by_kept = init, init_std, backend, scale_by_kept
        self.merged = False
        self._adapter_enabled = True
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Adapter weights are fp32 whatever the base dtype, as PEFT does by default: bf16 factors
        # lose most of their mantissa in the small products.
        factory = {"device": self.weight.device, "dtype": torch.float32}
        lead = () if self.adapters == 1 else (self.adapters,)  # several adapters: each factor stacked
        self.q_down = nn.Parameter(torch.empty(*lead, k, self.in_features, **factory))
        self.q_up = nn.Parameter(torch.empty(*lead, r, k, **factory))
        self.singular_values = nn.Parameter(torch.zeros(*lead, r, **factory))
        self.p_down = nn.Parameter(torch.empty(*lead, k, r, **factory))
        self.p_up = nn.Parameter(torch.empty(*lead, self.out_features, k, **factory))
        self.register_buffer("rank_mask", torch.ones(*lead, r, **factory))  # the allocator's enforced mask
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """Orthonormal (or N(0, init_std²)) factors and λ = 0: ΔW = 0, the layer starts as the base."""
        with torch.no_grad():
            for p in (self.q_down, self.q_up, self.p_down, self.p_up):
                if p.is_meta:
                    continue
                if self.init == "orthogonal":  # orthonormal rows or columns, whichever is shorter (per adapter)
                    for matrix in (p,) if p.dim() == 2 else p:
                        nn.init.orthogonal_(matrix)
                else:
                    nn.init.normal_(p, mean=0.0, std=self.init_std)
            self.singular_values.zero_()
            self.rank_mask.fill_(1.0)

    # --- the method ---------------------------------------------------------------------------------

    @property
    def scale(self) -> float | torch.Tensor:
        """α / r (constant, the paper's); with ``scale_by_kept``, α / kept values, on the device."""
        if self.scale_by_kept:
            return self.alpha / self.rank_mask.sum().clamp_min(1.0)
        return self.alpha / self.r

    def _factor(self, name: str) -> torch.Tensor:
        """A factor in at least fp32 (a model cast to bf16 still folds its core in fp32; fp64 stays)."""
        tensor = getattr(self, name)
        return tensor.to(torch.promote_types(tensor.dtype, torch.float32))

    def core(self) -> torch.Tensor:
        """C = s · A₂ · diag(λ ⊙ m) · B₁, k × k, in at least fp32."""
        self._one_adapter("core()")
        return reference.core(self._factor("singular_values"), self._factor("rank_mask"), self._factor("q_up"),
                              self._factor("p_down"), self.scale)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B₂·C·A₁ (out × in, at least fp32), for merging only: the forward never builds it."""
        return (self._factor("p_up") @ self.core()) @ self._factor("q_down")

    def resolve_backend(self, x: torch.Tensor, weight: torch.Tensor | None = None, quant=None
                        ) -> tuple[str, str | None]:
        """(backend this call uses, why the Triton kernels do not apply or None)."""
        if self.backend == "reference":
            return "reference", "backend='reference' was asked for"
        if self.backend == "auto" and not _on_gpu(x):
            return "reference", f"{x.device.type} tensors; the fused kernels run on CUDA"
        weight = self.weight if weight is None else weight
        if quant is None and self.is_4bit:
            quant = four_bit.quant_of(self.weight)
        reason = ops.triton_unsupported(x, weight, self.q_down, self.r, quant)
        if reason is None:
            return "triton", None
        if self.backend == "triton":
            raise RuntimeError(f"LoRA2Linear(backend='triton') cannot run this call: {reason}.")
        return "reference", reason

    @property
    def is_4bit(self) -> bool:
        """The base is bitsandbytes' packed 4-bit weight (until a merge turns it into a bf16 one)."""
        return four_bit.is_4bit_weight(self.weight)

    def _one_adapter(self, what: str) -> None:
        if self.adapters > 1:
            raise RuntimeError(f"LoRA2Linear.{what} is one adapter's, and this layer holds {self.adapters}: call it on "
                               "layer.select_adapter(i).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        quant = four_bit.quant_of(weight) if self.is_4bit else None
        device_type = x.device.type
        # Under autocast, do what F.linear does (compute in the autocast dtype) and then compute with
        # autocast off, so the fp32 rank-k parts stay fp32.
        if torch.is_autocast_enabled(device_type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.get_autocast_dtype(device_type)
            x = x.to(dtype)
            weight = weight.to(dtype) if quant is None else weight
            # the bias keeps its dtype: the kernels add it in fp32 (one launch less); the other paths cast it
        if self.merged or not self._adapter_enabled:
            bias = bias.to(x.dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                if quant is not None:  # the layer as bitsandbytes computes it: W dequantised in x's dtype
                    return four_bit.linear_4bit(x, quant, bias)
                return F.linear(x, reference.base_weight(weight, self.fan_in_fan_out), bias)
        with torch.autocast(device_type, enabled=False):
            return self._adapted_forward(x, weight, bias, quant)

    def _adapted_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         quant=None) -> torch.Tensor:
        backend, reason = self.resolve_backend(x, weight, quant)  # raises if backend='triton' cannot run
        if reason is not None and _on_gpu(x) and self.backend == "auto":
            _warn_once(f"LoRA2Linear: {reason}; this layer runs the PyTorch reference path.")
        # the adapter sees dropout(x), the base x (PEFT's semantics); in the kernels, or torch's in the reference
        dropout = self.dropout_p if self.training else 0.0
        seed = self._shared_seed(x.device) if dropout > 0 and backend == "triton" else None
        if backend == "triton":  # the kernels read each factor in its own dtype and compute in fp32: no copies
            factors = [getattr(self, name) for name in (*ADAPTER_PARAMETER_NAMES, "rank_mask")]
        else:
            factors = [self._factor(name) for name in (*ADAPTER_PARAMETER_NAMES, "rank_mask")]
            bias = bias.to(x.dtype) if bias is not None else None
        segments = self._segments(x) if self.adapters > 1 else None
        return ops.lora2_linear(x, weight, bias, *factors, self.alpha, self.scale_by_kept, self.fan_in_fan_out,
                                dropout, backend, seed=seed, quant=quant, segments=segments)

    # --- several adapters ---------------------------------------------------------------------------

    def set_adapter_rows(self, rows: list[int]) -> None:
        """Split the next batches between this layer's adapters: the first ``rows[0]`` rows of x (its first
        dimension) go through adapter 0, the next ``rows[1]`` through adapter 1, ... (``AdapterRows`` does it
        for every layer of a model at once)."""
        AdapterRows([self]).set(rows)

    def _segments(self, x: torch.Tensor) -> torch.Tensor:
        source = self.__dict__.get("_rows_source")
        if source is None or source.rows is None:
            raise RuntimeError(f"LoRA2Linear: this layer holds {self.adapters} adapters, and no one said which rows of "
                               "the batch are whose: call layer.set_adapter_rows([rows of adapter 0, ...]) (or "
                               "AdapterRows(model layers).set(...)) before the forward.")
        return source.segments(x, self.adapters)

    @torch.no_grad()
    def select_adapter(self, index: int) -> LoRA2Linear:
        """Adapter ``index`` as a one-adapter layer over the same frozen weight and bias Parameters (its
        factors and mask copied): what a run of that adapter alone would hold, to merge, save or evaluate."""
        if not 0 <= index < self.adapters:
            raise IndexError(f"adapter {index} of a layer with {self.adapters}")
        layer = self.sibling(adapters=1)
        for name in (*ADAPTER_PARAMETER_NAMES, "rank_mask"):
            stacked = getattr(self, name)
            getattr(layer, name).copy_(stacked if self.adapters == 1 else stacked[index])
        layer.merged = self.merged
        return layer

    def sibling(self, adapters: int) -> LoRA2Linear:
        """A new layer of ``adapters`` adapters with this one's settings (r, k, α, dropout, init, backend) over
        the same weight and bias Parameters, its factors freshly initialised."""
        layer = LoRA2Linear.__new__(LoRA2Linear)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = self.in_features, self.out_features
        layer.weight = self.weight
        layer.register_parameter("bias", self.bias)
        layer.fan_in_fan_out = self.fan_in_fan_out
        layer._init_adapter(self.r, self.k, self.alpha, self.dropout_p, self.init, self.init_std, self.backend,
                            self.scale_by_kept, adapters)
        layer.train(self.training)
        return layer

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def _shared_seed(self, device: torch.device) -> torch.Tensor | None:
        """This layer's seed in its model's per-forward draw (``DropoutSeeds``), or None: the op then draws
        one for this call (a launch of its own)."""
        source = self.__dict__.get("_seed_source")
        if source is None:
            return None
        seeds, slot = source[0].seeds, source[1]
        return seeds[slot] if seeds is not None and seeds.device == device else None

    # --- allocator interface -----------------------------------------------------------------------

    @torch.no_grad()
    def set_rank_mask(self, mask: torch.Tensor) -> None:
        """Enforce ``mask`` in the forward and zero the masked singular values (several adapters: a row each)."""
        if mask.shape != self.rank_mask.shape:
            raise ValueError(f"rank mask must have shape {tuple(self.rank_mask.shape)}, got {tuple(mask.shape)}")
        self.rank_mask.copy_(mask)
        self.singular_values.mul_(self.rank_mask.to(self.singular_values.dtype))

    def kept_indices(self, adapter: int | None = None) -> list[int]:
        """The singular values the enforced mask keeps (of adapter ``adapter`` of a several-adapter layer)."""
        if adapter is None:
            self._one_adapter("kept_indices()")
        return torch.nonzero((self.rank_mask if adapter is None else self.rank_mask[adapter]) > 0).flatten().tolist()

    # --- enable / merge ----------------------------------------------------------------------------

    @property
    def adapter_enabled(self) -> bool:
        return self._adapter_enabled

    @adapter_enabled.setter
    def adapter_enabled(self, enabled: bool) -> None:
        """Disabling a merged adapter unmerges it first (as PEFT does): disabled means the base output."""
        if not enabled and self.merged:
            self.unmerge()
        self._adapter_enabled = bool(enabled)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the weight; a second call is a no-op (ΔW is never added twice)."""
        self._one_adapter("merge()")
        if self.merged:
            logger.warning("LoRA2Linear.merge(): already merged, nothing done.")
            return
        self._add_to_weight(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the weight; a no-op when not merged."""
        if not self.merged:
            logger.warning("LoRA2Linear.unmerge(): not merged, nothing done.")
            return
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        if self.is_4bit:
            # A 4-bit weight cannot take ΔW without a second rounding: the merged layer gets a bf16
            # weight (the adapter trained against the dequantised one), and says so.
            weight = four_bit.dequantize(four_bit.quant_of(self.weight), torch.float32) + delta.to(self.weight.device)
            self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
            _warn_once("LoRA2Linear.merge(): the 4-bit base weights become bf16 weights with ΔW folded in (a 4-bit "
                       "weight cannot take ΔW without rounding it again); merge_and_unload(requantize=True) quantises "
                       "them again and logs the error that adds.")
            return
        if self.fan_in_fan_out:
            delta = delta.T
        # Accumulate in fp32 so bf16 / fp16 weights are rounded once, not twice.
        self.weight.copy_((self.weight.float() + delta.to(self.weight.device)).to(self.weight.dtype))

    def to_base_layer(self) -> nn.Module:
        """The plain nn.Linear (or Conv1D) holding this layer's weight and bias Parameters (merged or
        not, as they are now): what unloading the adapter puts back."""
        if self.is_4bit:  # still packed (not merged): bitsandbytes' own layer around the same Parameters
            state = self.weight.quant_state
            base = four_bit.bnb().nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                                compute_dtype=state.dtype, quant_type=state.quant_type,
                                                compress_statistics=bool(state.nested), device="meta")
            base.weight = self.weight
            if self.bias is not None:
                base.bias = self.bias
            base.train(self.training)
            four_bit.keep_standard_layout(base)
            return base
        with torch.device("meta"):
            if self.fan_in_fan_out:
                base = _conv1d_class()(self.out_features, self.in_features)
            else:
                base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        base.train(self.training)
        return base

    # --- state dict: whether W already holds ΔW ------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # A merged layer's W holds ΔW: without this flag, loading its state dict into a fresh layer would
        # add ΔW a second time in the forward.
        destination[prefix + "merged"] = torch.tensor(self.merged)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        merged = state_dict.pop(prefix + "merged", None)  # absent in state dicts older than the flag: unmerged
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if merged is not None:
            self.merged = bool(merged)

    # --- accounting --------------------------------------------------------------------------------

    def adapter_parameter_count(self, kept: int | None = None) -> int:
        """Trainable adapter parameters; with ``kept`` singular values, the count after pruning
        (a pruned λ_i leaves row i of B₁ and column i of A₂ dead)."""
        kept = self.r if kept is None else kept
        return self.adapters * (self.k * (self.in_features + self.out_features) + kept * (2 * self.k + 1))

    def extra_repr(self) -> str:
        kept = "?" if self.rank_mask.is_meta else "+".join(str(int(m.sum().item())) for m in self.rank_mask.view(-1, self.r))
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, k={self.k}, alpha={self.alpha:g}, kept={kept}/{self.r}, backend={self.backend}"
                f"{f', adapters={self.adapters}' if self.adapters > 1 else ''}"
                f"{', fan_in_fan_out' if self.fan_in_fan_out else ''}{', merged' if self.merged else ''}"
                f"{', 4-bit ' + self.weight.quant_state.quant_type if self.is_4bit else ''}")


class AdapterRows:
    """Which rows of each batch go through which adapter, for a model's several-adapter layers at once.

    ``set(rows)`` once a batch: adapter i takes the next ``rows[i]`` entries of the input's first dimension
    (sequences, for a transformer's (batch, tokens, features) activations). Each layer turns it into the
    kernels' segment table (token offsets, on the device) at its first call; the layers of one forward share
    the tensor, one small copy to the device per batch and shape, not one per projection."""

    def __init__(self, layers: list[LoRA2Linear]) -> None:
        self.rows: list[int] | None = None
        self._tables: dict[tuple, torch.Tensor] = {}
        for layer in layers:
            layer._rows_source = self

    def set(self, rows: list[int]) -> None:
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in rows):
            raise ValueError(f"adapter rows must be counts (integers >= 0), got {rows}")
        self.rows = list(rows)
        self._tables.clear()

    def segments(self, x: torch.Tensor, adapters: int) -> torch.Tensor:
        rows = self.rows
        if len(rows) != adapters:
            raise ValueError(f"LoRA2Linear holds {adapters} adapters but the batch was split {len(rows)} ways "
                             f"({rows}); give one row count per adapter (0 for an adapter with none).")
        if x.dim() < 2 or x.shape[0] != sum(rows):
            raise ValueError(f"the batch has {x.shape[0] if x.dim() else 0} rows but the adapters' counts {rows} add "
                             f"up to {sum(rows)}: set the rows of this batch (AdapterRows.set).")
        per_row = x.numel() // (x.shape[-1] * max(x.shape[0], 1))  # tokens a row (a sequence's length)
        key = (per_row, x.device)
        if key not in self._tables:
            bounds = [0]
            for n in rows:
                bounds.append(bounds[-1] + n * per_row)
            self._tables[key] = torch.tensor(bounds, dtype=torch.int32, device=x.device)
        return self._tables[key]


class DropoutSeeds:
    """One dropout seed per adapted layer of a model, drawn on the device in one launch per forward.

    Registered as a forward pre-hook on the model's root (``LoRA2Model`` does it): each training forward
    draws a fresh int64 tensor of seeds with torch's generator, and each layer with adapter dropout reads its
    slot, so the kernels' masks cost one launch per model step instead of one per projection. Nothing
    changes on the host between steps: a captured graph replays the draw, and torch.utils.checkpoint's
    recompute (inside the backward, after this forward) finds the same tensor, so the same masks. A layer
    called outside the model's forward, or on another device than the first adapted layer, draws its own.
    A layer called twice in one forward (shared weights) uses its seed twice: the same mask for both calls.
    """

    def __init__(self, root: nn.Module, layers: list[LoRA2Linear]) -> None:
        self.layers = [layer for layer in layers if layer.dropout_p > 0]
        self.seeds: torch.Tensor | None = None
        for slot, layer in enumerate(self.layers):
            layer._seed_source = (self, slot)
        self.handle = root.register_forward_pre_hook(self._draw) if self.layers else None

    def _draw(self, module: nn.Module, args) -> None:
        if module.training:
            self.seeds = ops.draw_seeds(len(self.layers), self.layers[0].q_down.device)

    def remove(self) -> None:
        """Detach from the model (unloading the adapters): the layers draw their own seeds again."""
        if self.handle is not None:
            self.handle.remove()
        for layer in self.layers:
            layer.__dict__.pop("_seed_source", None)
        self.seeds = None


def _check_adapter_arguments(r: int, k: int, alpha: float, dropout: float, init: str, init_std: float,
                             backend: str, adapters: int = 1) -> None:
    def ok_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def ok_float(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not ok_int(r):
        raise ValueError(f"LoRA2Linear: r={r!r} must be an integer >= 1 (the number of singular values).")
    if not ok_int(k):
        raise ValueError(f"LoRA2Linear: k={k!r} must be an integer >= 1 (the inner width of the two small LoRAs).")
    if not (ok_float(alpha) and alpha > 0):
        raise ValueError(f"LoRA2Linear: alpha={alpha!r} must be a finite number > 0.")
    if not (ok_float(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA2Linear: dropout={dropout!r} must be in [0, 1).")
    if init not in INITS:
        raise ValueError(f"LoRA2Linear: init={init!r} must be one of {INITS}.")
    if not (ok_float(init_std) and init_std > 0):
        raise ValueError(f"LoRA2Linear: init_std={init_std!r} must be a finite number > 0.")
    if backend not in ops.BACKENDS:
        raise ValueError(f"LoRA2Linear: backend={backend!r} must be one of {ops.BACKENDS}.")
    if not ok_int(adapters):
        raise ValueError(f"LoRA2Linear: adapters={adapters!r} must be an integer >= 1 (adapters over the one base).")
