"""Model surgery: inject LoRA² layers into a transformers model, save/load the adapter, merge it away.

Follows PEFT's conventions so its users feel at home: ``get_lora2_model(model, config)`` returns a
wrapper whose ``forward`` is the model's, ``save_pretrained(dir)`` writes ``adapter_config.json``
plus ``adapter_model.safetensors``, ``LoRA2Model.from_pretrained(base, dir)`` restores it, and
``merge_and_unload()`` hands back the plain model with ΔW folded in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora2_kernels import LoRA2Linear, is_supported_linear
from lora2_kernels.four_bit import keep_standard_layout, unsupported_linear
from lora2_kernels.linear import DropoutSeeds

from .config import READABLE_FORMAT_VERSIONS, LoRA2Config
from .errors import InputError
from .io import atomic_path, atomic_write_text
from .regularizer import OrthogonalRegularizer

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_PREFIX = "adapter."
_SAVED_PREFIX = "saved."
_SAVED_ADAPTER_TENSORS = ("q_down", "q_up", "singular_values", "p_down", "p_up", "rank_mask")
DEFAULT_HEADS = ("classifier", "score")


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_supported_linear(m)]


class LoRA2Model(nn.Module):
    """A transformers model with LoRA² adapters injected; everything else is frozen."""

    def __init__(self, model: nn.Module, config: LoRA2Config) -> None:
        super().__init__()
        if isinstance(model, LoRA2Model):
            raise InputError("model already has LoRA² adapters; pass the plain transformers model.")
        if any(isinstance(m, LoRA2Linear) for m in model.modules()):
            raise InputError("model already contains LoRA2Linear layers; load a fresh base model.")
        self.base_model = model
        config = dataclasses.replace(config)  # a copy: filling in base_model_name_or_path must not write the caller's
        self.lora2_config = config
        self._regularizer: OrthogonalRegularizer | None = None
        self.last_regularizer_loss: torch.Tensor | None = None
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
        self._inject()
        # adapter dropout's seeds: one draw on the device per forward of the base model, for every layer
        self._dropout_seeds = DropoutSeeds(model, list(self.lora2_layers().values()))
        keep_standard_layout(model)  # 4-bit layers no adapter wraps: bitsandbytes must not repack them on eval
        self.modules_to_save = self._resolve_modules_to_save()
        self._freeze()
        # forward's signature is the base model's, as PEFT's wrappers do: HF Trainer's
        # remove_unused_columns keeps the columns that signature names (with *args, **kwargs it
        # would strip every input).
        self.forward = functools.update_wrapper(functools.partial(LoRA2Model.forward, self), model.forward,
                                                assigned=("__doc__",), updated=())

    # --- surgery -------------------------------------------------------------------------------

    @property
    def model_type(self) -> str | None:
        return getattr(getattr(self.base_model, "config", None), "model_type", None)

    def _inject(self) -> None:
        cfg = self.lora2_config
        targets = cfg.resolved_target_modules(self.model_type)
        matched = [(n, m) for n, m in self.base_model.named_modules() if n and _matches(n, targets)]
        unsupported = [(n, m) for n, m in matched if not is_supported_linear(m)]
        if unsupported:
            shown = ", ".join(f"{n} ({type(m).__name__})" for n, m in unsupported[:8])
            why = next((unsupported_linear(m) for _, m in unsupported if isinstance(m, nn.Linear)), None)
            raise InputError(
                f"target_modules={targets!r} matches modules LoRA² cannot adapt: {shown}"
                f"{': ' + why if why else ''}. LoRA² adapts nn.Linear, transformers' Conv1D and bitsandbytes' 4-bit "
                "Linear4bit; nothing was changed. Name supported linear layers, e.g. "
                f"{sorted({n.rsplit('.', 1)[-1] for n in _linear_names(self.base_model)})}."
            )
        if not matched:
            linear = _linear_names(self.base_model)
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise InputError(
                f"target_modules={targets!r} matches no module of this {type(self.base_model).__name__}. "
                f"Its linear layers are named {suffixes} (e.g. {linear[:4]}); set target_modules to some of them."
            )
        for name, module in matched:
            layer = LoRA2Linear.from_linear(module, r=cfg.r, k=cfg.k, alpha=cfg.alpha, dropout=cfg.dropout,
                                            init=cfg.init, init_std=cfg.init_std, backend=cfg.backend,
                                            scale_by_kept=cfg.pruning == "monotone")
            self.base_model.set_submodule(name, layer)
        logger.info("LoRA²: adapted %d modules", len(matched))

    def _resolve_modules_to_save(self) -> list[str]:
        wanted = self.lora2_config.modules_to_save
        explicit = wanted is not None
        wanted = list(wanted) if explicit else list(DEFAULT_HEADS)
        names: list[str] = []
        for n, m in self.base_model.named_modules():
            if not n or not _matches(n, wanted) or any(n.startswith(p + ".") for p in names):
                continue
            if any(isinstance(sub, LoRA2Linear) for sub in m.modules()):
                raise InputError(f"module {n!r} is in both target_modules and modules_to_save; pick one.")
            names.append(n)
        if explicit:
            missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
            if missing:
                raise InputError(
                    f"modules_to_save entries {missing} match no module of the model; top-level modules are "
                    f"{[n for n, _ in self.base_model.named_children()]}."
                )
        return names

    def _freeze(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for layer in self.lora2_layers().values():
            for name in ("q_down", "q_up", "singular_values", "p_down", "p_up"):
                getattr(layer, name).requires_grad_(True)
        for name in self.modules_to_save:
            for p in self.base_model.get_submodule(name).parameters():
                p.requires_grad_(True)

    # --- access --------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; in training, ``orth_reg_weight · R`` is added to ``outputs.loss``
        (as PEFT's AdaLoRA does), so any loop or HF ``Trainer`` trains with the regulariser."""
        outputs = self.base_model(*args, **kwargs)
        weight = self.lora2_config.orth_reg_weight
        loss = getattr(outputs, "loss", None)
        if self.training and weight > 0 and loss is not None:
            regularizer = self.orthogonal_regularizer()()
            self.last_regularizer_loss = regularizer.detach()
            outputs.loss = loss + weight * regularizer
        return outputs

    def orthogonal_regularizer(self) -> OrthogonalRegularizer:
        if self._regularizer is None:
            self._regularizer = OrthogonalRegularizer(list(self.lora2_layers().values()))
        return self._regularizer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def lora2_layers(self) -> dict[str, LoRA2Linear]:
        """Adapted modules by their dotted name in the base model, in model order."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, LoRA2Linear)}

    def rank_pattern(self, adapter: int | None = None) -> dict[str, list[int]]:
        """Per adapted module, the indices of the singular values still kept (of adapter ``adapter`` of a model
        whose layers hold several, lora2.sweep)."""
        return {n: layer.kept_indices(adapter) for n, layer in self.lora2_layers().items()}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; "all" includes the adapters, as in PEFT."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = self.get_nb_trainable_parameters()
        msg = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        print(msg)  # noqa: T201 -- PEFT users expect this on stdout
        return trainable, total

    def set_adapter_enabled(self, enabled: bool) -> None:
        for layer in self.lora2_layers().values():
            layer.adapter_enabled = enabled

    # --- merge ---------------------------------------------------------------------------------

    def merge_adapter(self) -> None:
        for layer in self.lora2_layers().values():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self.lora2_layers().values():
            layer.unmerge()

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Fold every ΔW into its weight and return the plain transformers model.

        Over a 4-bit base the result is a bf16 model: ΔW is folded into the dequantised weights (a
        4-bit weight cannot take it without a second rounding). ``requantize=True`` quantises the
        merged weights to 4 bits again (same quant type) and logs the error that adds."""
        four_bit_layers = {n: (l.weight.quant_state.quant_type, bool(l.weight.quant_state.nested))
                           for n, l in self.lora2_layers().items() if l.is_4bit}
        model = self._unload(merge=True)
        if four_bit_layers:
            from lora2_kernels.four_bit import dequantize_model

            dequantize_model(model, torch.bfloat16)  # the 4-bit layers no adapter touched
            model.to(torch.bfloat16)
            logger.info("merged %d 4-bit layers into bf16 weights; the model is now bf16", len(four_bit_layers))
            if requantize:
                from lora2_kernels.four_bit import dequantize, quant_of, quantize_linear

                worst = 0.0
                for name, (quant_type, nested) in four_bit_layers.items():
                    merged = model.get_submodule(name)
                    q = quantize_linear(merged, quant_type, nested, torch.bfloat16, merged.weight.device)
                    err = (dequantize(quant_of(q.weight)) - merged.weight.float()).norm() / merged.weight.float().norm()
                    worst = max(worst, float(err))
                    model.set_submodule(name, q)
                logger.warning("re-quantised %d merged layers to 4 bits: relative error added to the merged weights "
                               "up to %.2e (Frobenius, worst layer)", len(four_bit_layers), worst)
        elif requantize:
            raise InputError("requantize=True re-quantises a model merged from a 4-bit base; this base is not 4-bit.")
        return model

    def unload(self) -> nn.Module:
        """Remove the adapters without merging: the plain base model (plus trained saved modules)."""
        return self._unload(merge=False)

    def _unload(self, merge: bool) -> nn.Module:
        self._dropout_seeds.remove()
        for name, layer in self.lora2_layers().items():
            if merge and not layer.merged:
                layer.merge()
            elif not merge and layer.merged:
                layer.unmerge()
            self.base_model.set_submodule(name, layer.to_base_layer())
        self._regularizer = None
        return self.base_model

    # --- save / load ---------------------------------------------------------------------------

    def adapter_state_dict(self, adapter: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors that make up the adapter: LoRA² factors, masks and saved modules.

        ``adapter``: in a model whose layers hold several adapters (a sweep, ``lora2.sweep``), adapter i's
        tensors, under the keys a one-adapter model has: what a single run of that adapter saves."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.lora2_layers().items():
            for t in _SAVED_ADAPTER_TENSORS:
                value = getattr(layer, t)
                state[f"{_ADAPTER_PREFIX}{name}.{t}"] = (value if adapter is None else value[adapter]).detach()
        for name in self.modules_to_save:
            for key, value in self._saved_module(name, adapter).state_dict().items():
                state[f"{_SAVED_PREFIX}{name}.{key}"] = value.detach()
        return state

    def _saved_module(self, name: str, adapter: int | None) -> nn.Module:
        """A module of ``modules_to_save``; adapter i's copy where the sweep holds one per adapter."""
        from .sweep import AdapterHeads

        module = self.base_model.get_submodule(name)
        if isinstance(module, AdapterHeads):
            if adapter is None:
                raise InputError(f"{name} holds one copy per adapter (a sweep): name the adapter.")
            return module.heads[adapter]
        return module

    def save_pretrained(self, save_directory: str | os.PathLike[str], adapter: int | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``, each atomically (``adapter``: one
        adapter of a sweep's model, saved as its single run would be)."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory; choose another output path.")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create adapter directory {directory}: {e.strerror}; choose a writable path.") from e
        state = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict(adapter).items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "lora2_format_version": str(self.lora2_config.format_version)})
        meta = {
            "lora2": self.lora2_config.to_dict(),
            "model_type": self.model_type,
            "num_labels": getattr(getattr(self.base_model, "config", None), "num_labels", None),
            "adapted_modules": {n: [l.out_features, l.in_features] for n, l in self.lora2_layers().items()},
            "modules_to_save": self.modules_to_save,
            "fan_in_fan_out": [n for n, layer in self.lora2_layers().items() if layer.fan_in_fan_out],
            "rank_pattern": self.rank_pattern(adapter),
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_directory: str | os.PathLike[str],
                        is_trainable: bool = False) -> LoRA2Model:
        """Inject the adapter saved in ``adapter_directory`` into ``model`` and load its weights.

        Everything is checked before anything is copied: on any error the model is left as it was.
        """
        meta = read_adapter_meta(Path(adapter_directory))
        trainable = {id(p) for p in model.parameters() if p.requires_grad}  # what the surgery will freeze
        wrapped = cls(model, LoRA2Config.from_dict(meta["lora2"]))
        try:
            wrapped.load_adapter(adapter_directory)
        except BaseException:
            wrapped.unload()  # undo the surgery: "nothing half-loaded"
            for p in model.parameters():
                p.requires_grad_(id(p) in trainable)
            raise
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
            wrapped.eval()
        return wrapped

    def load_adapter(self, adapter_directory: str | os.PathLike[str], adapter: int | None = None) -> None:
        """Load saved adapter weights into this (already injected) model; all-or-nothing. ``adapter``: into
        adapter i of a sweep's model (a one-adapter folder, as its single run saved it)."""
        directory = Path(adapter_directory)
        meta = read_adapter_meta(directory)
        self._load_adapter_state(_read_weights(directory / WEIGHTS_NAME), meta, adapter)

    def _load_adapter_state(self, state: dict[str, torch.Tensor], meta: dict[str, Any],
                            adapter: int | None = None) -> None:
        expected = self.adapter_state_dict(adapter)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items() if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or mismatched:
            base = meta.get("lora2", {}).get("base_model_name_or_path")
            problems = []
            if mismatched:
                problems.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
            if missing:
                problems.append(f"{len(missing)} tensors missing from the file (first: {missing[0]})")
            if unexpected:
                problems.append(f"{len(unexpected)} tensors the model has no place for (first: {unexpected[0]})")
            raise InputError(
                f"this adapter does not fit this model ({'; '.join(problems)}). It was saved from base model "
                f"{base!r} (model_type {meta.get('model_type')!r}); load it on that base model."
            )
        check_adapter_values(state)
        with torch.no_grad():
            for name, layer in self.lora2_layers().items():
                for t in _SAVED_ADAPTER_TENSORS:
                    target = getattr(layer, t)
                    (target if adapter is None else target[adapter]).copy_(state[f"{_ADAPTER_PREFIX}{name}.{t}"])
            for name in self.modules_to_save:
                module = self._saved_module(name, adapter)
                prefix = f"{_SAVED_PREFIX}{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def check_adapter_values(state: dict[str, torch.Tensor]) -> None:
    """Values no trained adapter holds: non-finite numbers, a rank mask other than 0 / 1."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"adapter file holds non-finite values in {bad[:3]}; it is corrupted.")
    not_binary = [k for k, v in state.items() if k.endswith(".rank_mask") and not ((v == 0) | (v == 1)).all()]
    if not_binary:
        values = sorted({float(x) for x in state[not_binary[0]].flatten() if x not in (0, 1)})
        raise InputError(f"{not_binary[0]} holds {values[:3]}: a rank mask keeps (1) or prunes (0) each singular "
                         "value, nothing between. The adapter file was edited or corrupted; re-save it.")


def read_adapter_meta(directory: Path) -> dict[str, Any]:
    """Parse ``adapter_config.json`` with errors that say what is wrong and what to do."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist; pass the folder save_pretrained wrote.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {directory} is not a LoRA² adapter directory.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is corrupted ({e}); re-save the adapter.") from e
    if not isinstance(meta, dict) or "lora2" not in meta or not isinstance(meta["lora2"], dict):
        raise InputError(f"{path} is not a LoRA² adapter config (no 'lora2' section).")
    version = meta["lora2"].get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise InputError(
            f"{path} has format_version {version!r}, this lora2 reads versions {list(READABLE_FORMAT_VERSIONS)}; "
            "use the lora2 release that wrote it, or re-create the adapter."
        )
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the adapter directory is incomplete.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path} is truncated or corrupted ({e}); re-save the adapter.") from e


def get_lora2_model(model: nn.Module, config: LoRA2Config | None = None) -> LoRA2Model:
    """Inject LoRA² adapters into ``model`` (in place) and freeze everything else."""
    return LoRA2Model(model, config if config is not None else LoRA2Config())
