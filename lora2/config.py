"""`LoRA2Config`: every knob of the method in one validated dataclass.

The config is the contract between the layer, the allocator, the trainer and the files on disk:
it is written into ``adapter_config.json`` and read back by ``LoRA2Model.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

# Bumped whenever the on-disk layout changes; a loader refuses versions it does not know.
# 2: `pruning` and `backend` fields; version-1 adapters were trained with lora2 0.1's monotone
#    pruning and alpha / kept scaling, so they load as pruning="monotone" (same function).
CONFIG_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)

PRUNING = ("adalora", "monotone")
BACKENDS = ("auto", "triton", "reference")

# Linear layers worth adapting per architecture (PEFT/AdaLoRA practice: all attention + MLP
# projections). Names are suffixes of dotted module names, so "output.dense" also matches
# "attention.output.dense" but never "pooler.dense".
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": [
        "query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense",
    ],
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "mpnet": ["q", "k", "v", "o", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _check(condition: bool, name: str, allowed: str, value: Any) -> None:
    if not condition:
        raise InputError(f"LoRA2Config.{name}={value!r} is invalid: {name} must be {allowed}.")


@dataclass
class LoRA2Config:
    """Configuration of a LoRA² adapter.

    ΔW = (alpha / r) · P · diag(λ ⊙ mask) · Q with P = B₂·A₂ (out×k · k×r) and Q = B₁·A₁ (r×k · k×in).

    Shape of the adapter:
        r: initial number of singular values λ per adapted module (the rank of ΔW before pruning).
        k: inner width of the two small LoRAs (A₁: k×in, B₁: r×k, A₂: k×r, B₂: out×k).
        target_rank: average number of singular values kept per module after pruning.
        alpha: scale numerator; ΔW is multiplied by alpha / r, constant for the whole run (the paper's
            and AdaLoRA's choice: pruning never rescales the values that stay).
        dropout: dropout on the adapter's input.
        init: how the four factors start. "orthogonal" (default): orthonormal rows/columns, the
            regulariser's own minimum, so P and Q start with unit singular values and λ's gradient
            is O(1). "normal": N(0, init_std²) as in the research code; there P = B₂A₂ has entries
            ~init_std²·√k ≈ 1e-3, λ's first gradients are ~1e-8 and training starts slowly
            (SST-2 / MiniLM, 63 steps: 0.78 accuracy vs 0.82 with "orthogonal").
            λ starts at zero either way, so the adapted model starts exactly at the base model.
        init_std: std of the "normal" init.
        target_modules: list of module-name suffixes, or one regular expression matched against the
            full dotted name; ``None`` picks the defaults of the model's architecture.
        modules_to_save: extra modules (e.g. the classification head) trained fully and saved with
            the adapter; ``None`` means the usual heads ("classifier", "score") when present.

    Rank allocator (AdaLoRA-style pruning of λ with the cheap LoRA² importance score):
        pruning: "adalora" (default, the paper's semantics, which are AdaLoRA's): at each masking
            step the globally lowest-scored singular values are zeroed, but they stay trainable and
            re-compete at the next masking (the top-k is over all values); the pattern chosen at the
            end of the budget decay is then enforced for the final warm-up. "monotone": lora2 0.1's
            behaviour, a pruned value is masked for good (no gradient, never revived) and ΔW is
            scaled by alpha / (kept values) instead of alpha / r.
        total_steps: optimiser steps of the whole run (the trainer fills it in).
        init_warmup / final_warmup: steps before pruning starts / after the pattern freezes.
        mask_interval: prune every this many steps (Δ_T).
        beta1 / beta2: EMA factors of sensitivity and its uncertainty.

    Regulariser:
        orth_reg_weight: weight of the orthogonality regulariser added to the loss.

    Kernels:
        backend: "auto" (the fused Triton kernels on CUDA where they apply, the PyTorch reference
            elsewhere), "triton" (always; an error where they cannot run) or "reference".
    """

    r: int = 8
    k: int = 8
    target_rank: int = 6
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "orthogonal"
    init_std: float = 0.02
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    total_steps: int | None = None
    init_warmup: int = 0
    final_warmup: int = 0
    mask_interval: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    pruning: str = "adalora"
    backend: str = "auto"
    base_model_name_or_path: str | None = None
    format_version: int = CONFIG_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its allowed range."""
        for name in ("r", "k", "target_rank", "init_warmup", "final_warmup", "mask_interval"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool), name, "an integer", value)
        _check(self.r >= 1, "r", "an integer >= 1", self.r)
        _check(self.k >= 1, "k", "an integer >= 1", self.k)
        _check(1 <= self.target_rank <= self.r, "target_rank", f"between 1 and r={self.r}", self.target_rank)
        _check(_finite(self.alpha) and self.alpha > 0, "alpha", "a finite number > 0", self.alpha)
        _check(_finite(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)", self.dropout)
        _check(self.init in ("orthogonal", "normal"), "init", "'orthogonal' or 'normal'", self.init)
        _check(_finite(self.init_std) and self.init_std > 0, "init_std", "a finite number > 0", self.init_std)
        _check(self.init_warmup >= 0, "init_warmup", "an integer >= 0", self.init_warmup)
        _check(self.final_warmup >= 0, "final_warmup", "an integer >= 0", self.final_warmup)
        _check(self.mask_interval >= 1, "mask_interval", "an integer >= 1", self.mask_interval)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(_finite(value) and 0.0 <= value < 1.0, name, "in [0, 1)", value)
        _check(self.pruning in PRUNING, "pruning", f"one of {PRUNING}", self.pruning)
        _check(self.backend in BACKENDS, "backend", f"one of {BACKENDS}", self.backend)
        _check(
            _finite(self.orth_reg_weight) and self.orth_reg_weight >= 0,
            "orth_reg_weight", "a finite number >= 0", self.orth_reg_weight,
        )
        if self.total_steps is not None:
            _check(
                isinstance(self.total_steps, int) and self.total_steps >= 1,
                "total_steps", "an integer >= 1 or None", self.total_steps,
            )
            _check(
                self.init_warmup + self.final_warmup < self.total_steps,
                "total_steps",
                f"larger than init_warmup + final_warmup = {self.init_warmup + self.final_warmup} "
                "(lower the warm-ups or train longer)",
                self.total_steps,
            )
        tm = self.target_modules
        _check(
            tm is None or isinstance(tm, str) or (isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm)),
            "target_modules", "None, a regex string or a non-empty list of module-name suffixes", tm,
        )
        if isinstance(tm, tuple):
            self.target_modules = list(tm)
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                _check(False, "target_modules", f"a valid regular expression ({e})", tm)
        mts = self.modules_to_save
        _check(
            mts is None or (isinstance(mts, (list, tuple)) and all(isinstance(t, str) and t for t in mts)),
            "modules_to_save", "None or a list of module names", mts,
        )
        if isinstance(mts, tuple):
            self.modules_to_save = list(mts)
        _check(self.base_model_name_or_path is None or isinstance(self.base_model_name_or_path, str),
               "base_model_name_or_path", "None or a string", self.base_model_name_or_path)
        _check(isinstance(self.extra, dict), "extra", "a dict", self.extra)
        _check(self.format_version == CONFIG_FORMAT_VERSION, "format_version",
               f"{CONFIG_FORMAT_VERSION} (this file was written by another lora2 version; "
               "upgrade lora2 or re-create the adapter)", self.format_version)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRA2Config:
        data = dict(data)
        if data.get("format_version") == 1:  # lora2 0.1: pruned for good, ΔW scaled by alpha / kept
            data.setdefault("pruning", "monotone")
            data["format_version"] = CONFIG_FORMAT_VERSION
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"adapter config has unknown fields {unknown}: it was written by a newer lora2; "
                "upgrade lora2 to load it."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def resolved_target_modules(self, model_type: str | None) -> list[str] | str:
        """The target modules to use for a model of ``model_type``; errors if none are known."""
        if self.target_modules is not None:
            return self.target_modules
        if model_type in DEFAULT_TARGET_MODULES:
            return list(DEFAULT_TARGET_MODULES[model_type])
        raise InputError(
            f"LoRA2Config.target_modules is None and lora2 has no defaults for model_type={model_type!r}; "
            f"pass target_modules explicitly (defaults exist for {sorted(DEFAULT_TARGET_MODULES)})."
        )


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
