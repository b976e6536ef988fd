"""Rank allocator: AdaLoRA's budget schedule with LoRA²'s cheap importance score.

Sensitivity of an element θ is I = |θ·∇θ|, smoothed as Ī ← β₁Ī + (1−β₁)I and
Ū ← β₂Ū + (1−β₂)|I − Ī|; its score is s = Ī·Ū. The score of singular value i of a module is

    score_i = s(λ_i) + mean_j s(B₁[i, j]) + mean_j s(A₂[j, i])

using only λ (r), B₁ (r × k) and A₂ (k × r) — never the big A₁ (k × in) or B₂ (out × k), which is
where AdaLoRA spends its scoring time (see ``accounting.py`` for the exact saving). The update of
all modules is one call of ``lora2_kernels.importance_update`` (a compiled CPU / CUDA op that reads
the parameters and gradients in place). A step whose gradients are not finite (fp16 steps the
GradScaler skipped) leaves the averages untouched; ``skipped_updates`` counts them.

Budget (total kept singular values): r·M until ``init_warmup``; then a cubic decrease to
``target_rank·M`` at ``total_steps − final_warmup``, masking every ``mask_interval`` steps. The
schedule counts optimiser steps taken by the loop, skipped ones included (as the LR scheduler does).

Masking semantics (``LoRA2Config.pruning``):

- "adalora" (default; the paper's, which are AdaLoRA's): at a masking step the globally
  lowest-scored values are zeroed, but stay trainable: they get gradients, move again, and
  re-compete at the next masking, where the top-k runs over all values. At the end of the decay
  the pattern is fixed and enforced by the layers' ``rank_mask`` for the final warm-up (AdaLoRA
  re-masks every step with frozen scores there: the same thing).
- "monotone" (lora2 0.1): a masked value is masked in the forward from then on (no gradient,
  score −∞, never revived), and ΔW is scaled by α / kept values.

Several adapters trained together (``groups`` = N, lora2.sweep): the layers are N groups of the same
modules, one group an adapter; one importance call scores them all, and each group gets the budget
schedule above over its own modules (its own top-k): what N allocators of N single runs would do.

No host synchronisation: budgets are Python ints from the schedule, scores and masks stay on the
device, and the state follows the parameters to whatever device the model is moved to.
"""

from __future__ import annotations

import dataclasses

import torch

from lora2_kernels import LoRA2Linear, importance_update, reference

from .config import LoRA2Config
from .errors import InputError


class RankAllocator:
    def __init__(self, layers: dict[str, LoRA2Linear], config: LoRA2Config, total_steps: int | None = None,
                 backend: str = "auto", groups: int = 1) -> None:
        if not layers:
            raise InputError("RankAllocator needs at least one LoRA2Linear layer.")
        self.names = list(layers)
        self.layers = list(layers.values())
        shapes = {(l.r, l.k) for l in self.layers}
        if len(shapes) != 1:
            raise InputError(f"all adapted modules must share r and k to be allocated jointly, got {sorted(shapes)}")
        (self.r, self.k), = shapes
        total = total_steps if total_steps is not None else config.total_steps
        if total is None:
            raise InputError("RankAllocator needs total_steps (the number of optimiser steps of the run); "
                             "set LoRA2Config.total_steps or pass total_steps=.")
        self.config = dataclasses.replace(config, total_steps=total)  # a copy: the caller's config is not written
        self.total_steps = total
        self.backend = backend
        self.monotone = self.config.pruning == "monotone"
        m = len(self.layers)
        if groups < 1 or m % groups:
            raise InputError(f"{m} modules do not split into {groups} adapters of the same modules.")
        self.groups = groups
        self.initial_budget = self.r * (m // groups)  # budgets are per group: an adapter's modules
        self.target_budget = self.config.target_rank * (m // groups)
        device = self.layers[0].singular_values.device
        self.state = reference.new_importance_state(m, self.r, self.k, device=device)
        self.scores = torch.zeros(m, self.r, device=device)  # of the last update
        self.pattern = torch.ones(m, self.r, device=device)  # the last masking's kept values
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def decay_end(self) -> int:
        """The step of the last masking; the pattern is fixed after it."""
        return self.total_steps - self.config.final_warmup

    # --- schedule ------------------------------------------------------------------------------

    def budget_at(self, step: int) -> tuple[int, bool]:
        """(total kept singular values, whether to re-mask) after optimiser step ``step`` (1-based)."""
        cfg = self.config
        if step <= cfg.init_warmup:
            return self.initial_budget, False
        if step > self.decay_end:
            return self.target_budget, False  # the pattern set at step == decay_end is enforced
        progress = (step - cfg.init_warmup) / (self.decay_end - cfg.init_warmup)
        budget = self.target_budget + (self.initial_budget - self.target_budget) * (1.0 - progress) ** 3
        return int(budget), step % cfg.mask_interval == 0 or step == self.decay_end

    # --- importance ----------------------------------------------------------------------------

    def _follow_parameters(self) -> torch.device:
        """Move the state to the parameters' device (the model may have moved since construction)."""
        device = self.layers[0].singular_values.device
        if self.scores.is_meta:  # built on a model that was still on the meta device (FSDP's ranks > 0)
            self.state = reference.new_importance_state(len(self.layers), self.r, self.k, device=device)
            self.scores, self.pattern = torch.zeros_like(self.scores, device=device), torch.ones_like(
                self.pattern, device=device)
            self.skipped_updates = torch.zeros_like(self.skipped_updates, device=device)
        elif self.scores.device != device:
            self.state = {name: value.to(device) for name, value in self.state.items()}
            self.scores, self.pattern = self.scores.to(device), self.pattern.to(device)
            self.skipped_updates = self.skipped_updates.to(device)
        return device

    @torch.no_grad()
    def update_importance(self) -> torch.Tensor:
        """Fold the current gradients into the sensitivity EMAs (call after backward); the scores."""
        self._follow_parameters()
        self.scores, skipped = importance_update(
            [l.singular_values for l in self.layers], [l.q_up for l in self.layers], [l.p_down for l in self.layers],
            self.state, self.config.beta1, self.config.beta2, backend=self.backend)
        self.skipped_updates += skipped
        return self.scores

    def ranked_scores(self) -> torch.Tensor:
        """(M, r) scores the top-k runs over: all values ("adalora"); −∞ where masked ("monotone")."""
        if self.monotone:
            return self.scores.masked_fill(self.masks() == 0, float("-inf"))
        return self.scores

    def masks(self) -> torch.Tensor:
        """(M, r) masks the layers enforce in their forward."""
        return torch.stack([l.rank_mask for l in self.layers])

    # --- masking -------------------------------------------------------------------------------

    @torch.no_grad()
    def mask_to_budget(self, budget: int, enforce: bool | None = None) -> torch.Tensor:
        """Keep the ``budget`` globally highest-scored singular values (of each group) and zero the others' λ.

        ``enforce``: also write the pattern into the layers' rank masks (monotone pruning always; the
        final masking of "adalora"). Returns the (M, r) pattern.
        """
        self._follow_parameters()
        scores = self.ranked_scores()
        flat = scores.reshape(self.groups, -1)  # one row an adapter: its top-k is its own
        keep = torch.zeros_like(flat)
        keep.scatter_(1, torch.topk(flat, min(max(budget, 0), flat.shape[1]), sorted=False).indices, 1.0)
        keep *= torch.isfinite(flat)  # never revive a masked value (monotone) because the budget asked for more
        pattern = keep.view_as(scores)
        self.pattern = pattern
        rows = list(pattern.unbind(0))
        torch._foreach_mul_([l.singular_values.data for l in self.layers], rows)
        if enforce if enforce is not None else self.monotone:
            torch._foreach_copy_([l.rank_mask for l in self.layers], rows)
        return pattern

    @torch.no_grad()
    def step(self, global_step: int) -> int:
        """Call once per optimiser step, after ``optimizer.step()`` and before ``zero_grad()``.

        Returns the current budget.
        """
        if global_step <= self.decay_end:
            self.update_importance()
        budget, remask = self.budget_at(global_step)
        if remask:
            self.mask_to_budget(budget, enforce=self.monotone or global_step == self.decay_end)
        else:  # masked values get no gradient, but AdamW's momentum and weight decay would still move them
            torch._foreach_mul_([l.singular_values.data for l in self.layers], [l.rank_mask for l in self.layers])
        return budget

    def current_budget(self) -> int:
        """Kept singular values after the last masking (a host sync: for logs and tests)."""
        return int(self.pattern.sum().item())

    # --- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{k: v.clone() for k, v in self.state.items()}, "scores": self.scores.clone(),
                "pattern": self.pattern.clone(), "skipped_updates": self.skipped_updates.clone()}

    def _rows(self, group: int) -> slice:
        per = len(self.layers) // self.groups
        return slice(group * per, (group + 1) * per)

    def group_state_dict(self, group: int) -> dict[str, torch.Tensor]:
        """Adapter ``group``'s part of the state: exactly what a one-adapter allocator of its single run holds."""
        rows = self._rows(group)
        return {**{k: v[rows].clone() for k, v in self.state.items()}, "scores": self.scores[rows].clone(),
                "pattern": self.pattern[rows].clone(), "skipped_updates": self.skipped_updates.clone()}

    @torch.no_grad()
    def load_group_state_dict(self, group: int, state: dict[str, torch.Tensor]) -> None:
        """Load a single run's allocator state (``state_dict`` of a one-adapter allocator) into ``group``."""
        device, rows = self._follow_parameters(), self._rows(group)
        for key, value in self.state.items():
            if key not in state or state[key].shape != value[rows].shape:
                raise InputError(f"allocator state {key!r} is missing or has the wrong shape; "
                                 "the checkpoint belongs to another model or config.")
            value[rows].copy_(state[key].to(device))
        self.scores = self.scores.clone()  # may be the importance op's output, shared with nothing else: own it
        self.scores[rows] = state["scores"].to(device)
        self.pattern = self.pattern.clone()
        self.pattern[rows] = state["pattern"].to(device)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self._follow_parameters()
        for key, value in self.state.items():
            if key not in state or state[key].shape != value.shape:
                raise InputError(f"allocator state {key!r} is missing or has the wrong shape; "
                                 "the checkpoint belongs to another model or config.")
        for key, value in self.state.items():
            value.copy_(state[key].to(device))
        # scores / pattern / skipped_updates are absent from lora2 0.1 checkpoints
        self.scores = state["scores"].to(device) if "scores" in state else reference.importance_scores(self.state)
        self.pattern = state["pattern"].to(device) if "pattern" in state else self.masks().clone()
        if "skipped_updates" in state:
            self.skipped_updates = state["skipped_updates"].to(device)
