"""``lora2 compare``: LoRA² against full fine-tuning, PEFT LoRA and PEFT AdaLoRA on real tasks.

Every run goes through the same ``train()`` loop with the same model, data, steps, batch size and
evaluation; only the method and its learning rate differ (each method's published default,
listed in ``METHODS`` with its source). Writes, under the output folder:

    results.md             one table per task: parameters, metric mean ± std over seeds, time, memory
    results.json           every run's config, result and curves, plus the machine and the command
    metric_vs_params.png   one point per method and budget, per task
    training_curves.png    evaluation metric over steps, mean over seeds
    rank_allocation.png    the LoRA² layers × module-types heatmap of the first task, seed 0
    runs/TASK/METHOD/seedN each run's own output folder (logs, adapter, result.json)

A killed comparison resumes: finished runs are read back, a half-done run continues from its
checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import BUILTIN_DATASETS, builtin_dataset_files, read_rows
from .errors import InputError
from .io import atomic_path, atomic_write_text
from .train import CHECKPOINT_DIR, STATE_FILE, TrainConfig, TrainResult, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    key: str  # folder name and CLI name
    label: str  # table / plot name
    method: str  # train.TrainConfig.method
    learning_rate: float
    settings: dict[str, Any]
    source: str  # where the hyper-parameters come from


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("full", "Full fine-tuning", "full", 5e-5, {},
               "BERT paper fine-tuning range (2e-5 – 5e-5)"),
    MethodSpec("lora", "LoRA r=8 (PEFT)", "lora", 5e-4, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
               "LoRA paper, RoBERTa-base GLUE (lr 5e-4, r 8); α 16 and dropout 0.1 as in PEFT's sequence-"
               "classification example"),
    MethodSpec("adalora", "AdaLoRA 12→8 (PEFT)", "adalora", 8e-4,
               {"init_r": 12, "target_r": 8, "lora_alpha": 32, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.1},
               "AdaLoRA paper, DeBERTa-v3-base GLUE (lr 8e-4, b(0) = 1.5 b(T), β 0.85, γ 0.1); warm-ups 10 % / 30 %,"
               " ΔT = steps/50"),
    MethodSpec("lora2", "LoRA² r=8 k=8 →6", "lora2", 2e-2, {"r": 8, "k": 8, "target_rank": 6, "alpha": 16.0},
               "lora2 default (orthonormal init, λ moves ~lr per step so lr 2e-2); warm-ups as AdaLoRA"),
    MethodSpec("lora2-tiny", "LoRA² tiny r=4 k=2 →2", "lora2", 2e-2,
               {"r": 4, "k": 2, "target_rank": 2, "alpha": 16.0},
               "the paper's tiny-budget setting scaled to this model: inner width 2, 2 kept values per module"),
)
METHOD_KEYS = tuple(m.key for m in METHODS)
TASKS = ("sst2", "qa-match", "adjective-polarity")
TASK_KINDS = {"sst2": "single-sentence classification", "qa-match": "sentence-pair classification",
              "adjective-polarity": "sentence-pair regression"}


@dataclass
class CompareConfig:
    """The CPU default (45 runs) finishes in about 25 minutes on 2 cores: a small model, subsampled sets."""

    model: str = "minilm"
    output_dir: str = "runs/compare"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[str] = field(default_factory=lambda: list(METHOD_KEYS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int | None = 40  # None: whole epochs (--full)
    epochs: float = 3.0
    batch_size: int = 16
    max_length: int = 64
    max_train_samples: int | None = 640  # one pass at 40 × 16
    max_eval_samples: int | None = 200
    evaluations: int = 2  # evaluation points per run, for the training curves
    precision: str = "auto"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in BUILTIN_DATASETS]
        if unknown:
            raise InputError(f"unknown task(s) {unknown}; built-in tasks: {sorted(BUILTIN_DATASETS)}.")
        unknown = [m for m in self.methods if m not in METHOD_KEYS]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose from {list(METHOD_KEYS)}.")
        if not self.seeds:
            raise InputError("give at least one seed.")

    @classmethod
    def full(cls, **overrides: Any) -> CompareConfig:
        """Whole training and validation sets, 3 epochs, batch 32, 128 tokens: a GPU's job."""
        fields = {"max_steps": None, "epochs": 3.0, "batch_size": 32, "max_length": 128, "max_train_samples": None,
                  "max_eval_samples": None, "evaluations": 6, **overrides}
        return cls(**fields)


def run_config(cfg: CompareConfig, task: str, spec: MethodSpec, seed: int) -> TrainConfig:
    out = Path(cfg.output_dir) / "runs" / task / spec.key / f"seed{seed}"
    steps = cfg.max_steps
    if steps is None:  # whole epochs: count them, so the curves still get ``evaluations`` points
        rows = len(read_rows(builtin_dataset_files(task)[0]))
        rows = min(rows, cfg.max_train_samples or rows)
        steps = int(cfg.epochs * math.ceil(rows / cfg.batch_size))
    eval_every = max(1, steps // cfg.evaluations)
    return TrainConfig(
        model=cfg.model, method=spec.method, output_dir=str(out), dataset=task, max_length=cfg.max_length,
        max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples, epochs=cfg.epochs,
        max_steps=cfg.max_steps, batch_size=cfg.batch_size, learning_rate=spec.learning_rate, warmup_ratio=0.06,
        precision=cfg.precision, eval_every=eval_every, log_every=max(1, eval_every // 5), seed=seed,
        save_checkpoints=cfg.max_steps is None,  # short runs restart whole; --full runs resume mid-run
        lora2=dict(spec.settings) if spec.method == "lora2" else TrainConfig().lora2,
        method_settings={} if spec.method == "lora2" else dict(spec.settings))


def _finished(tc: TrainConfig) -> TrainResult | None:
    out = Path(tc.output_dir)
    try:
        saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
        result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if saved != json.loads(json.dumps(dataclasses.asdict(tc))):
        return None  # made with other settings: run again
    return TrainResult(**result)


def _resumable(tc: TrainConfig) -> bool:
    out = Path(tc.output_dir)
    if not (out / CHECKPOINT_DIR / STATE_FILE).is_file():
        return False
    saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
    return saved == json.loads(json.dumps(dataclasses.asdict(tc)))


def _curves(out: Path, metric_name: str) -> dict[str, list[list[float]]]:
    evals, losses = [], []
    for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["event"] == "eval":
            evals.append([record["step"], record[metric_name]])
        elif record["event"] == "train":
            losses.append([record["step"], record["loss"]])
    return {"eval": evals, "loss": losses}


def compare(cfg: CompareConfig, command: str = "", progress: bool = True) -> dict[str, Any]:
    specs = [m for m in METHODS if m.key in cfg.methods]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    total = len(cfg.tasks) * len(specs) * len(cfg.seeds)
    for task in cfg.tasks:
        for spec in specs:
            for seed in cfg.seeds:
                tc = run_config(cfg, task, spec, seed)
                result = _finished(tc)
                if result is None:
                    logger.info("[%d/%d] %s · %s · seed %d", len(runs) + 1, total, task, spec.label, seed)
                    result = train(tc, resume=_resumable(tc), progress=progress)
                else:
                    logger.info("[%d/%d] %s · %s · seed %d: done earlier, read back", len(runs) + 1, total, task,
                                spec.label, seed)
                runs.append({"task": task, "method": spec.key, "seed": seed, "config": dataclasses.asdict(tc),
                             "result": {**dataclasses.asdict(result), "seconds_per_epoch": result.seconds_per_epoch},
                             "curves": _curves(Path(tc.output_dir), result.metric_name)})
    report = {
        "meta": {"date": datetime.date.today().isoformat(), "machine": machine_description(),
                 "command": command, "python": sys.version.split()[0], "torch": torch.__version__,
                 "config": dataclasses.asdict(cfg)},
        "methods": [dataclasses.asdict(s) for s in specs],
        "runs": runs,
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=2))
    atomic_write_text(out / "results.md", results_markdown(report))
    plot_metric_vs_params(report, out / "metric_vs_params.png")
    plot_training_curves(report, out / "training_curves.png")
    lora2_runs = [r for r in runs if r["method"] == "lora2"]
    if lora2_runs:
        from .model import read_adapter_meta
        from .report import plot_rank_heatmap

        first = lora2_runs[0]
        meta = read_adapter_meta(Path(first["config"]["output_dir"]) / "adapter")
        plot_rank_heatmap(meta["rank_pattern"], meta["lora2"]["r"], out / "rank_allocation.png",
                          title=f"LoRA² rank allocation, {first['task']} seed {first['seed']}")
    return report


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# --- tables --------------------------------------------------------------------------------------------


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, method): the numbers of results.md."""
    rows = []
    labels = {m["key"]: m["label"] for m in report["methods"]}
    for task in dict.fromkeys(r["task"] for r in report["runs"]):
        for key in labels:
            runs = [r["result"] for r in report["runs"] if r["task"] == task and r["method"] == key]
            if not runs:
                continue
            finals = [r["metric_after"] for r in runs]
            rows.append({
                "task": task, "method": key, "label": labels[key], "metric_name": runs[0]["metric_name"],
                "trainable": runs[0]["trainable_parameters"], "total": runs[0]["total_parameters"],
                "mean": statistics.fmean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "before": statistics.fmean(r["metric_before"] for r in runs),
                "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs),
                "peak_memory_mb": max(r["peak_memory_mb"] for r in runs), "seeds": len(runs),
            })
    return rows


def results_markdown(report: dict[str, Any]) -> str:
    meta, cfg = report["meta"], report["meta"]["config"]
    rows = summarize(report)
    sizes = "whole training and validation sets" if cfg["max_train_samples"] is None else (
        f"training sets subsampled to {cfg['max_train_samples']} rows, validation to {cfg['max_eval_samples']}")
    steps = f"{cfg['max_steps']} optimiser steps" if cfg["max_steps"] else f"{cfg['epochs']:g} epochs"
    lines = [
        f"# LoRA² vs baselines — {meta['date']}, {meta['machine']}", "",
        f"Command: `{meta['command']}`", "",
        f"Model `{cfg['model']}`; {sizes}; {steps} of batch {cfg['batch_size']}, max {cfg['max_length']} tokens; "
        f"seeds {cfg['seeds']}. Metric: final evaluation, mean ± std over seeds (the best-so-far checkpoint is "
        "not used, so no method gets to pick its step). Time: optimiser steps only, per epoch of the "
        "(subsampled) training set. Peak memory: above the loaded model (CPU: sampled resident set).", "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        best = max(task_rows, key=lambda r: r["mean"])
        lines += [f"## {task} — {TASK_KINDS.get(task, '')}, {task_rows[0]['metric_name']}", "",
                  "| method | trainable params | % of model | metric (before → after) | s / epoch | peak MiB |",
                  "|---|---:|---:|---|---:|---:|"]
        for r in task_rows:
            mark = " **best**" if r is best else ""
            lines.append(f"| {r['label']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} % | "
                         f"{r['before']:.3f} → {r['mean']:.3f} ± {r['std']:.3f}{mark} | {r['seconds_per_epoch']:.1f} | "
                         f"{r['peak_memory_mb']:.0f} |")
        lines.append("")
    lines += ["## Hyper-parameters", "", "| method | lr | settings | source |", "|---|---:|---|---|"]
    for m in report["methods"]:
        settings = ", ".join(f"{k}={v}" for k, v in m["settings"].items()) or "all parameters"
        lines.append(f"| {m['label']} | {m['learning_rate']:g} | {settings} | {m['source']} |")
    lines += ["", "All methods: AdamW (weight decay 0.01), linear schedule with 6 % warm-up, gradient clipping 1.0, "
              "the same target modules (all attention and MLP linears) and a trained classification head.", ""]
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, legend_axis, path: Path, legend_height: float) -> Path:
    """One legend under all panels (the methods are the same in each), then an atomic PNG write."""
    handles, names = legend_axis.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    return path


def _metric_of(report: dict[str, Any], task: str) -> str:
    return next(r["result"]["metric_name"] for r in report["runs"] if r["task"] == task)


def plot_metric_vs_params(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    rows = summarize(report)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, r in enumerate(x for x in rows if x["task"] == task):
            ax.errorbar(r["trainable"], r["mean"], yerr=r["std"], fmt="o", capsize=3, color=f"C{i}", label=r["label"])
        ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel=_metric_of(report, task))
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    _finish(fig, axes[0][0], path, legend_height=0.08)
    plt.close(fig)
    return path


def plot_training_curves(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in report["runs"]))
    labels = {m["key"]: m["label"] for m in report["methods"]}
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.6 * len(tasks), 6.4), squeeze=False)
    for col, task in enumerate(tasks):
        for i, key in enumerate(labels):
            runs = [r for r in report["runs"] if r["task"] == task and r["method"] == key]
            for row, curve in ((0, "eval"), (1, "loss")):
                points: dict[int, list[float]] = {}  # step → values over seeds
                for r in runs:
                    for step, value in r["curves"][curve]:
                        points.setdefault(int(step), []).append(value)
                steps = sorted(points)
                axes[row][col].plot(steps, [statistics.fmean(points[s]) for s in steps], marker="o" if row == 0 else "",
                                    markersize=3, color=f"C{i}", label=labels[key])
        axes[0][col].set(title=task, ylabel=f"eval {_metric_of(report, task)}")
        axes[1][col].set(xlabel="step", ylabel="training loss")
        for row in (0, 1):
            axes[row][col].grid(alpha=0.3)
    _finish(fig, axes[0][0], path, legend_height=0.05)
    plt.close(fig)
    return path
