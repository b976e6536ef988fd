"""What the training loop fine-tunes: LoRA², or a baseline (full fine-tuning, PEFT LoRA, PEFT AdaLoRA).

The loop in ``train.py`` is the same for every method, so a comparison differs only in the method.
A ``Method`` tells the loop the module to call, what to do after each optimiser step (the rank
allocators), and how to save and restore what it trained.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocator import RankAllocator
from .config import LoRA2Config
from .model import DEFAULT_HEADS, LoRA2Model, get_lora2_model

logger = logging.getLogger(__name__)

METHODS = ("lora2", "lora", "adalora", "full")
TRAINABLE_STATE = "trainable_state.safetensors"  # a PEFT baseline's resumable tensors


class Method:
    """Full fine-tuning; the base class of the adapter methods."""

    name = "full"

    def __init__(self, model: nn.Module, settings: dict[str, Any], total_steps: int) -> None:
        if settings:
            raise ValueError(f"full fine-tuning takes no method settings, got {sorted(settings)}.")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)

    def is_head(self, parameter_name: str) -> bool:
        """Parameters of the freshly initialised task head (they may get their own learning rate)."""
        return any(f"{head}." in parameter_name for head in DEFAULT_HEADS)

    def after_optimizer_step(self, step: int) -> int | None:
        """Called after ``optimizer.step()`` and before ``zero_grad``; returns the rank budget if any."""
        return None

    def regularizer_loss(self) -> float | None:
        return None

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(directory / "model.safetensors"), strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LoRA2Method(Method):
    """LoRA²: the adapters of ``model.py`` plus the rank allocator of ``allocator.py``."""

    name = "lora2"

    def __init__(self, model: nn.Module, settings: dict[str, Any], total_steps: int) -> None:
        self.config = lora2_config(settings, total_steps)
        self.model: LoRA2Model = get_lora2_model(model, self.config)
        self.allocator = RankAllocator(self.model.lora2_layers(), self.config, total_steps)

    def is_head(self, parameter_name: str) -> bool:
        return parameter_name.startswith(tuple(f"base_model.{n}." for n in self.model.modules_to_save))

    def after_optimizer_step(self, step: int) -> int | None:
        return self.allocator.step(step)

    def regularizer_loss(self) -> float | None:
        value = self.model.last_regularizer_loss
        return None if value is None else float(value)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

    def load(self, directory: Path) -> None:
        self.model.load_adapter(directory)

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocator.load_state_dict(state)


class PeftMethod(Method):
    """PEFT's LoRA or AdaLoRA on the same target modules LoRA² uses, as the baselines."""

    def __init__(self, model: nn.Module, settings: dict[str, Any], total_steps: int, adaptive: bool) -> None:
        try:
            import peft
        except ImportError as e:
            raise ImportError("the LoRA / AdaLoRA baselines run on PEFT: pip install 'lora2[compare]' "
                              "(or pip install peft).") from e

        self.name = "adalora" if adaptive else "lora"
        model_type = getattr(model.config, "model_type", None)
        fields = dict(settings)
        fields.setdefault("target_modules", LoRA2Config().resolved_target_modules(model_type))
        heads = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in DEFAULT_HEADS]
        fields.setdefault("modules_to_save", heads or None)
        if adaptive:
            fields.setdefault("total_step", total_steps)
            fields.setdefault("tinit", int(0.1 * total_steps))
            fields.setdefault("tfinal", int(0.3 * total_steps))
            fields.setdefault("deltaT", max(1, total_steps // 50))
            config = peft.AdaLoraConfig(**fields)
        else:
            config = peft.LoraConfig(**fields)
        self.model = peft.get_peft_model(model, config)
        self.adaptive = adaptive

    def is_head(self, parameter_name: str) -> bool:
        return "modules_to_save" in parameter_name

    def after_optimizer_step(self, step: int) -> int | None:
        if not self.adaptive:
            return None
        self.model.base_model.update_and_allocate(step)  # reads the gradients: before zero_grad
        return None

    def save(self, directory: Path) -> None:
        """PEFT's own folder for users, plus every trainable tensor at full size for resuming:
        AdaLoRA's ``save_pretrained`` trims pruned ranks, which a model still training cannot load."""
        from safetensors.torch import save_file

        self.model.save_pretrained(directory)
        state = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(state, str(directory / TRAINABLE_STATE))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / TRAINABLE_STATE))
        parameters = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if state.keys() != parameters.keys():
            raise ValueError(f"{directory} was saved from another {self.name} set-up "
                             f"({len(state)} tensors, this model trains {len(parameters)}); start without --resume.")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(state[name])

    def state_dict(self) -> dict[str, Any]:
        if not self.adaptive:
            return {}
        allocator = self.model.base_model.rankallocator
        state = {k: getattr(allocator, k) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        return {**state, "rank_pattern": self.model.peft_config["default"].rank_pattern}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore AdaLoRA's importance EMAs onto the model's device: checkpoints are read to the CPU,
        and CPU EMAs would meet CUDA gradients at the first allocator step."""
        state = dict(state)
        if "rank_pattern" in state:
            self.model.peft_config["default"].rank_pattern = state.pop("rank_pattern")
        device = next(p for p in self.model.parameters() if p.requires_grad).device
        for key, value in state.items():
            if isinstance(value, dict):
                value = {name: t.to(device) if torch.is_tensor(t) else t for name, t in value.items()}
            setattr(self.model.base_model.rankallocator, key, value)


def lora2_config(settings: dict[str, Any], total_steps: int) -> LoRA2Config:
    """LoRA² settings; warm-ups default to AdaLoRA-like fractions of the run when not given."""
    fields = dict(settings)
    fields.setdefault("init_warmup", int(0.1 * total_steps))
    fields.setdefault("final_warmup", int(0.3 * total_steps))
    fields.setdefault("mask_interval", max(1, total_steps // 50))
    if fields["init_warmup"] + fields["final_warmup"] >= total_steps:
        raise ValueError(
            f"init_warmup ({fields['init_warmup']}) + final_warmup ({fields['final_warmup']}) must be smaller than "
            f"the run's {total_steps} optimiser steps; lower them or train longer.")
    return LoRA2Config(total_steps=total_steps, **fields)


def build_method(name: str, model: nn.Module, settings: dict[str, Any], total_steps: int) -> Method:
    if name == "lora2":
        return LoRA2Method(model, settings, total_steps)
    if name in ("lora", "adalora"):
        return PeftMethod(model, settings, total_steps, adaptive=name == "adalora")
    if name == "full":
        return Method(model, settings, total_steps)
    raise ValueError(f"unknown method {name!r}; choose one of {METHODS}.")


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total_parameter_count(model: nn.Module) -> int:
    """Parameters of the adapted model, counting each shared tensor once."""
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


__all__ = ["METHODS", "Method", "LoRA2Method", "PeftMethod", "build_method", "lora2_config",
           "trainable_parameter_count", "total_parameter_count"]
