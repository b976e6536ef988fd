"""LoRA² for users of the Hugging Face ``Trainer``: one callback runs the rank allocator.

    model = get_lora2_model(base, LoRA2Config(...))
    trainer = Trainer(model=model, args=args, ..., callbacks=[LoRA2Callback(model)])

The orthogonality regulariser needs no callback: ``LoRA2Model.forward`` adds it to the loss in
training mode. The allocator runs in ``on_optimizer_step``, where the Trainer has stepped the
optimiser but not yet zeroed the gradients the importance score reads.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .allocator import RankAllocator
from .model import LoRA2Model


class LoRA2Callback(TrainerCallback):
    def __init__(self, model: LoRA2Model) -> None:
        self.model = model
        self.allocator: RankAllocator | None = None
        self.budget: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.allocator = RankAllocator(self.model.lora2_layers(), self.model.lora2_config, total_steps=state.max_steps)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # state.global_step is incremented after this hook: this is optimiser step global_step + 1.
        self.budget = self.allocator.step(state.global_step + 1)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and self.budget is not None:
            logs["lora2_budget"] = self.budget
