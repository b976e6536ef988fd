"""The LoRA² training loop, top to bottom.

    load model + tokenizer + data → inject LoRA² (or a baseline, see methods.py) → AdamW + linear
    warm-up → for each step: forward (loss + orthogonality regulariser) → backward → clip →
    optimiser step → rank allocator (score λ, B₁, A₂; prune to the cubic budget) → log / eval /
    checkpoint. Under torchrun the same loop runs in every process (see distributed.py).

A checkpoint (``OUTPUT/checkpoint``) holds everything a killed run needs to continue to the very
same result: adapter, allocator EMAs and masks, optimiser, scheduler, RNG state, step. It is
written to a staging folder and swapped in by rename, so a crash mid-write keeps the previous one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import (
    BUILTIN_DATASETS,
    Collator,
    TextDataset,
    batches,
    batches_per_epoch,
    build_dataset,
    builtin_dataset_files,
)
from . import fsdp as fsdp_
from .distributed import fsdp_requested, init_from_env, wrap
from .errors import InputError
from .io import atomic_write_dir, atomic_write_text, recover_dir
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

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message names the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM arrived; a resumable checkpoint was written first."""


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


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
    # QLoRA²: the base's linear layers (not the task head) as bitsandbytes 4-bit weights
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
        if self.learning_rate <= 0:
            raise InputError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}.")
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


def load_datasets(cfg: TrainConfig, tokenizer: Any) -> tuple[TextDataset, TextDataset]:
    train_file, validation_file = cfg.train_file, cfg.validation_file
    if cfg.dataset is not None:
        train_file, validation_file = (str(p) for p in builtin_dataset_files(cfg.dataset))
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TextDataset, collate: Collator, batch_size: int,
             device: torch.device, precision: str = "fp32") -> dict[str, float]:
    was_training = model.training
    model.eval()
    preds, golds, lm_loss, lm_tokens = [], [], 0.0, 0
    for batch in batches(dataset, batch_size, collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, precision):
            # Every metric comes from the logits, so the model gets no labels and computes no loss. (A PEFT
            # AdaLoRA model loaded for inference would also fail on one: its forward then adds the
            # regulariser of a training adapter it does not have.)
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits.float()
        if dataset.task == "causal-lm":
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            lm_loss += float(torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum"))
            lm_tokens += int((shift_labels != -100).sum())
        elif dataset.task == "regression":
            preds.append(logits.squeeze(-1).cpu().numpy())
            golds.append(batch["labels"].cpu().numpy())
        else:
            preds.append(logits.argmax(-1).cpu().numpy())
            golds.append(batch["labels"].cpu().numpy())
    model.train(was_training)
    if dataset.task == "causal-lm":
        return lm_metrics(lm_loss, lm_tokens)
    pred, gold = np.concatenate(preds), np.concatenate(golds)
    if dataset.task == "regression":
        return regression_metrics(pred, gold)
    return classification_metrics(pred, gold, dataset.num_labels)


# --- the loop ----------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, so a checkpoint loads with weights_only=True."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                       "has_gauss": has_gauss, "cached_gaussian": cached_gaussian}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    decay, no_decay, head = [], [], []
    for name, p in method.model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.head_learning_rate is not None and method.is_head(name):
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
          fsdp: bool | fsdp_.FSDPOptions = False) -> TrainResult:
    """Fine-tune ``cfg.model`` with ``cfg.method`` on ``cfg``'s data; see the module docstring for the flow.

    Under ``torchrun`` / ``accelerate launch`` every process runs this same function (see
    ``distributed.py``); ``cfg.batch_size`` is then the global batch, split across processes.
    ``fsdp`` (True or options) shards the frozen base across them with FSDP2 instead (``fsdp.py``).
    """
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
    if ctx.is_main:
        _check_writable(out)
    precision = _pick_precision(cfg.precision, device)
    _seed_everything(cfg.seed)

    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    train_set, eval_set = load_datasets(cfg, tokenizer)
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
    if cfg.load_in_4bit:
        _quantise_base(base, cfg, device, sharded)
    if train_set.label_names:  # so merged models and reports show the dataset's label names
        base.config.id2label = dict(enumerate(train_set.label_names))
        base.config.label2id = {n: i for i, n in enumerate(train_set.label_names)}
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    collate = Collator(tokenizer.pad_token_id, cfg.task)

    epoch_batches = batches_per_epoch(len(train_set), cfg.batch_size, ctx.world_size)
    if epoch_batches < cfg.grad_accum:
        raise InputError(f"an epoch has {epoch_batches} batches of {cfg.batch_size}, fewer than --grad-accum "
                         f"{cfg.grad_accum}: no optimiser step could be taken. Lower --grad-accum or --batch-size.")
    steps_per_epoch = epoch_batches // cfg.grad_accum
    if epoch_batches % cfg.grad_accum:
        logger.info("each epoch has %d batches: the last %d, short of a full --grad-accum of %d, are skipped "
                    "(their gradients would otherwise leak into the next epoch's first step)",
                    epoch_batches, epoch_batches % cfg.grad_accum, cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    settings = cfg.lora2 if cfg.method == "lora2" else cfg.method_settings
    method = build_method(cfg.method, base, settings, total_steps)
    method.data_info = {"dataset": cfg.dataset, "columns": {"text_column": cfg.text_column,
                                                            "text_pair_column": cfg.text_pair_column,
                                                            "label_column": cfg.label_column},
                        "base_4bit": {"quant_type": cfg.bnb_4bit_quant_type, "double_quant": cfg.double_quant}
                        if cfg.load_in_4bit else None}
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        model = fsdp_.shard(method.model, init_device_mesh(device.type, (ctx.world_size,)),
                            fsdp_.options_from_accelerate(fsdp if isinstance(fsdp, fsdp_.FSDPOptions) else None),
                            param_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))
    else:
        model = method.model.to(device)
    # Under FSDP every rank runs every forward (each gathers the base's shards with the others), so
    # every rank evaluates; otherwise rank 0 alone does.
    evaluates = ctx.is_main or sharded
    if cfg.method == "lora2" and ctx.is_main:
        _log_kernel_plan(model, device, precision)
    if cfg.method == "lora2" and device.type == "cuda":  # autotune now, not inside the first training steps
        import lora2_kernels

        lora2_kernels.warmup(model, tokens=cfg.batch_size // ctx.world_size * cfg.max_length,
                             dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))
    optimizer = _optimizer(method, cfg)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metric_name = PRIMARY_METRIC[cfg.task]

    state: dict[str, Any] = {"step": 0, "best": -math.inf, "metric_before": None, "history": []}
    if resume:
        state = _load_checkpoint(out / CHECKPOINT_DIR, method, optimizer, scheduler, scaler)
        logger.info("resumed from %s at step %d", out / CHECKPOINT_DIR, state["step"])
    else:
        if ctx.is_main:
            atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
            (out / "log.jsonl").unlink(missing_ok=True)
        if evaluates:
            state["metric_before"] = evaluate(model, eval_set, collate, cfg.eval_batch_size, device,
                                              precision)[metric_name]
        if ctx.is_main:
            _log(out, {"step": 0, "event": "eval", metric_name: state["metric_before"]})
            logger.info("before training: %s = %.4f", metric_name, state["metric_before"])
    # DDP in multi-process runs; under FSDP and in one process the model itself
    trained = model if sharded else wrap(model, ctx, device)
    whole = fsdp_.trainable_parameters(model) if sharded else []  # what sync_gradients averages under FSDP

    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum  # acted on at the end of the current step, never mid-update

    handlers = _install_signal_handlers(on_signal)
    start = time.perf_counter()
    eval_seconds = 0.0
    model.train()
    # A progress bar on a terminal; otherwise (a file, a CI log, nohup, --no-progress) one log line
    # per log step, since a bar written to a file is a single line of carriage returns.
    use_bar = progress and ctx.is_main and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not use_bar, desc=f"{cfg.method} train",
               dynamic_ncols=True)
    window_clock = time.perf_counter()
    peak = PeakMemory(device)
    final_metrics = None  # the evaluation at the last step, reused as the final one
    # The host reads device values only on "check" steps (logging, evaluation, the last step): every
    # float() of a CUDA tensor stalls the launch queue. Losses accumulate on the device in between.
    # Without DDP a signal is seen at the end of any step; under DDP the ranks agree on it (an
    # all-reduce that the host must read) on check steps only.
    window = torch.zeros(2, device=device)  # [loss sum since the last check, stop flag]
    window_start = state["step"]
    try:
        with peak:
            step = first_step = state["step"]
            epoch = step // steps_per_epoch
            while step < total_steps:
                generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
                done = (step - epoch * steps_per_epoch) * cfg.grad_accum
                micro = 0
                epoch_micro_batches = steps_per_epoch * cfg.grad_accum  # leftovers short of a step: not run
                for batch in itertools.islice(batches(train_set, cfg.batch_size, collate, generator, skip=done,
                                                      shard=ctx.shard), epoch_micro_batches - done):
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    micro += 1
                    sync = micro == cfg.grad_accum or not ctx.enabled or sharded
                    with nullcontext() if sync else trained.no_sync():  # all-reduce once per optimiser step
                        with autocast_context(device, precision):
                            loss = trained(**batch).loss / cfg.grad_accum
                        scaler.scale(loss).backward()
                    if sharded and micro == cfg.grad_accum:
                        fsdp_.sync_gradients(whole, ctx.world_size)
                    window[0] += loss.detach()
                    if micro < cfg.grad_accum:
                        continue
                    micro = 0
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   cfg.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    budget = method.after_optimizer_step(step)
                    optimizer.zero_grad(set_to_none=True)
                    bar.update(1)
                    record: dict[str, Any] = {"step": step, "lr": scheduler.get_last_lr()[0], "budget": budget}
                    evaluating = step % cfg.eval_every == 0 or step == total_steps
                    stopping = stop["signal"] is not None and not ctx.enabled
                    if step % cfg.log_every == 0 or evaluating or stopping:
                        window[1] = float(stop["signal"] is not None)
                        loss_sum, stop_votes = (float(v) for v in ctx.all_reduce_sum(window))
                        loss_value = loss_sum / ctx.world_size / (step - window_start)
                        stopping = stopping or stop_votes > 0
                        if not math.isfinite(loss_value):  # checked before anything below is saved
                            last = out / CHECKPOINT_DIR
                            when = f"at step {step}" if step - window_start == 1 else \
                                f"at step {step} (in steps {window_start + 1}–{step})"
                            raise TrainingError(
                                f"loss became {loss_value} {when}; stopped without saving. Last good checkpoint: "
                                f"{last if last.exists() else 'none yet'} (resume with --resume and a lower "
                                "learning rate).")
                        seconds_per_step = (time.perf_counter() - window_clock) / (step - window_start)
                        window_clock = time.perf_counter()
                        window.zero_()
                        window_start = step
                        record["loss"] = loss_value
                        regularizer = method.regularizer_loss()
                        if regularizer is not None:
                            record["orth_reg"] = regularizer
                        if ctx.is_main:
                            _log(out, {"event": "train", **record, "seconds_per_step": seconds_per_step})
                            if use_bar:
                                bar.set_postfix(loss=f"{loss_value:.4f}",
                                                **({"budget": budget} if budget is not None else {}),
                                                **({metric_name: f"{state['best']:.4f}"} if state["history"] else {}))
                            else:
                                logger.info("step %d/%d  loss %.4f  lr %.2e%s  %.2f s/step", step, total_steps,
                                            loss_value, record["lr"],
                                            f"  budget {budget}" if budget is not None else "", seconds_per_step)
                    if evaluates and evaluating:
                        tick = time.perf_counter()
                        metrics = evaluate(model, eval_set, collate, cfg.eval_batch_size, device, precision)
                        final_metrics = metrics if step == total_steps else None
                    if ctx.is_main and evaluating:
                        if not use_bar:
                            logger.info("step %d/%d  eval %s %.4f", step, total_steps, metric_name, metrics[metric_name])
                        record.update({f"eval_{k}": v for k, v in metrics.items()})
                        _log(out, {"step": step, "event": "eval", **metrics})
                        state["history"].append({"step": step, metric_name: metrics[metric_name], "budget": budget})
                        improved = metrics[metric_name] > state["best"]
                        state["best"] = max(state["best"], metrics[metric_name])
                        state["step"] = step
                        if cfg.save_checkpoints:
                            if improved:
                                atomic_write_dir(out / "best", method.save)
                            _save_checkpoint(out / CHECKPOINT_DIR, method, optimizer, scheduler, scaler, state)
                        eval_seconds += time.perf_counter() - tick
                    for callback in callbacks or []:
                        callback(record)
                    if stopping or (stop["signal"] is not None and not ctx.enabled):
                        state["step"] = step
                        if ctx.is_main:
                            _save_checkpoint(out / CHECKPOINT_DIR, method, optimizer, scheduler, scaler, state)
                        ctx.barrier()  # no rank exits (and gets its peers killed) before the checkpoint is on disk
                        raise TrainingInterrupted(
                            f"stopped by signal {stop['signal'] or 'on another rank'} at step {step}; resume with "
                            f"`lora2 train --resume {out}`.")
                    if step >= total_steps:
                        break
                epoch += 1
    finally:
        bar.close()
        _restore_signal_handlers(handlers)

    seconds = time.perf_counter() - start
    result = test_metrics = None
    if evaluates:
        final_metrics = final_metrics or evaluate(model, eval_set, collate, cfg.eval_batch_size, device, precision)
        if cfg.test_file is not None:
            label = None if cfg.task == "causal-lm" else cfg.label_column
            test_set = build_dataset(cfg.test_file, tokenizer, cfg.task, cfg.text_column, label, cfg.text_pair_column,
                                     cfg.max_length, label_names=train_set.label_names or None)
            test_metrics = evaluate(model, test_set, collate, cfg.eval_batch_size, device, precision)
    if ctx.is_main:
        atomic_write_dir(out / "adapter", method.save)
        final = final_metrics[metric_name]
        if test_metrics is not None:
            _log(out, {"step": total_steps, "event": "test", "rows": len(test_set), **test_metrics})
            logger.info("test (%d rows of %s): %s %.4f", len(test_set), cfg.test_file, metric_name,
                        test_metrics[metric_name])
        result = TrainResult(
            output_dir=str(out), method=cfg.method, metric_name=metric_name, metric_before=state["metric_before"],
            metric_after=final, best_metric=max(state["best"], final), steps=total_steps,
            steps_per_epoch=steps_per_epoch, seconds=time.perf_counter() - start,
            train_seconds=seconds - eval_seconds, steps_timed=total_steps - first_step, peak_memory_mb=peak.mebibytes,
            trainable_parameters=trainable_parameter_count(model), total_parameters=total_parameter_count(model),
            history=state["history"], test_metrics=test_metrics)
        atomic_write_text(out / "result.json", json.dumps(dataclasses.asdict(result), indent=2))
    return ctx.broadcast_object(result)  # every rank returns rank 0's result


def _quantise_base(base: torch.nn.Module, cfg: TrainConfig, device: torch.device, sharded: bool) -> None:
    """--load-in-4bit: the base's linears as bitsandbytes 4-bit weights, quantised with bitsandbytes
    directly (transformers' BitsAndBytesConfig loader wants a CUDA GPU; this works on the CPU too)."""
    from lora2_kernels.four_bit import quantize_model, weight_bytes

    if sharded:
        raise InputError("--load-in-4bit with --fsdp is not supported yet (FSDP2 would shard the packed 4-bit "
                         "bytes and their absmax apart); train a 4-bit base on one GPU, or shard a bf16 base.")
    if cfg.method == "adalora" and device.type != "cuda":
        raise InputError("--method adalora on a 4-bit base needs a GPU: on the CPU, PEFT's AdaLoRA layer adds in place "
                         "to bitsandbytes' output (a view autograd forbids). PEFT LoRA and LoRA² run here.")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    before = weight_bytes(base)
    names = quantize_model(base, cfg.bnb_4bit_quant_type, cfg.double_quant, compute_dtype=half, device=device)
    logger.info("quantised %d linear layers to 4-bit %s%s with bitsandbytes directly (the task head stays in full "
                "precision): linear weights %.1f MiB, were %.1f MiB", len(names), cfg.bnb_4bit_quant_type,
                " with double quantisation" if cfg.double_quant else "", weight_bytes(base) / 2**20, before / 2**20)


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


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"output directory {out} is not writable ({e.strerror}); choose another --output-dir.") from e


def _save_checkpoint(path: Path, method: Method, optimizer, scheduler, scaler, state: dict[str, Any]) -> None:
    payload = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "method": method.state_dict(), "rng": _rng_state(), "state": state,
    }

    def fill(tmp: Path) -> None:
        method.save(tmp / "adapter")
        torch.save(payload, tmp / STATE_FILE)

    try:
        atomic_write_dir(path, fill)
    except OSError as e:
        previous = f"the previous checkpoint in {path} is intact" if path.exists() else "no earlier checkpoint exists"
        raise OSError(e.errno, f"could not write the step-{state['step']} checkpoint to {path} ({e.strerror or e}); "
                               f"{previous}. Free space or fix permissions, then resume with --resume.") from e


def _load_checkpoint(path: Path, method: Method, optimizer, scheduler, scaler) -> dict[str, Any]:
    recover_dir(path)  # a kill between the two renames of the last save leaves only .checkpoint.old
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {path}; start without --resume.")
    # weights_only: unpickling arbitrary objects runs whatever code a crafted checkpoint carries.
    # Everything lora2 writes is tensors and plain Python values.
    try:
        payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it refers to {found.group(1)}" if found else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path / STATE_FILE} holds objects other than tensors and plain data ({reason}). lora2 loads "
            "checkpoints with torch.load(weights_only=True) because unpickling other objects can run arbitrary "
            "code; it writes nothing else itself, so this file was not written by this lora2 version (or was "
            "tampered with). Start the run again without --resume.") from None
    method.load(path / "adapter")
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    method.load_state_dict(payload["method"])
    _set_rng_state(payload["rng"])
    return payload["state"]


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), **record}) + "\n")


def _install_signal_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
