"""The LoRA² training loop, top to bottom.

    load model + tokenizer + data → inject LoRA² (or a baseline, see methods.py) → AdamW + linear
    warm-up → for each step: forward (loss + orthogonality regulariser) → backward → clip →
    optimiser step → rank allocator (score λ, B₁, A₂; prune to the cubic budget) → log / eval /
    checkpoint. Under torchrun the same loop runs in every process (see distributed.py).

``train()`` is that loop and nothing else; each stage is a named helper below it, in the order it
runs: ``_set_up`` (folder lock and policy, data, model, optimiser, checkpoint or first evaluation),
``_step_batches``, ``_forward_backward``, ``_optimizer_step``, ``_check_in`` (read the loss, refuse
NaN, log), ``_evaluate_and_checkpoint``, ``_checkpoint_and_stop`` (a signal), ``_finish``.

A checkpoint (``OUTPUT/checkpoint``) holds everything a killed run needs to continue to the very
same result: adapter, allocator EMAs and masks, optimiser, scheduler, RNG state, step. It is
written to a staging folder and swapped in by rename, so a crash mid-write keeps the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import fsdp as fsdp_
from .data import (
    BUILTIN_DATASETS,
    Collator,
    TextDataset,
    batches,
    batches_per_epoch,
    build_dataset,
    builtin_dataset_files,
)
from .distributed import fsdp_requested, init_from_env, wrap
from .errors import InputError
from .io import atomic_write_text
from .loading import (  # noqa: F401 -- re-exported: lora2.train was their home
    DEFAULT_MODEL,
    load_base_model,
    load_base_model_and_report,
    load_tokenizer,
    resolve_model_path,
)
from .memory import PeakMemory
from .methods import METHODS, Method, build_method, total_parameter_count, trainable_parameter_count
from .metrics import PRIMARY_METRIC, classification_metrics, lm_metrics, regression_metrics
from .run_folder import (  # noqa: F401 -- CheckpointError, records_config: re-exported, lora2.train was their home
    CHECKPOINT_DIR,
    RESULT_FILE,
    STATE_FILE,
    CheckpointError,
    absolute_paths,
    check_same_inputs,
    claim_output_dir,
    clear_run_files,
    finished_result,
    input_fingerprints,
    load_checkpoint,
    normalised,
    records_config,
    save_checkpoint,
    write_whole,
)

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message names the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM arrived; a resumable checkpoint was written first."""


@dataclass
class TrainConfig:
    """Everything ``lora2 train`` needs; saved as ``train_config.json`` so ``--resume`` can rebuild the run."""

    model: str = DEFAULT_MODEL
    method: str = "lora2"  # or a baseline for comparisons: lora, adalora (PEFT), full
    output_dir: str = "runs/lora2-sst2"
    dataset: str | None = "sst2"
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None  # scored once, by the final model, and never used to choose anything
    task: str = "classification"
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 64
    max_train_samples: int | None = 2000
    max_eval_samples: int | None = 500
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    learning_rate: float = 2e-2
    head_learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    precision: str = "auto"
    eval_every: int = 50
    log_every: int = 10
    seed: int = 0
    save_checkpoints: bool = True  # checkpoint/ and best/ at every evaluation (off: only the final adapter)
    lora2: dict[str, Any] = field(default_factory=lambda: {"r": 8, "k": 8, "target_rank": 6, "alpha": 16.0})
    # settings of a baseline method (LoraConfig / AdaLoraConfig fields); LoRA² reads ``lora2``
    method_settings: dict[str, Any] = field(default_factory=dict)
    # QLoRA²: the base's adapted linear layers as bitsandbytes 4-bit weights
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # or fp4
    double_quant: bool = False  # quantise the absmax too (about 0.37 bits a value less)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"TrainConfig.method must be one of {METHODS}, got {self.method!r}.")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "eval_every", "log_every", "max_length"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.epochs <= 0 and not self.max_steps:
            raise InputError("TrainConfig.epochs must be > 0 (or set max_steps).")
        if not self.learning_rate > 0:
            raise InputError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.warmup_ratio <= 1:
            raise InputError(f"--warmup-ratio is the share of the steps spent warming up, between 0 and 1; got "
                             f"{self.warmup_ratio} (with more than 1 the learning rate would never reach its peak).")
        if not self.weight_decay >= 0 or not self.max_grad_norm > 0:
            raise InputError(f"--weight-decay must be >= 0 and max_grad_norm > 0; got {self.weight_decay} and "
                             f"{self.max_grad_norm}.")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise InputError(f"--head-learning-rate must be > 0, got {self.head_learning_rate}.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InputError(f"TrainConfig.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}.")
        if self.dataset is None and self.train_file is None:
            raise InputError("give a dataset name (e.g. sst2) or --train-file.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise InputError(f"--bnb-4bit-quant-type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}.")
        if self.load_in_4bit and self.method == "full":
            raise InputError("--load-in-4bit freezes the base in 4 bits; --method full would train those weights. "
                             "Use an adapter method (lora2, lora, adalora) or drop --load-in-4bit.")
        if self.dataset is not None and self.dataset not in BUILTIN_DATASETS:
            raise InputError(f"unknown built-in dataset {self.dataset!r}; built-in: {sorted(BUILTIN_DATASETS)}, "
                             "or pass --train-file / --validation-file.")
        if self.dataset is not None:  # a built-in dataset knows its task and columns
            for key, value in BUILTIN_DATASETS[self.dataset].items():
                setattr(self, key, value)


# --- data ------------------------------------------------------------------------------------------


def data_files(cfg: TrainConfig) -> dict[str, str | None]:
    """The files a run reads, by role. A built-in dataset gives its training split, and its validation
    split unless --validation-file names one."""
    files = {"training file": cfg.train_file, "validation file": cfg.validation_file, "test file": cfg.test_file}
    if cfg.dataset is not None:
        builtin_train, builtin_validation = builtin_dataset_files(cfg.dataset)
        files["training file"] = str(builtin_train)
        files["validation file"] = cfg.validation_file or str(builtin_validation)
    return files


def load_datasets(cfg: TrainConfig, tokenizer: Any) -> tuple[TextDataset, TextDataset]:
    files = data_files(cfg)
    train_file, validation_file = files["training file"], files["validation file"]
    if validation_file is None:
        raise InputError("give --validation-file (or a built-in dataset): lora2 evaluates before and after training.")
    label = None if cfg.task == "causal-lm" else cfg.label_column
    train = build_dataset(train_file, tokenizer, cfg.task, cfg.text_column, label, cfg.text_pair_column,
                          cfg.max_length, max_samples=cfg.max_train_samples)
    evaluation = build_dataset(validation_file, tokenizer, cfg.task, cfg.text_column, label, cfg.text_pair_column,
                               cfg.max_length, label_names=train.label_names or None,
                               max_samples=cfg.max_eval_samples)
    return train, evaluation


# --- evaluation ------------------------------------------------------------------------------------


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


class MetricSums:
    """What an evaluation adds up batch by batch (predictions, or the LM's summed loss) and the metrics of it."""

    def __init__(self, dataset: TextDataset) -> None:
        self.dataset = dataset
        self.preds: list[np.ndarray] = []
        self.golds: list[np.ndarray] = []
        self.lm_loss, self.lm_tokens = 0.0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        if self.dataset.task == "causal-lm":
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            self.lm_loss += float(torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum"))
            self.lm_tokens += int((shift_labels != -100).sum())
        elif self.dataset.task == "regression":
            self.preds.append(logits.squeeze(-1).cpu().numpy())
            self.golds.append(labels.cpu().numpy())
        else:
            self.preds.append(logits.argmax(-1).cpu().numpy())
            self.golds.append(labels.cpu().numpy())

    def metrics(self) -> dict[str, float]:
        if self.dataset.task == "causal-lm":
            return lm_metrics(self.lm_loss, self.lm_tokens)
        pred, gold = np.concatenate(self.preds), np.concatenate(self.golds)
        if self.dataset.task == "regression":
            return regression_metrics(pred, gold)
        return classification_metrics(pred, gold, self.dataset.num_labels)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TextDataset, collate: Collator, batch_size: int,
             device: torch.device, precision: str = "fp32") -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums = MetricSums(dataset)
    for batch in batches(dataset, batch_size, collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, precision):
            # Every metric comes from the logits, so the model gets no labels and computes no loss. (A PEFT
            # AdaLoRA model loaded for inference would also fail on one: its forward then adds the
            # regulariser of a training adapter it does not have.)
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
        sums.add(out.logits, batch["labels"])
    model.train(was_training)
    return sums.metrics()


# --- the loop ----------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _pick_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _optimizer(method: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    return adamw(method.model.named_parameters(), method.is_head, cfg)


def adamw(named_parameters: Iterable[tuple[str, torch.Tensor]], is_head: Callable[[str], bool],
          cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, in their order: decayed, not decayed, the head at its own rate."""
    decay, no_decay, head = [], [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        if cfg.head_learning_rate is not None and is_head(name):
            head.append(p)
        elif p.ndim < 2:  # biases, norms and λ: decaying them only fights the allocator and the norms
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head:
        groups.append({"params": head, "weight_decay": cfg.weight_decay, "lr": cfg.head_learning_rate})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


@dataclass
class TrainResult:
    output_dir: str
    method: str
    metric_name: str
    metric_before: float
    metric_after: float
    best_metric: float
    steps: int
    steps_per_epoch: int
    seconds: float  # wall time of the run, evaluations included
    train_seconds: float  # optimiser steps only: the cost that scales with the data
    peak_memory_mb: float  # CUDA allocator peak, or sampled CPU resident-set peak, above the loaded model
    trainable_parameters: int
    total_parameters: int
    history: list[dict[str, Any]]
    steps_timed: int | None = None  # steps this process ran (fewer than ``steps`` after a resume)
    test_metrics: dict[str, float] | None = None  # the final model on TrainConfig.test_file

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(self.steps_timed or self.steps, 1) * self.steps_per_epoch


def train(cfg: TrainConfig, resume: bool = False, device: str | torch.device | None = None,
          callbacks: list[Callable[[dict[str, Any]], None]] | None = None, progress: bool = True,
          fsdp: bool | fsdp_.FSDPOptions = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune ``cfg.model`` with ``cfg.method`` on ``cfg``'s data; see the module docstring for the flow.

    Under ``torchrun`` / ``accelerate launch`` every process runs this same function (see
    ``distributed.py``); ``cfg.batch_size`` is then the global batch, split across processes.
    ``fsdp`` (True or options) shards the frozen base across them with FSDP2 instead (``fsdp.py``).
    ``cfg.output_dir`` must be new, empty, or this run's own (the same settings, or ``resume``);
    ``overwrite`` replaces another run there (the rules: ``run_folder.py``). ``resume`` of a finished run
    returns its result and changes nothing.
    """
    cfg = dataclasses.replace(absolute_paths(cfg), output_dir=str(normalised(cfg.output_dir)))
    if resume and (done := finished_result(cfg.output_dir)) is not None:
        logger.info("the run in %s finished (%s); nothing to resume, its files are left as they are",
                    cfg.output_dir, RESULT_FILE)
        known = {f.name for f in dataclasses.fields(TrainResult)}
        return TrainResult(**{key: value for key, value in done.items() if key in known})
    hint = f"resume with `lora2 train --resume {cfg.output_dir}`" if resume else "nothing was trained: start it again"
    with ExitStack() as stack:  # the run folder's lock, the signal handlers: released however train() ends
        stop = stack.enter_context(_stop_on_signals(hint))
        run = _set_up(cfg, resume, overwrite, device, progress, fsdp, stack, stop)
        with run.bar, run.peak:
            step = run.state["step"]
            for micro_batches in _step_batches(run, step):
                for micro, batch in enumerate(micro_batches, start=1):
                    run.window[0] += _forward_backward(run, batch, last=micro == cfg.grad_accum)
                step += 1
                budget = _optimizer_step(run, step)
                record: dict[str, Any] = {"step": step, "lr": run.scheduler.get_last_lr()[0], "budget": budget}
                evaluating = step % cfg.eval_every == 0 or step == run.total_steps
                # a signal is acted on at the end of a step; under DDP the ranks agree on it on check steps only
                stopping = stop["signal"] is not None and not run.ctx.enabled
                if step % cfg.log_every == 0 or evaluating or stopping:
                    stopping = _check_in(run, step, record, stop) or stopping
                if evaluating:
                    _evaluate_and_checkpoint(run, step, record)
                for callback in callbacks or []:
                    callback(record)
                if stopping or (stop["signal"] is not None and not run.ctx.enabled):
                    _checkpoint_and_stop(run, step, stop)
        # the final evaluation and writes: a signal now stops at once (the adapter is written whole or not at all)
        stop.update(phase="finishing", hint=f"resume with `lora2 train --resume {cfg.output_dir}` to finish it"
                    if cfg.save_checkpoints else "start it again to finish it")
        return _finish(run)


@dataclass
class _Run:
    """Everything the loop reads and updates, built once by ``_set_up``."""

    cfg: TrainConfig
    out: Path
    ctx: Any  # distributed.DistributedContext
    device: torch.device
    precision: str
    sharded: bool
    method: Method
    model: torch.nn.Module  # the adapted model (FSDP-sharded under fsdp)
    trained: torch.nn.Module  # what the forward runs: DDP around the model, or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    tokenizer: Any
    train_set: TextDataset
    eval_set: TextDataset
    collate: Collator
    steps_per_epoch: int
    total_steps: int
    metric_name: str
    # step, best, metric_before, history, data_sha256 (fingerprints of the data and the base model): in every checkpoint
    state: dict[str, Any]
    evaluates: bool  # under FSDP every rank runs every forward, so every rank evaluates; else rank 0 alone
    use_bar: bool
    bar: Any
    peak: PeakMemory
    whole: list[torch.nn.Parameter]  # what sync_gradients averages under FSDP
    start: float
    first_step: int
    # The host reads device values only on "check" steps (logging, evaluation, the last step): every
    # float() of a CUDA tensor stalls the launch queue. Losses accumulate on the device in between.
    window: torch.Tensor  # [loss sum since the last check, stop flag]
    window_start: int
    window_clock: float
    eval_seconds: float = 0.0
    final_metrics: dict[str, float] | None = None  # the evaluation at the last step, reused as the final one


def _set_up(cfg: TrainConfig, resume: bool, overwrite: bool, device: str | torch.device | None, progress: bool,
            fsdp: bool | fsdp_.FSDPOptions, stack: ExitStack, stop: dict[str, Any]) -> _Run:
    """Everything before the first step: process group, output folder, data, model, optimiser, then the
    checkpoint (resume) or the evaluation before training. A signal in here stops at once."""
    out = Path(cfg.output_dir)
    device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    sharded = fsdp_requested(fsdp is not False)
    if sharded and cfg.method == "full":
        raise InputError("--fsdp shards the frozen base and keeps the trained parameters whole; full fine-tuning "
                         "trains every parameter, so nothing would be sharded. Use an adapter method, or train "
                         "--method full with DDP (no --fsdp).")
    ctx = init_from_env(device_type, require_group=sharded)
    device = torch.device(device or (f"cuda:{ctx.local_rank}" if device_type == "cuda" else "cpu"))
    if cfg.batch_size % ctx.world_size:
        raise InputError(f"batch_size {cfg.batch_size} must be a multiple of the {ctx.world_size} processes "
                         "(it is the global batch, split evenly across them).")
    model_path = resolve_model_path(cfg.model)
    inputs = {**data_files(cfg), "base model": model_path}
    _agree(ctx, lambda: claim_output_dir(out, cfg, inputs, resume, overwrite, stack) if ctx.is_main else None)
    precision = _pick_precision(cfg.precision, device)
    _seed_everything(cfg.seed)

    tokenizer = load_tokenizer(model_path)
    train_set, eval_set = load_datasets(cfg, tokenizer)
    base = _load_base(cfg, model_path, ctx, sharded, train_set, tokenizer)
    quantised = _quantise_base(base, cfg, device, sharded) if cfg.load_in_4bit else None
    collate = Collator(tokenizer.pad_token_id, cfg.task)
    steps_per_epoch = _steps_per_epoch(cfg, len(train_set), ctx.world_size)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    method = build_method(cfg.method, base, cfg.lora2 if cfg.method == "lora2" else cfg.method_settings, total_steps)
    method.data_info = {"dataset": cfg.dataset, "columns": {"text_column": cfg.text_column,
                                                            "text_pair_column": cfg.text_pair_column,
                                                            "label_column": cfg.label_column},
                        "base_4bit": {"quant_type": cfg.bnb_4bit_quant_type, "double_quant": cfg.double_quant,
                                      "modules": quantised} if cfg.load_in_4bit else None}
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        model = fsdp_.shard(method.model, init_device_mesh(device.type, (ctx.world_size,)),
                            fsdp_.options_from_accelerate(fsdp if isinstance(fsdp, fsdp_.FSDPOptions) else None),
                            param_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))
    else:
        model = method.model.to(device)
    if cfg.method == "lora2" and ctx.is_main:
        _log_kernel_plan(model, device, precision)
    if cfg.method == "lora2" and device.type == "cuda":  # autotune now, not inside the first training steps
        import lora2_kernels

        lora2_kernels.warmup(model, tokens=cfg.batch_size // ctx.world_size * cfg.max_length,
                             dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
                             eval_tokens=cfg.eval_batch_size * cfg.max_length)  # evaluations: no dropout
    optimizer = _optimizer(method, cfg)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    fingerprints = input_fingerprints(data_files(cfg), model_path)
    use_bar = progress and ctx.is_main and sys.stderr.isatty()
    # A progress bar on a terminal; otherwise (a file, a CI log, nohup, --no-progress) one log line
    # per log step, since a bar written to a file is a single line of carriage returns.
    run = _Run(cfg=cfg, out=out, ctx=ctx, device=device, precision=precision, sharded=sharded, method=method,
               model=model, trained=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, tokenizer=tokenizer,
               train_set=train_set, eval_set=eval_set, collate=collate, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, metric_name=PRIMARY_METRIC[cfg.task],
               state={"step": 0, "best": -math.inf, "metric_before": None, "history": [], "data_sha256": fingerprints},
               evaluates=ctx.is_main or sharded, use_bar=use_bar, bar=None, peak=PeakMemory(device),
               whole=fsdp_.trainable_parameters(model) if sharded else [], start=0.0, first_step=0,
               window=torch.zeros(2, device=device), window_start=0, window_clock=0.0)
    if resume:
        run.state = load_checkpoint(out / CHECKPOINT_DIR, method, optimizer, scheduler, scaler)
        check_same_inputs(run.state.get("data_sha256"), fingerprints, out)
        run.state["data_sha256"] = fingerprints  # a run from before the base model was fingerprinted gets one
        logger.info("resumed from %s at step %d", out / CHECKPOINT_DIR, run.state["step"])
    else:
        if ctx.is_main:
            clear_run_files(out)
            atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        if run.evaluates:
            run.state["metric_before"] = _evaluate(run)[run.metric_name]
        if ctx.is_main:
            _log(out, {"step": 0, "event": "eval", run.metric_name: run.state["metric_before"]})
            logger.info("before training: %s = %.4f", run.metric_name, run.state["metric_before"])
    run.trained = model if sharded else wrap(model, ctx, device)  # DDP in multi-process runs
    stop["phase"] = "training"  # from here a signal finishes the current step and checkpoints
    run.first_step = run.window_start = run.state["step"]
    run.bar = tqdm(total=total_steps, initial=run.first_step, disable=not use_bar, desc=f"{cfg.method} train",
                   dynamic_ncols=True)
    model.train()
    run.start = run.window_clock = time.perf_counter()
    return run


def _step_batches(run: _Run, step: int):
    """From optimiser step ``step`` to the last one: each step's micro-batches. Each epoch has its own
    seeded order, so a resumed run continues mid-epoch at the very batch it stopped before; the last
    micro-batches of an epoch, short of a full --grad-accum, are not run."""
    cfg = run.cfg
    while step < run.total_steps:
        epoch, into = divmod(step, run.steps_per_epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        micro = batches(run.train_set, cfg.batch_size, run.collate, generator, skip=into * cfg.grad_accum,
                        shard=run.ctx.shard)
        for _ in range(min(run.steps_per_epoch - into, run.total_steps - step)):
            yield [next(micro) for _ in range(cfg.grad_accum)]
            step += 1


def _forward_backward(run: _Run, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
    """One micro-batch's forward and backward; its loss stays on the device."""
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    sync = last or not run.ctx.enabled or run.sharded
    with nullcontext() if sync else run.trained.no_sync():  # DDP all-reduces once per optimiser step
        with autocast_context(run.device, run.precision):
            loss = run.trained(**batch).loss / run.cfg.grad_accum
        run.scaler.scale(loss).backward()
    if run.sharded and last:
        fsdp_.sync_gradients(run.whole, run.ctx.world_size)
    return loss.detach()


def _optimizer_step(run: _Run, step: int) -> int | None:
    """Clip, step, schedule; then the rank allocator, which reads this step's gradients. Returns its budget."""
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                   run.cfg.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    budget = run.method.after_optimizer_step(step)
    run.optimizer.zero_grad(set_to_none=True)
    run.bar.update(1)
    return budget


def _check_in(run: _Run, step: int, record: dict[str, Any], stop: dict[str, Any]) -> bool:
    """A check step: read the loss window (and, under DDP, every rank's stop vote), refuse a non-finite
    loss before anything is saved, log. Returns whether any rank was asked to stop."""
    run.window[1] = float(stop["signal"] is not None)
    loss_sum, stop_votes = (float(v) for v in run.ctx.all_reduce_sum(run.window))
    steps = step - run.window_start
    loss_value = loss_sum / run.ctx.world_size / steps
    if not math.isfinite(loss_value):
        raise TrainingError(diverged_message(run.out, loss_value, step, run.window_start))
    seconds_per_step = (time.perf_counter() - run.window_clock) / steps
    run.window_clock = time.perf_counter()
    run.window.zero_()
    run.window_start = step
    record["loss"] = loss_value
    regularizer = run.method.regularizer_loss()
    if regularizer is not None:
        record["orth_reg"] = regularizer
    if run.ctx.is_main:
        _log(run.out, {"event": "train", **record, "seconds_per_step": seconds_per_step})
        budget = record["budget"]
        if run.use_bar:
            run.bar.set_postfix(loss=f"{loss_value:.4f}", **({"budget": budget} if budget is not None else {}),
                                **({run.metric_name: f"{run.state['best']:.4f}"} if run.state["history"] else {}))
        else:
            logger.info("step %d/%d  loss %.4f  lr %.2e%s  %.2f s/step", step, run.total_steps, loss_value,
                        record["lr"], f"  budget {budget}" if budget is not None else "", seconds_per_step)
    return stop_votes > 0


def diverged_message(out: Path, loss: float, step: int, window_start: int) -> str:
    """What a run (or a sweep's member) whose loss window turned non-finite says: when, and what is left."""
    last = out / CHECKPOINT_DIR
    when = f"at step {step}" if step - window_start == 1 else f"at step {step} (in steps {window_start + 1}–{step})"
    return (f"loss became {loss} {when}; stopped without saving. Last good checkpoint: "
            f"{last if last.exists() else 'none yet'} (resume with --resume and a lower learning rate).")


def _evaluate(run: _Run, dataset: TextDataset | None = None) -> dict[str, float]:
    return evaluate(run.model, dataset or run.eval_set, run.collate, run.cfg.eval_batch_size, run.device,
                    run.precision)


def _evaluate_and_checkpoint(run: _Run, step: int, record: dict[str, Any]) -> None:
    tick = time.perf_counter()
    if run.evaluates:
        metrics = _evaluate(run)
        run.final_metrics = metrics if step == run.total_steps else None
    if not run.ctx.is_main:
        return
    if not run.use_bar:
        logger.info("step %d/%d  eval %s %.4f", step, run.total_steps, run.metric_name, metrics[run.metric_name])
    record.update({f"eval_{k}": v for k, v in metrics.items()})
    record_evaluation(run.out, run.cfg, run.state, metrics, run.metric_name, step, record["budget"], run.method,
                      run.optimizer, run.scheduler, run.scaler)
    run.eval_seconds += time.perf_counter() - tick


def record_evaluation(out: Path, cfg: TrainConfig, state: dict[str, Any], metrics: dict[str, float],
                      metric_name: str, step: int, budget: int | None, method: Any, optimizer: Any, scheduler: Any,
                      scaler: Any) -> None:
    """An evaluation's mark on a run folder (a single run's, or a sweep member's): the log line, the
    history, ``best/`` when it improved, ``checkpoint/``."""
    _log(out, {"step": step, "event": "eval", **metrics})
    state["history"].append({"step": step, metric_name: metrics[metric_name], "budget": budget})
    improved = metrics[metric_name] > state["best"]
    state["best"] = max(state["best"], metrics[metric_name])
    state["step"] = step
    if cfg.save_checkpoints:
        if improved:
            write_whole(out / "best", method.save, f"the step-{step} best adapter",
                        f"resume with `lora2 train --resume {out}`", "best adapter")
        save_checkpoint(out / CHECKPOINT_DIR, method, optimizer, scheduler, scaler, state, out)


def _checkpoint_and_stop(run: _Run, step: int, stop: dict[str, Any]) -> None:
    run.state["step"] = step
    if run.ctx.is_main:
        save_checkpoint(run.out / CHECKPOINT_DIR, run.method, run.optimizer, run.scheduler, run.scaler, run.state,
                        run.out)
    run.ctx.barrier()  # no rank exits (and gets its peers killed) before the checkpoint is on disk
    raise TrainingInterrupted(f"stopped by signal {stop['signal'] or 'on another rank'} at step {step}; resume with "
                              f"`lora2 train --resume {run.out}`.")


def _finish(run: _Run) -> TrainResult:
    """The final evaluation (and the test file, once), the adapter, result.json; every rank returns rank 0's result."""
    cfg = run.cfg
    seconds = time.perf_counter() - run.start
    result = test_metrics = None
    if run.evaluates:
        run.final_metrics = run.final_metrics or _evaluate(run)
        if cfg.test_file is not None:
            label = None if cfg.task == "causal-lm" else cfg.label_column
            test_set = build_dataset(cfg.test_file, run.tokenizer, cfg.task, cfg.text_column, label,
                                     cfg.text_pair_column, cfg.max_length,
                                     label_names=run.train_set.label_names or None)
            test_metrics = _evaluate(run, test_set)
    if run.ctx.is_main:
        write_whole(run.out / "adapter", run.method.save, "the final adapter",
                    f"resume with `lora2 train --resume {run.out}`" if cfg.save_checkpoints
                    else "start the run again", "final adapter")
        final = run.final_metrics[run.metric_name]
        if test_metrics is not None:
            _log(run.out, {"step": run.total_steps, "event": "test", "rows": len(test_set), **test_metrics})
            logger.info("test (%d rows of %s): %s %.4f", len(test_set), cfg.test_file, run.metric_name,
                        test_metrics[run.metric_name])
        result = TrainResult(
            output_dir=str(run.out), method=cfg.method, metric_name=run.metric_name,
            metric_before=run.state["metric_before"], metric_after=final, best_metric=max(run.state["best"], final),
            steps=run.total_steps, steps_per_epoch=run.steps_per_epoch, seconds=time.perf_counter() - run.start,
            train_seconds=seconds - run.eval_seconds, steps_timed=run.total_steps - run.first_step,
            peak_memory_mb=run.peak.mebibytes, trainable_parameters=trainable_parameter_count(run.model),
            total_parameters=total_parameter_count(run.model), history=run.state["history"],
            test_metrics=test_metrics)
        atomic_write_text(run.out / RESULT_FILE, json.dumps(dataclasses.asdict(result), indent=2))
    return run.ctx.broadcast_object(result)


# --- set-up helpers ------------------------------------------------------------------------------------


def _agree(ctx: Any, check: Callable[[], None]) -> None:
    """Run ``check`` (on rank 0) and raise its error on every rank, so no rank waits for a peer that quit."""
    problem = None
    try:
        check()
    except (InputError, OSError) as e:
        problem = e
    message = ctx.broadcast_object(str(problem) if problem is not None else None)
    if problem is not None:
        raise problem
    if message is not None:
        raise InputError(message)


def _load_base(cfg: TrainConfig, model_path: str, ctx: Any, sharded: bool, train_set: TextDataset,
               tokenizer: Any) -> torch.nn.Module:
    if sharded and not ctx.is_main:  # rank 0 reads the weights; the others wait for their shards (fsdp.py)
        base, fresh = fsdp_.meta_copy_of(ctx.broadcast_object(None), cfg.task), []
    else:
        base, fresh = load_base_model_and_report(model_path, cfg.task, max(train_set.num_labels, 1))
        if sharded:
            ctx.broadcast_object(base.config)
    if fresh and ctx.is_main:
        heads = sorted({k.rsplit(".", 1)[0] for k in fresh})
        logger.info("%s has no trained %s for this task: %s initialised fresh and trained with the %s",
                    cfg.model, "head" if len(heads) == 1 else "layers", ", ".join(heads),
                    "model" if cfg.method == "full" else "adapter")
    if train_set.label_names:  # so merged models and reports show the dataset's label names
        base.config.id2label = dict(enumerate(train_set.label_names))
        base.config.label2id = {n: i for i, n in enumerate(train_set.label_names)}
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return base


def _steps_per_epoch(cfg: TrainConfig, examples: int, world_size: int) -> int:
    epoch_batches = batches_per_epoch(examples, cfg.batch_size, world_size)
    if epoch_batches < cfg.grad_accum:
        raise InputError(f"an epoch has {epoch_batches} batches of {cfg.batch_size}, fewer than --grad-accum "
                         f"{cfg.grad_accum}: no optimiser step could be taken. Lower --grad-accum or --batch-size.")
    if epoch_batches % cfg.grad_accum:
        logger.info("each epoch has %d batches: the last %d, short of a full --grad-accum of %d, are skipped "
                    "(their gradients would otherwise leak into the next epoch's first step)",
                    epoch_batches, epoch_batches % cfg.grad_accum, cfg.grad_accum)
    return epoch_batches // cfg.grad_accum


def _quantise_base(base: torch.nn.Module, cfg: TrainConfig, device: torch.device, sharded: bool) -> list[str]:
    """--load-in-4bit: the linears the adapter targets as bitsandbytes 4-bit weights, quantised with
    bitsandbytes directly (transformers' BitsAndBytesConfig loader wants a CUDA GPU; this works on the CPU
    too). Layers no adapter touches (BERT's pooler, the task head) keep their precision. Returns the names
    quantised, which the adapter records so eval and merge rebuild the very same base."""
    from lora2_kernels.four_bit import quantize_model, weight_bytes

    from .config import LoRA2Config

    if sharded:
        raise InputError("--load-in-4bit with --fsdp is not supported yet (FSDP2 would shard the packed 4-bit "
                         "bytes and their absmax apart); train a 4-bit base on one GPU, or shard a bf16 base.")
    if cfg.method == "adalora" and device.type != "cuda":
        raise InputError("--method adalora on a 4-bit base needs a GPU: on the CPU, PEFT's AdaLoRA layer adds in place "
                         "to bitsandbytes' output (a view autograd forbids). PEFT LoRA and LoRA² run here.")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    before = weight_bytes(base)
    settings = cfg.lora2 if cfg.method == "lora2" else cfg.method_settings
    targets = settings.get("target_modules")
    if targets is None:  # every method's default targets are LoRA²'s (methods.py)
        targets = LoRA2Config().resolved_target_modules(getattr(base.config, "model_type", None))
    names = quantize_model(base, cfg.bnb_4bit_quant_type, cfg.double_quant, compute_dtype=half, device=device,
                           modules=targets)
    if not names:
        raise InputError(f"--load-in-4bit: none of the layers the adapter adapts ({targets}) has rows of whole 64-value "
                         "blocks (in_features a multiple of 64), so nothing would be quantised and the run would not "
                         "be a 4-bit one. Drop --load-in-4bit, or adapt other layers (--target-modules).")
    logger.info("quantised the %d adapted linear layers to 4-bit %s%s with bitsandbytes directly (the others and "
                "the task head keep their precision): linear weights %.1f MiB, were %.1f MiB", len(names),
                cfg.bnb_4bit_quant_type, " with double quantisation" if cfg.double_quant else "",
                weight_bytes(base) / 2**20, before / 2**20)
    return names


# --- checkpoints, logs, signals ------------------------------------------------------------------------


def _log_kernel_plan(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """Say once which path the adapted layers take on this device (and why, where not the kernels)."""
    from lora2_kernels import LoRA2Linear

    layers = [m for m in model.modules() if isinstance(m, LoRA2Linear)]
    if not layers:
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, layers[0].weight.dtype)
    plan: dict[str, int] = {}
    for layer in layers:
        probe = torch.empty(0, layer.in_features, device=device, dtype=dtype)
        was_training = layer.training
        layer.train()
        try:
            backend, reason = layer.resolve_backend(probe, torch.empty(0, device=device, dtype=dtype))
        except RuntimeError as e:  # backend="triton" forced where it cannot run: the forward will raise the same
            backend, reason = "error", str(e)
        layer.train(was_training)
        key = backend if reason is None else f"{backend} ({reason})"
        plan[key] = plan.get(key, 0) + 1
    logger.info("LoRA² layers: %s", "; ".join(f"{n} on {k}" for k, n in plan.items()))


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), **record}) + "\n")


@contextmanager
def _stop_on_signals(hint: str) -> Iterator[dict[str, Any]]:
    """SIGINT / SIGTERM: during set-up (loading, the first evaluation) and after the last step (the final
    evaluation, the outputs) stop at once, since there is nothing to save; during training
    (``stop["phase"] = "training"``) only note it: the loop finishes the step, checkpoints and stops,
    never mid-update. Either way the CLI exits 130 with one line."""
    stop: dict[str, Any] = {"signal": None, "phase": "set-up", "hint": hint}

    def handler(signum: int, _frame: Any) -> None:
        stop["signal"] = signum
        if stop["phase"] != "training":
            when = "before the first step" if stop["phase"] == "set-up" else "after the last step, before its outputs"
            raise TrainingInterrupted(f"stopped by signal {signum} {when}; {stop['hint']}.")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
