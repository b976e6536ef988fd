"""The LoRA² layer: a frozen linear weight plus ΔW = (α/ranknum) · B₂A₂ · diag(λ⊙mask) · B₁A₁.

Shapes (W is out × in):

    q_down  = A₁  k × in     first plane   Q = B₁·A₁ (r × in)
    q_up    = B₁  r × k
    singular_values = λ   r
    p_down  = A₂  k × r      second plane  P = B₂·A₂ (out × r)
    p_up    = B₂  out × k

The forward never builds ΔW. The three middle factors are tiny (k×r, r, r×k), so we first fold
them into one k × k "core" C = (α/ranknum)·A₂·diag(λ⊙mask)·B₁, then fold C into A₁ (k × in, the
size of A₁ itself). What touches the activations is then exactly two thin matmuls,
x → (C·A₁) → B₂, the same work as a plain LoRA of rank k. The gradients that reach λ, B₁ and A₂
through C are exact: autograd differentiates the small products.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_PARAMETER_NAMES = ("q_down", "q_up", "singular_values", "p_down", "p_up")
ADAPTER_BUFFER_NAMES = ("rank_mask", "ranknum")


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the layer itself does not need it
        return None
    return Conv1D


def is_supported_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


class Lora2Linear(nn.Module):
    """Wraps an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored in × out) with a LoRA² adapter."""

    def __init__(self, base_layer: nn.Module, r: int, k: int, alpha: float, dropout: float = 0.0,
                 init: str = "orthogonal", init_std: float = 0.02) -> None:
        super().__init__()
        if not is_supported_linear(base_layer):
            raise TypeError(
                f"LoRA² adapts nn.Linear and transformers' Conv1D layers, not {type(base_layer).__name__}; "
                "remove this module from target_modules."
            )
        self.base_layer = base_layer
        # Conv1D keeps its weight transposed (in × out) and computes x @ W + b.
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        in_features, out_features = (weight.shape if self.fan_in_fan_out else weight.shape[::-1])
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r, self.k, self.alpha = r, k, float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.adapter_enabled = True
        self.fused = True  # False: the plain two-F.linear path, kept as the reference (tests compare them)

        # Adapter weights live in fp32 whatever the base dtype, as PEFT does by default: bf16 factors
        # of std 0.02 lose most of their mantissa in the small products.
        factory = {"device": weight.device, "dtype": torch.float32}
        self.q_down = nn.Parameter(torch.empty(k, self.in_features, **factory))
        self.q_up = nn.Parameter(torch.empty(r, k, **factory))
        self.singular_values = nn.Parameter(torch.zeros(r, **factory))
        self.p_down = nn.Parameter(torch.empty(k, r, **factory))
        self.p_up = nn.Parameter(torch.empty(self.out_features, k, **factory))
        # The mask is the allocator's decision; ranknum (kept singular values) scales ΔW as AdaLoRA does.
        self.register_buffer("rank_mask", torch.ones(r, **factory))
        self.register_buffer("ranknum", torch.tensor(float(r), **factory))
        self.init, self.init_std = init, init_std
        self.reset_adapter_parameters()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def reset_adapter_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.q_down, self.q_up, self.p_down, self.p_up):
                if self.init == "orthogonal":  # orthonormal rows or columns, whichever is shorter
                    nn.init.orthogonal_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=self.init_std)
            self.singular_values.zero_()  # ΔW = 0: the adapted model starts at the base model
            self.rank_mask.fill_(1.0)
            self.ranknum.fill_(float(self.r))

    # --- the method -------------------------------------------------------------------------

    def scale(self) -> torch.Tensor:
        # clamp: a module whose every singular value was pruned contributes nothing, not a NaN.
        return self.alpha / self.ranknum.clamp_min(1.0)

    def core(self) -> torch.Tensor:
        """C = (α/ranknum) · A₂ · diag(λ ⊙ mask) · B₁, a k × k matrix."""
        weighted = self.singular_values * self.rank_mask * self.scale()
        return (self.p_down * weighted) @ self.q_up

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out × in) in fp32 — only for merging and tests; training never calls it."""
        return self.p_up @ (self.core() @ self.q_down)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x as two thin matmuls through the folded k-wide bottleneck."""
        folded_down = self.core() @ self.q_down  # k × in, never out × in
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != folded_down.dtype:
            return F.linear(F.linear(self.dropout(x).to(folded_down.dtype), folded_down), self.p_up).to(x.dtype)
        return F.linear(F.linear(self.dropout(x), folded_down), self.p_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.adapter_enabled:
            return out
        if not self.fused:
            return out + self.adapter_forward(x).to(out.dtype)  # the plain reference path
        # Fused: the up-projection and the residual add are one GEMM (addmm writes W·x + B₂·h into a
        # single output), so no out-sized temporary is made and there is one kernel fewer per layer.
        folded_down = self.core() @ self.q_down
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != folded_down.dtype:
            x = x.to(folded_down.dtype)
        hidden = F.linear(x, folded_down)  # (..., k)
        flat = out.reshape(-1, self.out_features)
        fused = torch.addmm(flat, hidden.reshape(-1, self.k).to(flat.dtype), self.p_up.t().to(flat.dtype))
        return fused.view(out.shape)

    # --- allocator interface -----------------------------------------------------------------

    @torch.no_grad()
    def set_rank_mask(self, mask: torch.Tensor) -> None:
        """Keep the singular values where ``mask`` is 1; zero the rest (they stay zero)."""
        if mask.shape != (self.r,):
            raise ValueError(f"rank mask must have shape ({self.r},), got {tuple(mask.shape)}")
        self.rank_mask.copy_(mask)
        self.ranknum.fill_(float(self.rank_mask.sum()))
        self.singular_values.mul_(self.rank_mask)

    def kept_indices(self) -> list[int]:
        return torch.nonzero(self.rank_mask > 0).flatten().tolist()

    # --- merge -------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight; a second call is a no-op (never adds ΔW twice)."""
        if self.merged:
            logger.warning("Lora2Linear.merge(): already merged, nothing done.")
            return
        self._add_to_weight(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the base weight; a no-op when not merged."""
        if not self.merged:
            logger.warning("Lora2Linear.unmerge(): not merged, nothing done.")
            return
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        if self.fan_in_fan_out:
            delta = delta.T
        # Accumulate in fp32 so bf16/fp16 weights are rounded once, not twice.
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    # --- accounting --------------------------------------------------------------------------

    def adapter_parameter_count(self, kept: int | None = None) -> int:
        """Trainable adapter parameters; with ``kept`` singular values, the count after pruning
        (a pruned λ_i leaves row i of B₁ and column i of A₂ dead)."""
        kept = self.r if kept is None else kept
        return self.k * (self.in_features + self.out_features) + kept * (2 * self.k + 1)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, k={self.k}, "
                f"alpha={self.alpha}, kept={int(self.ranknum.item()) if not self.ranknum.is_meta else '?'}"
                f"{', merged' if self.merged else ''}")


def reference_delta_weight(layer: Lora2Linear) -> torch.Tensor:
    """ΔW by the paper's formula, materialised factor by factor, in float64: the test oracle."""
    p = layer.p_up.double() @ layer.p_down.double()  # P: out × r
    q = layer.q_up.double() @ layer.q_down.double()  # Q: r × in
    lam = layer.singular_values.double() * layer.rank_mask.double()
    return (layer.alpha / max(float(layer.rank_mask.sum()), 1.0)) * (p * lam) @ q

