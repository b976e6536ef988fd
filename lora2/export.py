"""Export a LoRA² adapter as a PEFT LoRA adapter: the same model, in the format serving stacks read.

A trained LoRA² layer is, exactly, a rank-k LoRA. With the k × k core C = s·A₂·diag(λ ⊙ m)·B₁
(scale s and rank mask m folded in, as the kernels fold it):

    ΔW = B₂ · C · A₁   →   lora_A = A₁ (k × in),  lora_B = B₂·C (out × k),  lora_alpha = r  (scaling 1)

PEFT, vLLM multi-LoRA, SGLang, LoRAX and TGI read that format, so an exported adapter is served by
all of them, unmerged, many per base model, with no new kernel. ``compact=True`` gives each module
the rank of its core instead (at most its kept values): C = U·S·Vᵀ, lora_A = Vᵀ[:ρ]·A₁,
lora_B = B₂·U[:, :ρ]·S[:ρ], written with PEFT's ``rank_pattern`` / ``alpha_pattern``.

The export reads only the adapter folder (no base model is loaded) and computes in fp64, so the
exported LoRA equals the LoRA² adapter to the rounding of the dtype it is written in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora2_kernels import reference

from .config import LoRA2Config
from .errors import InputError
from .io import atomic_write_text
from .run_folder import check_output_folder, write_whole
from .methods import METHOD_FILE, TrainedInfo, read_trained
from .model import (
    _ADAPTER_PREFIX,
    _SAVED_PREFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    _read_weights,
    check_adapter_values,
    read_adapter_meta,
)

logger = logging.getLogger(__name__)

FORMATS = ("peft-lora",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model types whose linear layers are transformers' Conv1D (weight stored in × out): PEFT needs
# fan_in_fan_out=True for them. Adapters saved by lora2 >= 0.3 name those modules themselves.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt")
TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
PEFT_HEADS = ("classifier", "score")  # PEFT's SEQ_CLS models train modules named so whole
VLLM_DEFAULT_MAX_LORA_RANK = 16
# the singular values of C below this fraction of its largest are rounding noise of a lower-rank
# product (fp64 arithmetic on fp32 factors); --compact drops them
COMPACT_RELATIVE_TOLERANCE = 1e-7


@dataclass
class ExportReport:
    output: str
    modules: int
    ranks: dict[str, int]  # per adapted module, the rank written
    modules_to_save: list[str]
    serving_notes: list[str] = field(default_factory=list)


def lora_factors(state: dict[str, torch.Tensor], name: str, scale: float | torch.Tensor, compact: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) in fp64 for the adapted module ``name`` of a LoRA² adapter state dict."""
    def get(t: str) -> torch.Tensor:
        return state[f"{_ADAPTER_PREFIX}{name}.{t}"].to(torch.float64)

    mask = get("rank_mask")
    if callable(scale):
        scale = scale(mask)
    core = reference.core(get("singular_values"), mask, get("q_up"), get("p_down"), scale)  # k × k
    q_down, p_up = get("q_down"), get("p_up")
    if not compact:
        return q_down, p_up @ core
    u, s, vh = torch.linalg.svd(core)
    kept = int((mask != 0).sum())
    rank = min(kept, int((s > s[0] * COMPACT_RELATIVE_TOLERANCE).sum())) if s[0] > 0 else 0
    rank = max(rank, 1)  # PEFT has no rank-0 LoRA: a module with nothing kept writes one zero direction
    lora_b = p_up @ (u[:, :rank] * s[:rank])
    if kept == 0 or s[0] == 0:
        lora_b = torch.zeros_like(lora_b)
    return vh[:rank] @ q_down, lora_b


def balanced(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product B·A with the scale split evenly: A·t and B/t with t = √(max|B| / max|A|), so both
    factors peak at √(max|A|·max|B|). All of it in B (the core's scale, λ) overflowed float16 on adapters
    whose λ had grown large, while A held values near 1."""
    peak_a, peak_b = lora_a.abs().max(), lora_b.abs().max()
    if peak_a == 0 or peak_b == 0:
        return lora_a, lora_b
    t = torch.sqrt(peak_b / peak_a)
    return lora_a * t, lora_b / t


def _refuse_overflow(tensors: dict[str, torch.Tensor], dtype: str, adapter: Path) -> None:
    """What is written must be what was computed: a value past the dtype's range (float16: 65,504) is refused
    after the cast, before anything is written, naming a dtype that holds it."""
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        largest = torch.finfo(DTYPES[dtype]).max
        raise InputError(f"{adapter} does not fit {dtype}: {len(bad)} of {len(tensors)} tensors overflow its range "
                         f"(largest value {largest:.6g}), e.g. {bad[0]}. Export with --dtype bfloat16 or float32; "
                         "nothing was written.")


def export_peft_lora(adapter: str | Path, output: str | Path, compact: bool = False, dtype: str = "float32",
                     overwrite: bool = False) -> ExportReport:
    """Write the LoRA² adapter in ``adapter`` as a PEFT LoRA adapter folder ``output``.

    ``output`` follows lora2's output-folder policy (``run_folder.check_output_folder``): never the adapter or a
    folder around it, and a non-empty folder only with ``overwrite``. It is written whole or not at all.
    """
    adapter = Path(adapter)
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    info = read_trained(adapter)
    if info.method != "lora2":
        raise InputError(f"lora2 export converts LoRA² adapters; {adapter} holds a {info.description} "
                         f"(method {info.method}){' that PEFT reads as it is' if info.method in ('lora', 'adalora') else ''}.")
    check_output_folder(output, {"adapter": adapter}, overwrite)
    meta = read_adapter_meta(adapter)
    state = _read_weights(adapter / WEIGHTS_NAME)
    check_adapter_values(state)  # what loading the adapter refuses, export refuses too
    cfg = meta["lora2"]
    modules = list(meta["adapted_modules"])
    task_type = TASK_TYPES.get(info.task or "")
    in_head = [n for n in modules if any(part.endswith(PEFT_HEADS) for part in n.split("."))]
    if task_type == "SEQ_CLS" and in_head:
        raise InputError(f"{adapter} adapts {in_head[0]}, inside a classification head: a PEFT SEQ_CLS adapter trains "
                         f"every module named like {PEFT_HEADS} whole (modules_to_save) and would drop that LoRA. "
                         "This adapter has no exact PEFT LoRA form.")
    if info.base_4bit:
        logger.warning("%s was trained on a 4-bit base (%s): load the export on that 4-bit base (e.g. transformers' "
                       "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=%r)) to reproduce it", adapter,
                       info.base_4bit, info.base_4bit.get("quant_type"))
    k = int(cfg["k"])
    if cfg.get("pruning") == "monotone":  # lora2 0.1's scale: α / kept values, per module
        def scale(mask: torch.Tensor) -> torch.Tensor:
            return cfg["alpha"] / mask.sum().clamp_min(1.0)
    else:
        scale = cfg["alpha"] / cfg["r"]

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in modules:
        lora_a, lora_b = balanced(*lora_factors(state, name, scale, compact))
        ranks[name] = lora_a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.to(DTYPES[dtype]).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.to(DTYPES[dtype]).contiguous()
    saved = list(meta.get("modules_to_save") or [])
    for key, value in state.items():
        if key.startswith(_SAVED_PREFIX):
            tensors[f"base_model.model.{key[len(_SAVED_PREFIX):]}"] = (
                value.to(DTYPES[dtype]) if value.is_floating_point() else value).contiguous()
    _refuse_overflow(tensors, dtype, adapter)

    conv1d = meta.get("fan_in_fan_out")
    if conv1d is None:  # adapters saved before lora2 recorded it
        conv1d = modules if meta.get("model_type") in CONV1D_MODEL_TYPES else []
    # (one flag for the config; PEFT sets it per module where a model mixes Conv1D and nn.Linear)
    # The same names LoRA² matched when it adapted the base: PEFT matches a list the same way (the whole
    # name or a "."-suffix) and a string as a full regex match, so it adapts the very same modules.
    target_modules = LoRA2Config.from_dict(cfg).resolved_target_modules(meta.get("model_type"))
    peft_config = _peft_config(cfg, info, target_modules, saved, bool(conv1d), k, ranks if compact else None)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))
        # what lora2 eval needs to score it as the run did (task, labels, dataset, columns); PEFT ignores it
        atomic_write_text(tmp / METHOD_FILE, json.dumps(asdict(TrainedInfo(**{**asdict(info), "method": "lora"})),
                                                        indent=2))

    write_whole(Path(output), fill, "the PEFT export", "run the export again")
    notes = serving_notes(output)
    for note in notes:
        logger.warning("%s", note)
    return ExportReport(str(output), len(modules), ranks, saved, notes)


def _peft_config(cfg: dict[str, Any], info: TrainedInfo, target_modules: list[str] | str, modules_to_save: list[str],
                 fan_in_fan_out: bool, k: int, ranks: dict[str, int] | None):
    try:
        import peft
    except ImportError as e:
        raise ImportError("lora2 export writes the adapter config with PEFT's own LoraConfig: "
                          "pip install 'lora2[export]' (or pip install peft).") from e
    rank = max(ranks.values()) if ranks else k
    pattern = {n: r for n, r in ranks.items() if r != rank} if ranks else {}
    return peft.LoraConfig(
        r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=dict(pattern),  # alpha = r: scaling 1 everywhere
        target_modules=target_modules, modules_to_save=modules_to_save or None, fan_in_fan_out=fan_in_fan_out,
        lora_dropout=float(cfg.get("dropout", 0.0)), bias="none", use_rslora=False, use_dora=False,
        task_type=TASK_TYPES.get(info.task or ""), base_model_name_or_path=cfg.get("base_model_name_or_path"),
        inference_mode=True)


def serving_notes(directory: str | Path) -> list[str]:
    """What the multi-LoRA servers' loaders (vLLM, SGLang, LoRAX, TGI) would refuse or ignore in the
    PEFT LoRA adapter in ``directory``; [] when it is within every one's rules."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    notes = []
    if config.get("peft_type") != "LORA":
        notes.append(f"peft_type is {config.get('peft_type')!r}, servers load LORA only")
    if config.get("use_dora"):
        notes.append("use_dora is set: vLLM and LoRAX reject DoRA adapters")
    if config.get("bias", "none") != "none":
        notes.append(f"bias={config['bias']!r}: servers load lora_A / lora_B only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        notes.append("per-module ranks (rank_pattern / alpha_pattern): vLLM ignores or rejects them depending on "
                     "the version, and LoRAX stacks each module type across layers and needs one rank; export "
                     "without --compact for those servers")
    if int(config["r"]) > VLLM_DEFAULT_MAX_LORA_RANK:
        notes.append(f"rank {config['r']} is above vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
                     f"start vLLM with --max-lora-rank {config['r']} or more")
    with safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
    other = [key for key in keys if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other:
        notes.append(f"{len(other)} tensors besides lora_A / lora_B (modules_to_save: "
                     f"{', '.join(config.get('modules_to_save') or [])}; first key {other[0]}): PEFT loads them, "
                     "vLLM does not load an adapter's classifier head")
    return notes


__all__ = ["DTYPES", "FORMATS", "ExportReport", "export_peft_lora", "lora_factors", "serving_notes"]
