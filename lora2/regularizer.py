"""Orthogonality regulariser of LoRA², computed from k × k Gram matrices only.

In-plane terms (AdaLoRA keeps P's columns and Q's rows orthonormal; LoRA² does it factor by
factor, which is what makes P and Q orthonormal when the factors are):

    ‖A₁A₁ᵀ − I‖_F + ‖B₁ᵀB₁ − I‖_F + ‖A₂A₂ᵀ − I‖_F + ‖B₂ᵀB₂ − I‖_F        (each Gram is k × k)

Cross-plane term — our choice, and why. The two planes of a module are the subspace ΔW reads
from, row(Q) ⊂ ℝ^in, and the subspace it writes to, col(P) ⊂ ℝ^out. We push them to be mutually
orthogonal with

    ‖Q·P‖_F = ‖B₁ · (A₁B₂) · A₂‖_F          (an r × r matrix built from the k × k product A₁B₂)

which is zero exactly when no direction ΔW writes is one it reads, i.e. ΔW² = 0: the update does
not feed back into itself through the residual stream. It only makes sense where both planes live
in one space, so it applies to square modules (in == out: attention projections) and is absent
for the others (MLP up/down), where ℝ^in and ℝ^out are different spaces.

We did not take the research code's form, ‖P·Q‖_F (its ``AB @ aabb``): PQ = B₂(A₂B₁)A₁, and
driving A₂B₁ to zero while λ sits between them drives ΔW = P·diag(λ)·Q to zero too — with r ≥ 2k
one can have A₂B₁ = 0 and A₂·diag(λ)·B₁ = 0 for every λ — and with r = k it contradicts the
in-plane terms outright (B₁, A₂ orthogonal ⇒ ‖A₂B₁‖_F = √k).

The loss is ``weight · mean over modules of (sum of that module's terms)``. Modules are stacked by
shape, so the cost is a handful of batched matmuls whatever the number of modules.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lora2_kernels import LoRA2Linear

from .errors import InputError


def _gram_distance(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye)  # per batch entry; gradient is 0, not NaN, at 0


class OrthogonalRegularizer:
    """Callable returning the (unweighted) mean regulariser over ``layers``."""

    def __init__(self, layers: list[LoRA2Linear]) -> None:
        if not layers:
            raise InputError("OrthogonalRegularizer needs at least one LoRA2Linear layer.")
        self.layers = layers
        by_in: dict[int, list[int]] = defaultdict(list)
        by_out: dict[int, list[int]] = defaultdict(list)
        for i, layer in enumerate(layers):
            by_in[layer.in_features].append(i)
            by_out[layer.out_features].append(i)
        self._by_in = list(by_in.values())
        self._by_out = list(by_out.values())
        square: dict[int, list[int]] = defaultdict(list)
        for i, layer in enumerate(layers):
            if layer.in_features == layer.out_features:
                square[layer.in_features].append(i)
        self._square = list(square.values())

    def terms(self) -> dict[str, torch.Tensor]:
        """Per-term sums over modules (for logging and tests)."""
        layers = self.layers
        q_up = torch.stack([l.q_up for l in layers])      # M × r × k   (B₁)
        p_down = torch.stack([l.p_down for l in layers])  # M × k × r   (A₂)
        out = {
            "b1": _gram_distance(_row_gram(q_up.transpose(1, 2))).sum(),
            "a2": _gram_distance(_row_gram(p_down)).sum(),
            "a1": sum(_gram_distance(_row_gram(_stack(layers, g, "q_down"))).sum() for g in self._by_in),
            "b2": sum(_gram_distance(_row_gram(_stack(layers, g, "p_up").transpose(1, 2))).sum() for g in self._by_out),
        }
        cross = q_up.new_zeros(())
        for group in self._square:
            index = torch.tensor(group, device=q_up.device)
            bridge = _stack(layers, group, "q_down") @ _stack(layers, group, "p_up")   # A₁B₂: n × k × k
            qp = q_up.index_select(0, index) @ bridge @ p_down.index_select(0, index)  # B₁(A₁B₂)A₂: n × r × r
            cross = cross + torch.linalg.matrix_norm(qp).sum()
        out["cross"] = cross
        return out

    def __call__(self) -> torch.Tensor:
        return sum(self.terms().values()) / len(self.layers)


def _row_gram(x: torch.Tensor) -> torch.Tensor:
    """x·xᵀ for a batch of k × n matrices: the k × k Gram matrix of their rows."""
    return x @ x.transpose(1, 2)


def _stack(layers: list[LoRA2Linear], group: list[int], name: str) -> torch.Tensor:
    return torch.stack([getattr(layers[i], name) for i in group])
