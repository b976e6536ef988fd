"""What the training loop fine-tunes: LoRA², or a baseline (full fine-tuning, PEFT LoRA, PEFT AdaLoRA).

The loop in ``train.py`` is the same for every method, so a comparison differs only in the method.
A ``Method`` tells the loop the module to call, what to do after each optimiser step (the rank
allocators), and how to save and restore what it trained.

Every saved folder also gets ``lora2_method.json`` (method, task, labels), so `read_trained` /
`load_trained` can open any output of ``lora2 train`` — a LoRA² adapter, a PEFT LoRA or AdaLoRA
adapter, or a fully fine-tuned model — for ``lora2 eval`` and the comparison's test split.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocator import RankAllocator
from .config import LoRA2Config
from .errors import InputError
from .io import atomic_write_text
from .loading import load_base_model_and_report
from .model import CONFIG_NAME, DEFAULT_HEADS, LoRA2Model, get_lora2_model

logger = logging.getLogger(__name__)

METHODS = ("lora2", "lora", "adalora", "full")
METHOD_FILE = "lora2_method.json"  # what was trained, for whoever loads the folder later
TRAINABLE_STATE = "trainable_state.safetensors"  # a PEFT baseline's resumable tensors
DESCRIPTIONS = {"lora2": "LoRA² adapter", "lora": "PEFT LoRA adapter", "adalora": "PEFT AdaLoRA adapter",
                "full": "fully fine-tuned model"}


def _task_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) == "regression":
        return "regression"
    if any(isinstance(getattr(model, head, None), nn.Module) for head in ("lm_head",)):
        return "causal-lm"
    return "classification"


class Method:
    """Full fine-tuning; the base class of the adapter methods."""

    name = "full"

    def __init__(self, model: nn.Module, settings: dict[str, Any], total_steps: int) -> None:
        if settings:
            raise InputError(f"full fine-tuning takes no method settings, got {sorted(settings)}.")
        self.model = model
        self.info_model = model  # the transformers model whose config describes the task
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
        self.write_info(directory)

    def write_info(self, directory: Path) -> None:
        config = getattr(self.info_model, "config", None)
        id2label = getattr(config, "id2label", None) or {}
        labels = [id2label[i] for i in sorted(id2label)] if _task_of(self.info_model) == "classification" else None
        data = getattr(self, "data_info", {})  # set by the trainer: the dataset and columns of the run
        info = TrainedInfo(method=self.name, task=_task_of(self.info_model),
                           num_labels=getattr(config, "num_labels", None), label_names=labels,
                           dataset=data.get("dataset"), columns=data.get("columns"), base_4bit=data.get("base_4bit"))
        atomic_write_text(Path(directory) / METHOD_FILE, json.dumps(asdict(info), indent=2))

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
        self.info_model = model
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
        self.write_info(directory)

    def load(self, directory: Path) -> None:
        self.model.load_adapter(directory)

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocator.load_state_dict(state)


class PeftMethod(Method):
    """PEFT's LoRA or AdaLoRA on the same target modules LoRA² uses, as the baselines."""

    def __init__(self, model: nn.Module, settings: dict[str, Any], total_steps: int, adaptive: bool) -> None:
        peft = _import_peft()
        self.name = "adalora" if adaptive else "lora"
        self.info_model = model
        model_type = getattr(model.config, "model_type", None)
        fields = dict(settings)
        fields.setdefault("target_modules", LoRA2Config().resolved_target_modules(model_type))
        fields.setdefault("task_type", peft_task_type(model))
        heads = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in DEFAULT_HEADS]
        fields.setdefault("modules_to_save", heads or None)
        if adaptive:
            if fields["task_type"] is None:
                raise InputError(f"the AdaLoRA baseline needs a sequence-classification or causal-LM model, not "
                                 f"{type(model).__name__}: PEFT adds AdaLoRA's orthogonal regulariser only for a "
                                 "known task type.")
            fields.setdefault("total_step", total_steps)
            fields.setdefault("tinit", int(0.1 * total_steps))
            fields.setdefault("tfinal", int(0.3 * total_steps))
            fields.setdefault("deltaT", max(1, total_steps // 50))
            config = peft.AdaLoraConfig(**fields)
        else:
            config = peft.LoraConfig(**fields)
        with warnings.catch_warnings():
            # transformers 5 deprecates an attribute peft reads while wrapping; nothing lora2 can change
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
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

        with warnings.catch_warnings(record=True) as caught:
            # AdaLoRA prunes whole modules to rank 0; PEFT then warns that their (0, d) tensors look like
            # DeepSpeed ZeRO-3 / FSDP shards. They are not: say what they are instead, once.
            warnings.filterwarnings("always", message="Adapter 'default'.*LoRA tensor\\(s\\) have invalid shape")
            self.model.save_pretrained(directory)
        for w in caught:
            if "have invalid shape" in str(w.message):
                _log_once("adalora-rank-0", "AdaLoRA pruned some modules to rank 0; PEFT saves them as empty "
                                            "(0, d) tensors (its warning about DeepSpeed/FSDP does not apply).")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        state = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(state, str(directory / TRAINABLE_STATE))
        self.write_info(directory)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / TRAINABLE_STATE))
        parameters = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if state.keys() != parameters.keys():
            raise InputError(f"{directory} was saved from another {self.name} set-up "
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


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model, from its class.

    It matters for AdaLoRA: without one, ``get_peft_model`` returns a plain ``PeftModel`` whose
    forward calls the base model directly and skips ``AdaLoraModel.forward``, which is where PEFT
    adds AdaLoRA's orthogonal regulariser to the loss: the baseline would silently train without it.
    """
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def _import_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("the LoRA / AdaLoRA baselines run on PEFT: pip install 'lora2[compare]' "
                          "(or pip install peft).") from e
    return peft


_logged: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


def lora2_config(settings: dict[str, Any], total_steps: int) -> LoRA2Config:
    """LoRA² settings; warm-ups default to AdaLoRA-like fractions of the run when not given."""
    fields = dict(settings)
    fields.setdefault("init_warmup", int(0.1 * total_steps))
    fields.setdefault("final_warmup", int(0.3 * total_steps))
    fields.setdefault("mask_interval", max(1, total_steps // 50))
    if fields["init_warmup"] + fields["final_warmup"] >= total_steps:
        raise InputError(
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
    raise InputError(f"unknown method {name!r}; choose one of {METHODS}.")


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total_parameter_count(model: nn.Module) -> int:
    """Parameters of the adapted model, counting each shared tensor once."""
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


# --- reading what a run saved --------------------------------------------------------------------------


@dataclass
class TrainedInfo:
    """What a folder written by ``lora2 train`` holds."""

    method: str  # lora2, lora, adalora or full
    task: str | None = None  # None: not recorded (a folder from lora2 0.1); the caller's --task applies
    num_labels: int | None = None
    label_names: list[str] | None = None
    dataset: str | None = None  # the built-in dataset it was trained on, if any
    columns: dict[str, str | None] | None = None  # text_column, text_pair_column, label_column of the run
    # trained on a 4-bit base: {"quant_type", "double_quant", "modules": the names quantised}
    base_4bit: dict[str, Any] | None = None

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.method]


def read_trained(directory: str | Path) -> TrainedInfo:
    """Which method wrote ``directory`` (the ``adapter/`` or ``best/`` folder of a run), and its task."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist; pass the adapter/ or best/ folder of a lora2 train run.")
    if (directory / METHOD_FILE).is_file():
        return TrainedInfo(**json.loads((directory / METHOD_FILE).read_text(encoding="utf-8")))
    # folders written before lora2_method.json existed
    if (directory / CONFIG_NAME).is_file():
        try:
            meta = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        except ValueError as e:
            raise InputError(f"{directory / CONFIG_NAME} is corrupted ({e}); re-save the adapter.") from e
        if isinstance(meta, dict) and "lora2" in meta:
            return TrainedInfo("lora2", num_labels=meta.get("num_labels"))
        peft_type = meta.get("peft_type") if isinstance(meta, dict) else None
        if peft_type in ("LORA", "ADALORA"):
            return TrainedInfo("adalora" if peft_type == "ADALORA" else "lora",
                               num_labels=_saved_head_labels(directory))
        raise InputError(f"{directory / CONFIG_NAME} is neither a LoRA² nor a PEFT LoRA/AdaLoRA adapter config "
                         f"(peft_type {peft_type!r}); lora2 reads the folders lora2 train writes.")
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        return TrainedInfo("full", num_labels=len(config.get("id2label") or {}) or None)
    raise InputError(f"{directory} holds neither an adapter ({CONFIG_NAME}) nor a model (config.json); pass the "
                     "adapter/ or best/ folder of a lora2 train run.")


def recorded_base_model(directory: str | Path) -> str | None:
    """The base model an adapter folder records (LoRA²: its config's base_model_name_or_path; PEFT: the same
    field of adapter_config.json), or None."""
    try:
        meta = json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    recorded = meta.get("lora2", {}).get("base_model_name_or_path") if "lora2" in meta else \
        meta.get("base_model_name_or_path")
    return recorded if isinstance(recorded, str) and recorded else None


def _saved_head_labels(directory: Path) -> int | None:
    """Rows of the classification head PEFT saved with the adapter (its modules_to_save)."""
    from safetensors import safe_open

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 -- safe_open has keys(), no iteration
            if key.endswith(tuple(f"{h}.weight" for h in DEFAULT_HEADS)) or key.endswith("out_proj.weight"):
                return int(f.get_slice(key).get_shape()[0])
    return None


def load_trained(directory: str | Path, model_path: str, info: TrainedInfo, task: str) -> tuple[nn.Module, list[str]]:
    """The model ``directory`` describes, in eval mode, and the parameter names that are freshly
    initialised in it (neither in the base model nor in the folder: a problem worth a warning)."""

    directory = Path(directory)
    num_labels = int(info.num_labels or 2)
    if info.method == "full":
        model, fresh = load_base_model_and_report(str(directory), task, num_labels)
        return model.eval(), fresh
    base, fresh = load_base_model_and_report(model_path, task, num_labels)
    if info.base_4bit:  # the adapter was trained against the 4-bit base: evaluate it on the same one
        from lora2_kernels.four_bit import quantize_model

        # the very layers training quantised (adapters before lora2 0.2.1 recorded none: every linear but the heads)
        quantize_model(base, info.base_4bit["quant_type"], bool(info.base_4bit["double_quant"]),
                       modules=info.base_4bit.get("modules"))
    if info.method == "lora2":
        model = LoRA2Model.from_pretrained(base, directory)
        restored = {f"{name}." for name in model.modules_to_save}
    else:
        peft = _import_peft()
        with warnings.catch_warnings():
            # AdaLoRA's saved rank_pattern names modules with the adapter prefix PEFT strips on load; the
            # weights still load in full (tests/test_cli.py checks the accuracy reproduces)
            warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match any targeted module")
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            model = peft.PeftModel.from_pretrained(base, str(directory))
        restored = {f"{name}." for name in (model.peft_config["default"].modules_to_save or [])}
    still_fresh = [k for k in fresh if not k.startswith(tuple(restored))]
    return model.eval(), still_fresh


__all__ = ["METHODS", "Method", "LoRA2Method", "PeftMethod", "TrainedInfo", "build_method", "load_trained",
           "lora2_config", "read_trained", "total_parameter_count", "trainable_parameter_count"]
