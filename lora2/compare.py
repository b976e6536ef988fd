"""``lora2 compare``: LoRA² against PEFT LoRA and PEFT AdaLoRA (and full fine-tuning) on real tasks,
with learning rates chosen without looking at the test split.

Two stages, each resumable (finished runs are read back, a half-done long run resumes):

1. ``--sweep``: for every task and method, one run (the first seed) per learning rate of the
   method's grid (4 values over 33×, the same size for every method); the lr whose final model
   scores best on the **validation** split is chosen. Choices go to ``OUTPUT/sweep.json``.
2. the comparison: every task × method × seed at its chosen lr. The tables report each final
   model on the **test** split, which nothing was chosen on, as mean ± std over the seeds.

Without ``--sweep``, the choices come from ``OUTPUT/sweep.json`` or, for the CPU default settings,
from the sweep lora2 ships (``lora2/compare_sweep.json``, with its date and machine); other
settings need ``--sweep``. Writes, under the output folder:

    results.md             per task: parameters, chosen lr, validation and test metric, marks, time,
                           memory; LoRA² minus each baseline per seed; the sweep; the hyper-parameters
    results.json           every run's config, result and curves, plus the machine and the command
    metric_vs_params.png   test metric against trainable parameters, per task
    training_curves.png    validation metric and loss over steps, mean over seeds
    lr_sweep.png           validation metric against learning rate, per method and task
    rank_allocation.png    the LoRA² layers × module-types heatmap of the first task, first seed
    runs/TASK/METHOD/lrLR/seedN   each run's own output folder (logs, adapter, result.json)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .data import BUILTIN_DATASETS, builtin_split_file, read_rows
from .errors import EXIT_INTERRUPTED, InputError
from .io import atomic_path, atomic_write_text
from .run_folder import CHECKPOINT_DIR, RESULT_FILE, STATE_FILE, check_output_folder, folder_lock, records_config
from .train import TrainConfig, TrainingError, TrainingInterrupted, TrainResult, train
from .train_sweep import train_sweep

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SHIPPED_SWEEP = "compare_sweep.json"  # package data: the sweep of the CPU default settings


@dataclass(frozen=True)
class MethodSpec:
    key: str  # folder name and CLI name
    label: str  # table / plot name
    method: str  # train.TrainConfig.method
    lr_grid: tuple[float, ...]  # learning rates the sweep tries, chosen on validation
    settings: dict[str, Any]
    source: str  # where the settings come from
    learning_rate: float  # the published default, for `lora2 train --method` (the comparison sweeps the grid)


# Grids: 4 values, half a decade apart (about 30× end to end), centred on each family's usual range.
PEFT_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
# Singular values that start at zero (LoRA²'s λ, AdaLoRA's E) move about lr per step, so both take a
# higher range. (A first sweep gave AdaLoRA the PEFT grid: it chose the top value on every task.)
SINGULAR_VALUE_GRID = (2e-3, 6e-3, 2e-2, 6e-2)
FULL_GRID = (1e-5, 3e-5, 1e-4, 3e-4)

METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("full", "Full fine-tuning", "full", FULL_GRID, {}, "BERT paper's fine-tuning range, widened", 5e-5),
    MethodSpec("lora", "LoRA r=8 (PEFT)", "lora", PEFT_GRID, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
               "LoRA paper, RoBERTa-base GLUE (r 8, lr 5e-4); α = 2r and dropout 0.1 as in PEFT's "
               "sequence-classification example", 5e-4),
    MethodSpec("lora-r2", "LoRA r=2 (PEFT)", "lora", PEFT_GRID, {"r": 2, "lora_alpha": 4, "lora_dropout": 0.1},
               "LoRA r=8's settings at rank 2: about LoRA² tiny's parameter count", 5e-4),
    MethodSpec("adalora", "AdaLoRA 8→6 (PEFT)", "adalora", SINGULAR_VALUE_GRID,
               {"init_r": 8, "target_r": 6, "lora_alpha": 16, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.1},
               "AdaLoRA paper (lr 8e-4, β 0.85, γ 0.1), warm-ups 10 % / 30 %, ΔT = steps/50, at LoRA²'s parameter "
               "count and rank schedule (8 → 6 per module)", 8e-4),
    MethodSpec("lora2", "LoRA² r=8 k=8 →6", "lora2", SINGULAR_VALUE_GRID, {"r": 8, "k": 8, "target_rank": 6, "alpha": 16.0},
               "the paper's pruning (AdaLoRA's semantics, scale α/r); warm-ups as AdaLoRA", 2e-2),
    MethodSpec("lora2-monotone", "LoRA² r=8 k=8 →6, monotone", "lora2", SINGULAR_VALUE_GRID,
               {"r": 8, "k": 8, "target_rank": 6, "alpha": 16.0, "pruning": "monotone"},
               "lora2 0.1's pruning: masked for good, scale α / kept values", 2e-2),
    MethodSpec("lora2-tiny", "LoRA² tiny r=4 k=2 →2", "lora2", SINGULAR_VALUE_GRID, {"r": 4, "k": 2, "target_rank": 2,
                                                                            "alpha": 16.0},
               "the paper's tiny-budget setting scaled to this model: inner width 2, 2 kept values per module", 2e-2),
)
METHOD_KEYS = tuple(m.key for m in METHODS)
DEFAULT_METHODS = tuple(k for k in METHOD_KEYS if k != "full")  # full FT: available, not in the 40-minute default
TASKS = ("sst2", "qa-match", "adjective-polarity")
TASK_KINDS = {"sst2": "single-sentence classification", "qa-match": "sentence-pair classification",
              "adjective-polarity": "sentence-pair regression"}


@dataclass
class CompareConfig:
    """The CPU default (54 runs once the learning rates are chosen): the small offline model, 80 steps
    of 16 examples, 300 validation rows, every test row, two runs at a time on 2 cores."""

    model: str = "minilm"
    output_dir: str = "runs/compare"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int | None = 80  # None: whole epochs (--full)
    epochs: float = 3.0
    batch_size: int = 16
    max_length: int = 64
    max_train_samples: int | None = 1280  # one pass at 80 × 16
    max_eval_samples: int | None = 300  # validation rows: the curves and the lr choice
    evaluations: int = 4  # evaluation points per run, for the training curves
    precision: str = "auto"
    # Runs at once, in separate processes. MiniLM's small batches keep two CPU threads busy poorly:
    # on 2 cores two single-thread runs do 1.4x the work of one two-thread run. One on a GPU.
    jobs: int = field(default_factory=lambda: 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1))
    load_in_4bit: bool = False  # QLoRA² vs PEFT QLoRA: every run on the base quantised to NF4 (train --load-in-4bit)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in BUILTIN_DATASETS]
        if unknown:
            raise InputError(f"unknown task(s) {unknown}; built-in tasks: {sorted(BUILTIN_DATASETS)}.")
        unknown = [m for m in self.methods if m not in METHOD_KEYS]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose from {list(METHOD_KEYS)}.")
        if not self.seeds:
            raise InputError("give at least one seed.")
        if self.jobs < 1:
            raise InputError(f"jobs must be >= 1, got {self.jobs}.")
        if self.load_in_4bit:
            cannot = [m for m in self.methods if _spec(m).method == "full"
                      or (_spec(m).method == "adalora" and not torch.cuda.is_available())]
            if cannot:
                raise InputError(f"--load-in-4bit: {cannot} cannot train on a 4-bit base here (full fine-tuning would "
                                 "train the 4-bit weights; PEFT's AdaLoRA needs a GPU over bitsandbytes' layers). "
                                 "Choose --methods among the others.")

    @classmethod
    def full(cls, **overrides: Any) -> CompareConfig:
        """Whole training and validation sets, 3 epochs, batch 32, 128 tokens: a GPU's job."""
        fields = {"max_steps": None, "epochs": 3.0, "batch_size": 32, "max_length": 128, "max_train_samples": None,
                  "max_eval_samples": None, "evaluations": 6, **overrides}
        return cls(**fields)

    def training_settings(self) -> dict[str, Any]:
        """What decides a run's outcome besides task, method, lr and seed: a sweep is valid for these."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("output_dir", "tasks", "methods", "seeds", "jobs")
                and not (k == "load_in_4bit" and not v)}  # a sweep from before the option exists ran without it


def run_config(cfg: CompareConfig, task: str, spec: MethodSpec, seed: int, lr: float) -> TrainConfig:
    out = Path(cfg.output_dir) / "runs" / task / spec.key / f"lr{lr:g}" / f"seed{seed}"
    steps = cfg.max_steps
    if steps is None:  # whole epochs: count them, so the curves still get ``evaluations`` points
        rows = len(read_rows(builtin_split_file(task, "train")))
        rows = min(rows, cfg.max_train_samples or rows)
        steps = int(cfg.epochs * math.ceil(rows / cfg.batch_size))
    eval_every = max(1, steps // cfg.evaluations)
    return TrainConfig(
        model=cfg.model, method=spec.method, output_dir=str(out), dataset=task,
        test_file=str(builtin_split_file(task, "test")), max_length=cfg.max_length,
        max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples, epochs=cfg.epochs,
        max_steps=cfg.max_steps, batch_size=cfg.batch_size, learning_rate=lr, warmup_ratio=0.06,
        precision=cfg.precision, eval_every=eval_every, log_every=max(1, eval_every // 5), seed=seed,
        save_checkpoints=cfg.max_steps is None,  # short runs restart whole; --full runs resume mid-run
        lora2=dict(spec.settings) if spec.method == "lora2" else TrainConfig().lora2,
        method_settings={} if spec.method == "lora2" else dict(spec.settings), load_in_4bit=cfg.load_in_4bit)


def _finished(tc: TrainConfig) -> TrainResult | None:
    out = Path(tc.output_dir)
    if not records_config(out, tc):
        return None  # not run yet, or made with other settings: run again
    try:
        return TrainResult(**json.loads((out / RESULT_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _resumable(tc: TrainConfig) -> bool:
    out = Path(tc.output_dir)
    return (out / CHECKPOINT_DIR / STATE_FILE).is_file() and records_config(out, tc)


def _curves(out: Path, metric_name: str) -> dict[str, list[list[float]]]:
    evals, losses = [], []
    for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["event"] == "eval":
            evals.append([record["step"], record[metric_name]])
        elif record["event"] == "train":
            losses.append([record["step"], record["loss"]])
    return {"eval": evals, "loss": losses}


Run = tuple[str, str, int, float]  # task, method key, seed, learning rate


def _spec(key: str) -> MethodSpec:
    return next(m for m in METHODS if m.key == key)


def _train_one(tc: TrainConfig, threads: int, progress: bool = False) -> TrainResult | None:
    """One run (in a worker process when jobs > 1); None when its loss diverged."""
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:  # a spawned worker: log like the parent
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        # the comparison owns its runs/ folders: a run made with other settings is replaced
        return train(tc, resume=_resumable(tc), progress=progress, overwrite=True)
    except TrainingError as e:
        logger.warning("%s diverged: %s", tc.output_dir, e)
        atomic_write_text(Path(tc.output_dir) / DIVERGED_FILE, str(e))
        return None
    except (TrainingInterrupted, KeyboardInterrupt):  # SIGTERM / SIGINT inside train(), or Ctrl-C outside it
        if multiprocessing.parent_process() is not None:
            # A worker of a comparison being stopped. Returning would let it take the next run already
            # queued to it (the pool keeps a few), training on after the user stopped the comparison,
            # and racing a resumed one for the same run folder. So the worker ends here, with the
            # exit code of an interruption; next time the run resumes from its checkpoint, or
            # starts again if it was too short to write one.
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
        raise


def _worker_init(parent_pid: int) -> None:
    """Tie a worker to the comparison that started it: on Linux the kernel sends it SIGTERM when the
    parent dies (killed, crashed), which train() turns into a clean stop and _train_one into an exit."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(EXIT_INTERRUPTED)


DIVERGED_FILE = "diverged.txt"


def run_all(cfg: CompareConfig, runs: list[Run], stage: str, progress: bool = True) -> dict[Run, TrainResult | None]:
    """Train every run not finished earlier (``cfg.jobs`` at a time); read the others back.
    A diverged run maps to None. Progress bars only when runs go one at a time."""
    configs = {(task, key, seed, lr): run_config(cfg, task, _spec(key), seed, lr) for task, key, seed, lr in runs}
    results: dict[Run, TrainResult | None] = {}
    todo = []
    for run, tc in configs.items():
        done = _finished(tc)
        if done is not None or (Path(tc.output_dir) / DIVERGED_FILE).is_file():
            results[run] = done
        else:
            todo.append(run)
    logger.info("%s: %d runs, %d done earlier and read back, %d to train (%d at a time)", stage, len(runs),
                len(runs) - len(todo), len(todo), cfg.jobs)
    # LoRA²'s runs of a task (its learning-rate grid, or its seeds) train as one sweep over one base in this
    # process (train_sweep.py): each writes the folder its single run would; the baselines go one a process
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in todo:
        if _spec(run[1]).method == "lora2":
            groups.setdefault(run[:2], []).append(run)
    for (task, key), group in groups.items():
        if len(group) < 2:
            continue
        logger.info("[%s] %s · %s: %d runs as one sweep over one base (lr %s, seeds %s)", stage, task,
                    _spec(key).label, len(group), ", ".join(sorted({f"{r[3]:g}" for r in group})),
                    ", ".join(sorted({str(r[2]) for r in group})))
        try:
            outcomes = train_sweep([configs[run] for run in group], resume=True, progress=progress, overwrite=True)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{stage} stopped during the sweep of {task} · {_spec(key).label}; run the same "
                                      "`lora2 compare` command again to resume: finished runs are read back, "
                                      "stopped ones continue from their checkpoints") from e
        results.update(zip(group, outcomes))
        todo = [run for run in todo if run not in group]
    threads = max(1, torch.get_num_threads() // cfg.jobs) if cfg.jobs > 1 else torch.get_num_threads()
    if cfg.jobs == 1 or len(todo) <= 1:
        for i, run in enumerate(todo, 1):
            logger.info("[%s %d/%d] %s · %s · lr %g · seed %d", stage, i, len(todo), run[0], _spec(run[1]).label,
                        run[3], run[2])
            try:
                results[run] = _train_one(configs[run], threads, progress)
            except TrainingInterrupted as e:  # its message names `lora2 train --resume`; a comparison resumes whole
                raise TrainingInterrupted(f"{stage} stopped during the run in {configs[run].output_dir}; run the same "
                                          "`lora2 compare` command again to resume: finished runs are read back, "
                                          "a stopped one continues from its checkpoint") from e
    else:
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            futures = {run: pool.submit(_train_one, configs[run], threads) for run in todo}
            try:
                for i, (run, future) in enumerate(futures.items(), 1):
                    results[run] = future.result()
                    logger.info("[%s %d/%d done] %s · %s · lr %g · seed %d", stage, i, len(todo), run[0],
                                _spec(run[1]).label, run[3], run[2])
            except (KeyboardInterrupt, BrokenProcessPool) as e:  # Ctrl-C: the workers got it too and ended
                pool.shutdown(wait=True, cancel_futures=True)
                raise TrainingInterrupted(f"{stage} stopped ({type(e).__name__}); run the same command again to "
                                          "resume: finished runs are read back") from e
    return {run: results[run] for run in runs}


# --- stage 1: learning rates, chosen on validation -------------------------------------------------------


def run_sweep(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Every method's lr grid on every task (first seed); choose by the final validation metric."""
    specs = [m for m in METHODS if m.key in cfg.methods]
    seed = cfg.seeds[0]
    grid_runs = [(task, spec.key, seed, lr) for task in cfg.tasks for spec in specs for lr in spec.lr_grid]
    results = run_all(cfg, grid_runs, "sweep", progress)
    sweep: dict[str, Any] = {"settings": cfg.training_settings(), "seed": seed, "date": datetime.date.today().isoformat(),
                             "machine": machine_description(), "tasks": {}}
    for task in cfg.tasks:
        for spec in specs:
            scores = {}
            for lr in spec.lr_grid:  # the final model on validation: nothing else; a diverged run loses
                result = results[(task, spec.key, seed, lr)]
                scores[f"{lr:g}"] = result.metric_after if result is not None else -math.inf
            chosen = max(spec.lr_grid, key=lambda lr: scores[f"{lr:g}"])  # ties: the smaller lr (first)
            sweep["tasks"].setdefault(task, {})[spec.key] = {
                "grid": list(spec.lr_grid), "validation": scores, "chosen": chosen,
                "at_edge": chosen in (spec.lr_grid[0], spec.lr_grid[-1])}
    atomic_write_text(Path(cfg.output_dir) / SWEEP_FILE, json.dumps(sweep, indent=2))
    return sweep


def _matching_sweep(sweep: dict[str, Any], cfg: CompareConfig) -> bool:
    """Whether ``sweep`` chose for these settings, tasks, methods and grids."""
    if sweep.get("settings") != json.loads(json.dumps(cfg.training_settings())):
        return False
    grids = {m.key: list(m.lr_grid) for m in METHODS}
    return all(sweep.get("tasks", {}).get(task, {}).get(key, {}).get("grid") == grids[key]
               for task in cfg.tasks for key in cfg.methods)


def learning_rates(cfg: CompareConfig, sweep: bool, progress: bool) -> tuple[dict[str, Any], str]:
    """(sweep record with the chosen lrs, where it came from)."""
    if sweep:
        return run_sweep(cfg, progress), f"`--sweep` in this run ({SWEEP_FILE})"
    local = Path(cfg.output_dir) / SWEEP_FILE
    if local.is_file():
        record = json.loads(local.read_text(encoding="utf-8"))
        if _matching_sweep(record, cfg):
            return record, f"an earlier `--sweep` ({local}, {record['date']})"
    shipped = json.loads((resources.files("lora2") / SHIPPED_SWEEP).read_text(encoding="utf-8"))
    if _matching_sweep(shipped, cfg):
        return shipped, (f"the sweep shipped with lora2 (lora2/{SHIPPED_SWEEP}: `lora2 compare --sweep`, "
                         f"{shipped['date']}, {shipped['machine']})")
    raise InputError("no learning-rate choices for these settings, tasks and methods: run `lora2 compare --sweep "
                     "...` with them (it tries each method's lr grid on the validation split first).")


# --- stage 2: the comparison -------------------------------------------------------------------------------


def compare(cfg: CompareConfig, command: str = "", progress: bool = True, sweep: bool = False,
            overwrite: bool = False) -> dict[str, Any]:
    """Run (or continue) the comparison in ``cfg.output_dir``: a new or empty folder, an earlier comparison
    (its finished runs are read back), or, with ``overwrite``, another lora2 output. One process at a time."""
    from .loading import resolve_model_path

    out = Path(cfg.output_dir)

    def is_comparison(folder: Path) -> bool:  # its tables, its sweep, or runs it started (runs/TASK/METHOD/lrLR/seedN)
        return ((folder / "results.json").is_file() or (folder / SWEEP_FILE).is_file()
                or any(folder.glob("runs/*/*/lr*/seed*/train_config.json")))

    def check() -> None:
        check_output_folder(out, {"base model": resolve_model_path(cfg.model)}, overwrite, flag="--output-dir",
                            own=is_comparison, whole=False)

    check()  # before the lock creates the folder (an input must not get one)
    with folder_lock(out):
        check()  # again, now that no other lora2 process can change it
        return _compare(cfg, command, progress, sweep)


def _compare(cfg: CompareConfig, command: str, progress: bool, sweep: bool) -> dict[str, Any]:
    specs = [m for m in METHODS if m.key in cfg.methods]
    out = Path(cfg.output_dir)
    chosen, provenance = learning_rates(cfg, sweep, progress)
    plan = [(task, spec.key, seed, chosen["tasks"][task][spec.key]["chosen"])
            for task in cfg.tasks for spec in specs for seed in cfg.seeds]
    results = run_all(cfg, plan, "compare", progress)
    runs: list[dict[str, Any]] = []
    for (task, key, seed, lr), result in results.items():
        spec = _spec(key)
        tc = run_config(cfg, task, spec, seed, lr)
        if result is None:  # diverged: reported as such, left out of means
            runs.append({"task": task, "method": spec.key, "seed": seed, "lr": lr, "config": dataclasses.asdict(tc),
                         "result": None, "curves": {"eval": [], "loss": []}})
            continue
        runs.append({"task": task, "method": spec.key, "seed": seed, "lr": lr, "config": dataclasses.asdict(tc),
                     "result": {**dataclasses.asdict(result), "seconds_per_epoch": result.seconds_per_epoch},
                     "curves": _curves(Path(tc.output_dir), result.metric_name)})
    report = {
        "meta": {"date": datetime.date.today().isoformat(), "machine": machine_description(),
                 "command": command, "python": sys.version.split()[0], "torch": torch.__version__,
                 "config": dataclasses.asdict(cfg), "learning_rates_from": provenance},
        "methods": [dataclasses.asdict(s) for s in specs],
        "sweep": chosen,
        "runs": runs,
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=2))
    atomic_write_text(out / "results.md", results_markdown(report))
    plot_metric_vs_params(report, out / "metric_vs_params.png")
    plot_training_curves(report, out / "training_curves.png")
    plot_lr_sweep(report, out / "lr_sweep.png")
    lora2_runs = [r for r in runs if r["method"] == "lora2" and r["result"] is not None]
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, method): the numbers of results.md, with the best / tied marks on test."""
    rows = []
    labels = {m["key"]: m["label"] for m in report["methods"]}
    for task in dict.fromkeys(r["task"] for r in report["runs"]):
        task_rows = []
        for key in labels:
            all_runs = [r for r in report["runs"] if r["task"] == task and r["method"] == key]
            runs = [r for r in all_runs if r["result"] is not None]
            if not runs:
                continue
            results = [r["result"] for r in runs]
            metric = results[0]["metric_name"]
            validation = _mean_std([r["metric_after"] for r in results])
            tests = [r["test_metrics"][metric] for r in results if r.get("test_metrics")]
            test = _mean_std(tests) if tests else (math.nan, math.nan)
            task_rows.append({
                "task": task, "method": key, "label": labels[key], "metric_name": metric, "lr": runs[0]["lr"],
                "trainable": results[0]["trainable_parameters"], "total": results[0]["total_parameters"],
                "validation": validation[0], "validation_std": validation[1], "test": test[0], "test_std": test[1],
                "test_by_seed": {r["seed"]: r["result"]["test_metrics"][metric] for r in runs
                                 if r["result"].get("test_metrics")},
                "before": statistics.fmean(r["metric_before"] for r in results),
                "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in results),
                "peak_memory_mb": max(r["peak_memory_mb"] for r in results), "seeds": len(runs), "mark": "",
                "diverged": len(all_runs) - len(runs),
            })
        mark_best(task_rows)
        rows += task_rows
    return rows


def mark_best(rows: list[dict[str, Any]]) -> None:
    """"best" for the top test mean only if its mean − std clears every other method's mean + std
    (non-overlapping ±1 std over seeds); otherwise every method whose interval reaches the top's is
    "tied" (for best). With 3 seeds this is a deliberately cautious rule: it calls a difference only
    where the seeds' spread cannot explain it."""
    scored = [r for r in rows if not math.isnan(r["test"])]
    if len(scored) < 2:
        return
    top = max(scored, key=lambda r: r["test"])
    overlapping = [r for r in scored if r is not top and r["test"] + r["test_std"] >= top["test"] - top["test_std"]]
    if not overlapping:
        top["mark"] = "best"
    else:
        for r in [top, *overlapping]:
            r["mark"] = "tied"


def paired_differences(report: dict[str, Any], reference: str = "lora2") -> list[dict[str, Any]]:
    """Per task and baseline: reference − baseline on the test split, seed by seed (same data order),
    mean ± std of the differences."""
    out = []
    for task in dict.fromkeys(r["task"] for r in report["runs"]):
        rows = {r["method"]: r for r in summarize(report) if r["task"] == task}
        if reference not in rows:
            continue
        mine = rows[reference]["test_by_seed"]
        for key, row in rows.items():
            seeds = sorted(set(mine) & set(row["test_by_seed"]))
            if key == reference or not seeds:
                continue
            diffs = [mine[s] - row["test_by_seed"][s] for s in seeds]
            mean, std = _mean_std(diffs)
            out.append({"task": task, "method": key, "label": row["label"], "mean": mean, "std": std,
                        "wins": sum(d > 0 for d in diffs), "seeds": len(seeds)})
    return out


def results_markdown(report: dict[str, Any]) -> str:
    meta, cfg = report["meta"], report["meta"]["config"]
    rows = summarize(report)
    sizes = "whole training and validation sets" if cfg["max_train_samples"] is None else (
        f"training sets subsampled to {cfg['max_train_samples']} rows, validation to {cfg['max_eval_samples']}")
    steps = f"{cfg['max_steps']} optimiser steps" if cfg["max_steps"] else f"{cfg['epochs']:g} epochs"
    lines = [
        f"# LoRA² vs baselines — {meta['date']}, {meta['machine']}", "",
        f"Command: `{meta['command']}`", "",
        f"Model `{cfg['model']}`{' quantised to 4-bit NF4 (every method on the same 4-bit base)' if cfg.get('load_in_4bit') else ''}; "
        f"{sizes}, whole test sets; {steps} of batch {cfg['batch_size']}, max "
        f"{cfg['max_length']} tokens; seeds {cfg['seeds']}. Learning rates: each method's grid tried on the first "
        f"seed, the final model's **validation** score decides (from {meta['learning_rates_from']}). Reported: the "
        "final model of every seed on the **test** split, which nothing was chosen on, mean ± std. **best**: its mean "
        "− std clears every other method's mean + std; **tied**: the methods whose ±1 std interval reaches the top "
        "one's. Time: optimiser steps only, per epoch of the (subsampled) training set. Peak memory: above the "
        "loaded model (CPU: sampled resident set).", "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric_name"]
        lines += [f"## {task} — {TASK_KINDS.get(task, '')}, {metric}", "",
                  "| method | trainable params | % of model | lr (chosen) | validation | test (before → after) | "
                  "| s / epoch | peak MiB |",
                  "|---|---:|---:|---:|---:|---|---|---:|---:|"]
        for r in task_rows:
            mark = f"**{r['mark']}**" if r["mark"] else ""
            if r["diverged"]:
                mark += f" ({r['diverged']} seed{'s' if r['diverged'] > 1 else ''} diverged)"
            lines.append(f"| {r['label']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} % | "
                         f"{r['lr']:g} | {r['validation']:.3f} ± {r['validation_std']:.3f} | {r['before']:.3f} → "
                         f"{r['test']:.3f} ± {r['test_std']:.3f} | {mark} | {r['seconds_per_epoch']:.1f} | "
                         f"{r['peak_memory_mb']:.0f} |")
        lines.append("")
    diffs = paired_differences(report)
    if diffs:
        lines += ["## LoRA² minus each method, on test, seed by seed", "",
                  "| task | method | LoRA² − method (mean ± std over seeds) | seeds LoRA² ahead |", "|---|---|---:|---:|"]
        lines += [f"| {d['task']} | {d['label']} | {d['mean']:+.3f} ± {d['std']:.3f} | {d['wins']} of {d['seeds']} |"
                  for d in diffs]
        lines.append("")
    labels = {m["key"]: m["label"] for m in report["methods"]}
    width = max((len(e["grid"]) for m in report["sweep"]["tasks"].values() for e in m.values()), default=0)
    lines += ["## Learning-rate sweep (first seed, final validation metric; chosen in bold)", "",
              "| task | method | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " |",
              "|---|---|" + "---|" * width]
    for task, methods in report["sweep"]["tasks"].items():
        for key, entry in methods.items():
            if key not in labels or task not in {r["task"] for r in rows}:
                continue
            cells = [(f"**{lr:g}: {entry['validation'][f'{lr:g}']:.3f}**" if lr == entry["chosen"]
                      else f"{lr:g}: {entry['validation'][f'{lr:g}']:.3f}") for lr in entry["grid"]]
            edge = " (at the grid's edge)" if entry.get("at_edge") else ""
            lines.append(f"| {task} | {labels[key]}{edge} | " + " | ".join(cells) + " |")
    lines += ["", "## Hyper-parameters", "", "| method | lr grid | settings | source |", "|---|---|---|---|"]
    for m in report["methods"]:
        settings = ", ".join(f"{k}={v}" for k, v in m["settings"].items()) or "all parameters"
        grid = ", ".join(f"{lr:g}" for lr in m["lr_grid"])
        lines.append(f"| {m['label']} | {grid} | {settings} | {m['source']} |")
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
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    return path


def _metric_of(report: dict[str, Any], task: str) -> str:
    return next(r["result"]["metric_name"] for r in report["runs"] if r["task"] == task and r["result"])


def plot_metric_vs_params(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    rows = summarize(report)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, r in enumerate(x for x in rows if x["task"] == task):
            ax.errorbar(r["trainable"], r["test"], yerr=r["test_std"], fmt="o", capsize=3, color=f"C{i}",
                        label=r["label"])
        ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel=f"test {_metric_of(report, task)}")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
    _finish(fig, axes[0][0], path, legend_height=0.14)
    plt.close(fig)
    return path


def plot_training_curves(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in report["runs"]))
    labels = {m["key"]: m["label"] for m in report["methods"]}
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.6 * len(tasks), 6.8), squeeze=False)
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
        axes[0][col].set(title=task, ylabel=f"validation {_metric_of(report, task)}")
        # what each method minimises: LoRA²'s and AdaLoRA's include their orthogonality regularisers
        # (≈ 0.05 and ≈ 0.2 at the start on MiniLM), so their curves sit above LoRA's for that reason alone
        axes[1][col].set(xlabel="step", ylabel="training loss (+ regulariser, if any)")
        for row in (0, 1):
            axes[row][col].grid(alpha=0.3)
    _finish(fig, axes[0][0], path, legend_height=0.09)
    plt.close(fig)
    return path


def plot_lr_sweep(report: dict[str, Any], path: Path) -> Path:
    """Validation metric against learning rate: where each method's choice sits in its grid."""
    plt = _pyplot()
    labels = {m["key"]: m["label"] for m in report["methods"]}
    tasks = [t for t in report["sweep"]["tasks"] if t in {r["task"] for r in report["runs"]}]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, key in enumerate(labels):
            entry = report["sweep"]["tasks"][task].get(key)
            if entry is None:
                continue
            values = [entry["validation"][f"{lr:g}"] for lr in entry["grid"]]
            ax.plot(entry["grid"], values, marker="o", markersize=3, color=f"C{i}", label=labels[key])
            ax.plot([entry["chosen"]], [entry["validation"][f"{entry['chosen']:g}"]], marker="*", markersize=11,
                    color=f"C{i}")
        ax.set(xscale="log", xlabel="learning rate (log)", ylabel=f"validation {_metric_of(report, task)}")
        ax.set_title(f"{task} (★ chosen)", fontsize=10)
        ax.grid(alpha=0.3)
    _finish(fig, axes[0][0], path, legend_height=0.14)
    plt.close(fig)
    return path
