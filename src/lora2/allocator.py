"""Rank allocator: AdaLoRA's budget schedule with LoRA²'s cheap importance score.

Sensitivity of an element θ is I = |θ·∇θ|, smoothed as Ī ← β₁Ī + (1−β₁)I and
Ū ← β₂Ū + (1−β₂)|I − Ī|; its score is s = Ī·Ū. The score of singular value i of a module is

    score_i = s(λ_i) + mean_j s(B₁[i, j]) + mean_j s(A₂[j, i])

using only λ (r), B₁ (r × k) and A₂ (k × r) — never the big A₁ (k × in) or B₂ (out × k), which is
where AdaLoRA spends its scoring time (see ``accounting.py`` for the exact saving).

Every module has the same r and k, so the three small tensors of all modules stack into
(M, r), (M, r, k) and (M, k, r) tensors and the whole update is a fixed number of batched ops.

Budget (total kept singular values): r·M until ``init_warmup``; then a cubic decrease to
``target_rank·M`` at ``total_steps − final_warmup``, masking every ``mask_interval`` steps; the
pattern is frozen during the final warm-up. A masked value is never revived: its score is −∞.
"""

from __future__ import annotations

import torch

from .config import LoRA2Config
from .layer import Lora2Linear


class RankAllocator:
    def __init__(self, layers: dict[str, Lora2Linear], config: LoRA2Config, total_steps: int | None = None) -> None:
        if not layers:
            raise ValueError("RankAllocator needs at least one Lora2Linear layer.")
        self.names = list(layers)
        self.layers = list(layers.values())
        shapes = {(l.r, l.k) for l in self.layers}
        if len(shapes) != 1:
            raise ValueError(f"all adapted modules must share r and k to be allocated jointly, got {sorted(shapes)}")
        (self.r, self.k), = shapes
        self.config = config
        self.total_steps = total_steps if total_steps is not None else config.total_steps
        if self.total_steps is None:
            raise ValueError("RankAllocator needs total_steps (the number of optimiser steps of the run); "
                             "set LoRA2Config.total_steps or pass total_steps=.")
        config.total_steps = self.total_steps
        config.validate()  # warm-ups must fit in total_steps
        m, r, k = len(self.layers), self.r, self.k
        self.initial_budget = r * m
        self.target_budget = config.target_rank * m
        dev = self.layers[0].singular_values.device
        self.state: dict[str, torch.Tensor] = {
            "ema_lambda": torch.zeros(m, r, device=dev), "unc_lambda": torch.zeros(m, r, device=dev),
            "ema_b1": torch.zeros(m, r, k, device=dev), "unc_b1": torch.zeros(m, r, k, device=dev),
            "ema_a2": torch.zeros(m, k, r, device=dev), "unc_a2": torch.zeros(m, k, r, device=dev),
        }

    # --- schedule ------------------------------------------------------------------------------

    def budget_at(self, step: int) -> tuple[int, bool]:
        """(total kept singular values, whether to re-mask) after optimiser step ``step`` (1-based)."""
        cfg = self.config
        decay_end = self.total_steps - cfg.final_warmup
        if step <= cfg.init_warmup:
            return self.initial_budget, False
        if step > decay_end:
            return self.target_budget, False  # frozen pattern: it was set at step == decay_end
        progress = (step - cfg.init_warmup) / (decay_end - cfg.init_warmup)
        budget = self.target_budget + (self.initial_budget - self.target_budget) * (1.0 - progress) ** 3
        return int(budget), step % cfg.mask_interval == 0 or step == decay_end

    # --- importance ----------------------------------------------------------------------------

    def _stacked(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        params = [getattr(l, name) for l in self.layers]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        return torch.stack([p.detach() for p in params]).float(), torch.stack(grads).float()

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold the current gradients into the sensitivity EMAs (call after backward)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for short, name in (("lambda", "singular_values"), ("b1", "q_up"), ("a2", "p_down")):
            value, grad = self._stacked(name)
            sensitivity = (value * grad).abs_()
            ema, unc = self.state[f"ema_{short}"], self.state[f"unc_{short}"]
            ema.mul_(b1).add_(sensitivity, alpha=1 - b1)
            unc.mul_(b2).add_((sensitivity - ema).abs_(), alpha=1 - b2)

    def scores(self) -> torch.Tensor:
        """(M, r) importance of every singular value; −∞ where already masked."""
        s = self.state
        score = (s["ema_lambda"] * s["unc_lambda"]
                 + (s["ema_b1"] * s["unc_b1"]).mean(dim=2)
                 + (s["ema_a2"] * s["unc_a2"]).mean(dim=1))
        return score.masked_fill(self.masks() == 0, float("-inf"))

    def masks(self) -> torch.Tensor:
        return torch.stack([l.rank_mask for l in self.layers])

    # --- masking -------------------------------------------------------------------------------

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> torch.Tensor:
        """Keep the ``budget`` globally highest-scored singular values; mask the rest."""
        scores = self.scores()
        flat = scores.flatten()
        budget = max(0, min(budget, int(torch.isfinite(flat).sum())))
        keep = torch.zeros_like(flat)
        keep[torch.topk(flat, budget, sorted=False).indices] = 1.0
        masks = keep.view_as(scores)
        rows = list(masks.unbind(0))
        torch._foreach_copy_([l.rank_mask for l in self.layers], rows)
        torch._foreach_copy_([l.ranknum for l in self.layers], list(masks.sum(dim=1).unbind(0)))
        torch._foreach_mul_([l.singular_values.data for l in self.layers], rows)
        return masks

    @torch.no_grad()
    def step(self, global_step: int) -> int:
        """Call once per optimiser step, after ``optimizer.step()`` and before ``zero_grad()``.

        Returns the current budget.
        """
        if global_step <= self.total_steps - self.config.final_warmup:
            self.update_importance()
        budget, remask = self.budget_at(global_step)
        if remask:
            self.mask_to_budget(budget)
        return budget

    def current_budget(self) -> int:
        return int(self.masks().sum().item())

    # --- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in self.state.items():
            if key not in state or state[key].shape != value.shape:
                raise ValueError(f"allocator state {key!r} is missing or has the wrong shape; "
                                 "the checkpoint belongs to another model or config.")
            value.copy_(state[key])
