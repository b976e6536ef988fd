"""LoRA² for users of the Hugging Face ``Trainer``: one callback runs the rank allocator.

    model = get_lora2_model(base, LoRA2Config(...))
    trainer = Trainer(model=model, args=args, ..., callbacks=[LoRA2Callback(model)])

The orthogonality regulariser needs no callback: ``LoRA2Model.forward`` adds it to the loss in
training mode. The allocator runs in ``on_optimizer_step``, where the Trainer has stepped the
optimiser but not yet zeroed the gradients the importance score reads.

Checkpoints: the Trainer saves the model (adapters and rank masks included) but knows nothing of
the allocator's importance averages, so the callback writes them into every checkpoint folder
(``lora2_allocator.safetensors``) and reads them back when ``trainer.train(resume_from_checkpoint=...)``
resumes; without them, importance would silently restart from zero.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .allocator import RankAllocator
from .model import LoRA2Model

logger = logging.getLogger(__name__)

ALLOCATOR_FILE = "lora2_allocator.safetensors"


def _checkpoint_dir(args: Any, step: int) -> Path:
    """The folder the Trainer writes at ``step`` (transformers' PREFIX_CHECKPOINT_DIR naming)."""
    return Path(args.output_dir) / f"checkpoint-{step}"


class LoRA2Callback(TrainerCallback):
    def __init__(self, model: LoRA2Model) -> None:
        self.model = model
        self.allocator: RankAllocator | None = None
        self.budget: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.allocator = RankAllocator(self.model.lora2_layers(), self.model.lora2_config, total_steps=state.max_steps)
        if state.global_step > 0:  # resumed: the Trainer has restored its state, restore the allocator's
            candidates = [Path(args.resume_from_checkpoint)] if isinstance(args.resume_from_checkpoint, str) else []
            candidates.append(_checkpoint_dir(args, state.global_step))
            found = next((c / ALLOCATOR_FILE for c in candidates if (c / ALLOCATOR_FILE).is_file()), None)
            if found is None:
                logger.warning("resuming at step %d but no %s was found in %s: the LoRA² importance averages "
                               "restart from zero (the checkpoint was not written with LoRA2Callback).",
                               state.global_step, ALLOCATOR_FILE, ", ".join(str(c) for c in candidates))
            else:
                self.allocator.load_state_dict(load_file(str(found)))
                logger.info("LoRA² allocator state restored from %s", found)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # state.global_step is incremented after this hook: this is optimiser step global_step + 1.
        self.budget = self.allocator.step(state.global_step + 1)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = _checkpoint_dir(args, state.global_step)
        if self.allocator is not None and folder.is_dir() and state.is_world_process_zero:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.allocator.state_dict().items()}
            save_file(tensors, str(folder / ALLOCATOR_FILE))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and self.budget is not None:
            logs["lora2_budget"] = self.budget
