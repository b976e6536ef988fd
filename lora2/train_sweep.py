"""A learning-rate (and seed) sweep as one run over one frozen base: ``lora2 train --learning-rate a,b,c``.

Each (learning rate, seed) is a *member*: a single run of its own. It has its own folder (``OUTPUT/lr-…/
seed-…/``, the very files ``lora2 train`` of it writes, so eval, merge, export, report and ``--resume`` work
on it unchanged), its own initialisation (its seed, drawn in a single run's order), data order, optimiser
and schedule, rank-allocator budget, regulariser, task head, log, checkpoints and stop. What the members
share is the process: the tokenised data, one base model in memory, and one forward and one backward a
step, in which every adapted projection runs all members' adapters in one launch set
(``LoRA2Linear(adapters=N)``, the pieces in ``sweep.py``).

``train_sweep`` is train.py's loop, member by member where a single run's state is concerned:

    set up (folders, data once, a base per distinct seed for its initialisation, one kept) → evaluate every
    member → for each step: each member's micro-batches, concatenated → one forward → each member's loss on
    its rows (+ its regulariser) → one backward → per member: unscale, clip, step, schedule → one
    allocator call (a budget each) → log / evaluate / checkpoint each member → finish each member.

On a dropout-free base each member equals its single run (tests/test_train_sweep.py: the same metrics and
adapter tensors within 1e-5, with gradient accumulation and a resume). With dropout in the base (MiniLM
has 0.1) a member is a single run with other dropout draws: one forward draws one mask for the whole batch.
A member's result.json times (``seconds``, ``train_seconds``) and ``peak_memory_mb`` are the sweep's.

A member whose loss diverges stops alone, as its single run would (its folder keeps its last checkpoint,
and ``diverged.txt`` says why); its gradients are zeroed on the device from the step they turn non-finite,
so that nothing of it reaches the others (the allocator's one importance call skips a step with any
non-finite gradient). A killed sweep resumes each member from its own checkpoint; a member whose
checkpoint is ahead of the others' waits, untouched, until they reach it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora2_kernels.linear import ADAPTER_PARAMETER_NAMES, AdapterRows, LoRA2Linear

from .allocator import RankAllocator
from .data import Collator, TextDataset, batches, build_dataset
from .distributed import init_from_env
from .errors import InputError
from .io import atomic_write_text
from .memory import PeakMemory
from .methods import Method, build_method
from .metrics import PRIMARY_METRIC
from .model import LoRA2Model
from .regularizer import OrthogonalRegularizer
from .run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    RESULT_FILE,
    STATE_FILE,
    absolute_paths,
    check_output_folder,
    check_same_inputs,
    claim_output_dir,
    clear_run_files,
    finished_result,
    folder_lock,
    input_fingerprints,
    load_checkpoint,
    normalised,
    records_config,
    save_checkpoint,
    write_whole,
)
from .sweep import AdapterHeads, AdapterOptimizers, AdapterView
from .train import (
    MetricSums,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    _load_base,
    _log,
    _pick_precision,
    _quantise_base,
    _seed_everything,
    _steps_per_epoch,
    _stop_on_signals,
    adamw,
    autocast_context,
    data_files,
    diverged_message,
    load_datasets,
    load_tokenizer,
    record_evaluation,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

SWEEP_FILE = "train_sweep.json"  # the sweep folder's record: its members and shared settings, then their results
DIVERGED_FILE = "diverged.txt"
# what may differ between the members of one sweep; everything else is one setting of all of them
MEMBER_FIELDS = ("learning_rate", "seed", "output_dir")


def member_folder(output_dir: str | Path, learning_rate: float, seed: int) -> Path:
    return Path(output_dir) / f"lr-{learning_rate:g}" / f"seed-{seed}"


def sweep_members(cfg: TrainConfig, learning_rates: list[float], seeds: list[int]) -> list[TrainConfig]:
    """The single runs of a sweep: ``cfg`` at every (learning rate, seed), each in its folder under
    ``cfg.output_dir``."""
    if len(set(learning_rates)) != len(learning_rates) or len(set(seeds)) != len(seeds):
        raise InputError(f"the sweep's learning rates {learning_rates} and seeds {seeds} each name a value twice; "
                         "give each once.")
    return [dataclasses.replace(cfg, learning_rate=lr, seed=seed,
                                output_dir=str(member_folder(cfg.output_dir, lr, seed)))
            for lr in learning_rates for seed in seeds]


def shared_settings(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in MEMBER_FIELDS}


def read_sweep(folder: str | Path) -> list[TrainConfig]:
    """The members of the sweep recorded in ``folder`` (to resume it there, wherever it was started)."""
    path = Path(folder) / SWEEP_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        members = [TrainConfig(**{**record["settings"], "learning_rate": m["learning_rate"], "seed": m["seed"],
                                  "output_dir": str(Path(folder) / m["folder"])}) for m in record["members"]]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"{path} is not a lora2 sweep's record ({e}); it cannot be resumed.") from e
    return [absolute_paths(m) for m in members]


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / SWEEP_FILE).is_file()


# --- one member's save / load, as its single run's Method ------------------------------------------------


class _MemberMethod(Method):
    """Member ``index`` of the sweep's model as a single run's ``LoRA2Method`` is to checkpoints: its adapter
    folder (one adapter's keys), its allocator state (its group's rows)."""

    name = "lora2"

    def __init__(self, model: LoRA2Model, allocator: RankAllocator, index: int, data_info: dict[str, Any]) -> None:
        self.model, self.info_model = model, model.base_model
        self.allocator, self.index, self.data_info = allocator, index, data_info

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, adapter=self.index)
        self.write_info(directory)

    def load(self, directory: Path) -> None:
        self.model.load_adapter(directory, adapter=self.index)

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.group_state_dict(self.index)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocator.load_group_state_dict(self.index, state)


@dataclass
class _Member:
    index: int
    cfg: TrainConfig
    out: Path
    method: _MemberMethod | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    regularizer: Callable[[], torch.Tensor] | None = None
    # step, best, metric_before, history, data_sha256: a single run's checkpointed state
    state: dict[str, Any] = field(default_factory=dict)
    first_step: int = 0
    window_start: int = 0
    done: bool = False  # finished earlier, diverged, or finished now
    resumes: bool = False
    batches: Iterator[list[dict[str, torch.Tensor]]] | None = None
    last_regularizer: torch.Tensor | None = None
    final_metrics: dict[str, float] | None = None
    result: TrainResult | None = None


@dataclass
class _Sweep:
    members: list[_Member]
    cfg: TrainConfig  # the shared settings (members[0]'s)
    device: torch.device
    precision: str
    model: LoRA2Model
    layers: list[LoRA2Linear]
    rows: AdapterRows
    heads: list[AdapterHeads]
    optimizers: AdapterOptimizers
    allocator: RankAllocator
    tokenizer: Any
    train_set: TextDataset
    eval_set: TextDataset
    collate: Any
    steps_per_epoch: int
    total_steps: int
    metric_name: str
    windows: torch.Tensor  # per member: loss sum since its last check
    true: torch.Tensor  # a device True: the finite flag of a member not in this step
    bar: Any = None
    peak: PeakMemory | None = None
    start: float = 0.0
    window_clock: float = 0.0
    eval_seconds: float = 0.0


def train_sweep(configs: list[TrainConfig], resume: bool = False, device: str | torch.device | None = None,
                progress: bool = True, overwrite: bool = False, sweep_dir: str | Path | None = None,
                callbacks: list[Callable[[dict[str, Any]], None]] | None = None) -> list[TrainResult | None]:
    """Train ``configs`` (LoRA² single runs that differ in learning rate, seed and folder only) as one run.

    Returns each member's result, None for one whose loss diverged. ``sweep_dir`` (the CLI's OUTPUT) holds
    ``train_sweep.json`` and the members' folders; ``resume`` continues each member from its checkpoint,
    reads back those that finished and leaves diverged ones as they are. ``overwrite`` as in ``train``."""
    configs = [dataclasses.replace(absolute_paths(c), output_dir=str(normalised(c.output_dir))) for c in configs]
    _check_members(configs)
    cfg = configs[0]
    members = [_Member(i, c, Path(c.output_dir)) for i, c in enumerate(configs)]
    hint = (f"resume with `lora2 train --resume {sweep_dir}`" if sweep_dir is not None else
            "run it again to resume") if resume else "nothing was trained: start it again"
    with ExitStack() as stack:
        stop = stack.enter_context(_stop_on_signals(hint))
        sweep = _set_up(members, cfg, resume, overwrite, device, progress, sweep_dir, stack)
        if sweep is not None:
            stop["phase"] = "training"
            stop["hint"] = f"resume with `lora2 train --resume {sweep_dir}`" if sweep_dir else "run it again to resume"
            _train(sweep, stop, callbacks)
            stop.update(phase="finishing")
            _finish(sweep)
        results = [m.result for m in members]
        if sweep_dir is not None:
            _write_record(Path(sweep_dir), configs, results)
            atomic_write_text(Path(sweep_dir) / "train_sweep.md", summary_table(configs, results) + "\n")
            if any(r is not None for r in results):
                plot_sweep(configs, results, Path(sweep_dir) / "train_sweep.png")
        return results


def _check_members(configs: list[TrainConfig]) -> None:
    if not configs:
        raise InputError("a sweep needs at least one learning rate and seed.")
    if any(c.method != "lora2" for c in configs):
        raise InputError("a sweep in one process trains LoRA² adapters over one base; PEFT baselines and full "
                         "fine-tuning run one process a learning rate (lora2 compare --sweep runs them that way).")
    shared = shared_settings(configs[0])
    for c in configs[1:]:
        differ = sorted(k for k, v in shared_settings(c).items() if shared[k] != v)
        if differ:
            raise InputError(f"the members of one sweep differ only in learning rate and seed; these differ too: "
                             f"{differ}. Run them as separate sweeps.")
    folders = [Path(c.output_dir).resolve() for c in configs]
    if len(set(folders)) != len(folders):
        raise InputError("two members of the sweep would write one folder; give each its own output_dir.")


def _write_record(folder: Path, configs: list[TrainConfig], results: list[TrainResult | None] | None) -> None:
    record: dict[str, Any] = {
        "settings": shared_settings(configs[0]),
        "members": [{"learning_rate": c.learning_rate, "seed": c.seed,
                     "folder": str(Path(c.output_dir).resolve().relative_to(folder.resolve()))} for c in configs]}
    if results is not None:
        for entry, result in zip(record["members"], results):
            entry["result"] = None if result is None else {
                key: getattr(result, key) for key in ("metric_name", "metric_before", "metric_after", "best_metric",
                                                      "steps", "test_metrics")}
    atomic_write_text(folder / SWEEP_FILE, json.dumps(record, indent=2))


def _records_sweep(folder: Path, configs: list[TrainConfig]) -> bool:
    try:
        return [dataclasses.asdict(c) for c in read_sweep(folder)] == [dataclasses.asdict(c) for c in configs]
    except InputError:
        return False


# --- set-up --------------------------------------------------------------------------------------------


def _set_up(members: list[_Member], cfg: TrainConfig, resume: bool, overwrite: bool,
            device: str | torch.device | None, progress: bool, sweep_dir: str | Path | None,
            stack: ExitStack) -> _Sweep | None:
    """Folders, data, the model of N adapters, per-member optimisers and state; None if every member is done."""
    device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = init_from_env(device_type)
    if ctx.enabled:
        raise InputError("a sweep trains its learning rates in one process; under torchrun / accelerate launch run "
                         "one learning rate a run (DDP and FSDP are for one run too large for one device).")
    device = torch.device(device or device_type)
    model_path = resolve_model_path(cfg.model)
    inputs = {**data_files(cfg), "base model": model_path}
    configs = [m.cfg for m in members]
    if sweep_dir is not None:
        folder = normalised(sweep_dir)
        own = lambda f: _records_sweep(f, configs)
        check_output_folder(folder, inputs, overwrite, flag="--output-dir", own=own, whole=False)
        stack.enter_context(folder_lock(folder))
        if resume and not (folder / SWEEP_FILE).is_file():
            raise FileNotFoundError(f"{folder / SWEEP_FILE} not found: --resume of a sweep needs the output folder "
                                    "of an earlier `lora2 train --learning-rate a,b,...` run.")
        _write_record(folder, configs, None)
    for m in members:  # finished or diverged earlier (with these settings): read back, left alone
        if resume and records_config(m.out, m.cfg) and (done := finished_result(m.out)) is not None:
            known = {f.name for f in dataclasses.fields(TrainResult)}
            m.result, m.done = TrainResult(**{k: v for k, v in done.items() if k in known}), True
        elif resume and records_config(m.out, m.cfg) and (m.out / DIVERGED_FILE).is_file():
            m.done = True
        else:
            m.resumes = resume and records_config(m.out, m.cfg) and (m.out / CHECKPOINT_DIR / STATE_FILE).is_file()
            claim_output_dir(m.out, m.cfg, inputs, m.resumes, overwrite, stack)
    running = [m for m in members if not m.done]
    if not running:
        logger.info("every member of the sweep finished earlier; nothing to train, their files are left as they are")
        return None
    precision = _pick_precision(cfg.precision, device)
    tokenizer = load_tokenizer(model_path)
    train_set, eval_set = load_datasets(cfg, tokenizer)
    collate = Collator(tokenizer.pad_token_id, cfg.task)
    steps_per_epoch = _steps_per_epoch(cfg, len(train_set), 1)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    model, layers, heads, rows, quantised = _build_model(cfg, members, model_path, ctx, train_set, tokenizer,
                                                         device, total_steps)
    data_info = {"dataset": cfg.dataset, "columns": {"text_column": cfg.text_column,
                                                     "text_pair_column": cfg.text_pair_column,
                                                     "label_column": cfg.label_column},
                 "base_4bit": {"quant_type": cfg.bnb_4bit_quant_type, "double_quant": cfg.double_quant,
                               "modules": quantised} if cfg.load_in_4bit else None}
    n = len(members)
    optimizers = AdapterOptimizers(layers,
                                   lambda i, params: _member_optimizer(model, layers, params, i, members[i].cfg),
                                   extra=[[p for h in heads for p in h.heads[i].parameters()] for i in range(n)])
    views = {f"{i}.{name}": view for i in range(n)
             for name, view in zip(model.lora2_layers(), optimizers.views(i))}
    allocator = RankAllocator(views, model.lora2_config, total_steps, groups=n)
    from transformers import get_linear_schedule_with_warmup

    weight = model.lora2_config.orth_reg_weight
    for m, optimizer in zip(members, optimizers.optimizers):
        m.method = _MemberMethod(model, allocator, m.index, data_info)
        m.optimizer = optimizer
        m.scheduler = get_linear_schedule_with_warmup(optimizer, int(m.cfg.warmup_ratio * total_steps), total_steps)
        m.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        m.regularizer = OrthogonalRegularizer([AdapterView(layer, m.index) for layer in layers]) if weight > 0 else None
    fingerprints = input_fingerprints(data_files(cfg), model_path)
    sweep = _Sweep(members=members, cfg=cfg, device=device, precision=precision, model=model, layers=layers,
                   rows=rows, heads=heads, optimizers=optimizers, allocator=allocator, tokenizer=tokenizer,
                   train_set=train_set, eval_set=eval_set, collate=collate, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, metric_name=PRIMARY_METRIC[cfg.task], windows=torch.zeros(n, device=device),
                   true=torch.ones((), dtype=torch.bool, device=device))
    fresh = []
    for m in running:
        m.state = {"step": 0, "best": -math.inf, "metric_before": None, "history": [], "data_sha256": fingerprints}
        if m.resumes:
            m.state = load_checkpoint(m.out / CHECKPOINT_DIR, m.method, m.optimizer, m.scheduler, m.scaler)
            check_same_inputs(m.state.get("data_sha256"), fingerprints, m.out)
            m.state["data_sha256"] = fingerprints
            logger.info("%s: resumed from its checkpoint at step %d", m.out, m.state["step"])
        else:
            clear_run_files(m.out)
            atomic_write_text(m.out / CONFIG_FILE, json.dumps(dataclasses.asdict(m.cfg), indent=2))
            fresh.append(m)
    if fresh:
        for m, metrics in zip(fresh, _evaluate(sweep, fresh)):
            m.state["metric_before"] = metrics[sweep.metric_name]
            _log(m.out, {"step": 0, "event": "eval", sweep.metric_name: m.state["metric_before"]})
        logger.info("before training: %s", ", ".join(f"lr {m.cfg.learning_rate:g} seed {m.cfg.seed}: "
                                                     f"{m.state['metric_before']:.4f}" for m in fresh))
    for m in running:
        m.first_step = m.window_start = m.state["step"]
    first = min(m.first_step for m in running)
    use_bar = progress and sys.stderr.isatty()
    sweep.bar = tqdm(total=total_steps, initial=first, disable=not use_bar, dynamic_ncols=True,
                     desc=f"lora2 sweep of {len(running)}")
    sweep.peak = PeakMemory(device)
    model.train()
    return sweep


def _build_model(cfg: TrainConfig, members: list[_Member], model_path: str, ctx: Any, train_set: TextDataset,
                 tokenizer: Any, device: torch.device, total_steps: int):
    """The base, once, with every adapted layer holding N adapters and each module_to_save one copy per member.

    Member i starts where its single run starts: its seed, then the base's fresh head drawn by transformers,
    then the adapter's initialisation. That is done once per distinct seed on a base loaded for it (on the
    CPU; the device gets one), keeping only its adapter and head; members of one seed share that start."""
    starts: dict[int, dict[str, torch.Tensor]] = {}
    frame: LoRA2Model | None = None
    quantised = None
    for seed in dict.fromkeys(m.cfg.seed for m in members):
        _seed_everything(seed)
        base = _load_base(cfg, model_path, ctx, False, train_set, tokenizer)
        # the kept base is quantised on the device, as a single run's; the others only give their start
        where = device if frame is None else torch.device("cpu")
        names = _quantise_base(base, cfg, where, False) if cfg.load_in_4bit else None
        method = build_method("lora2", base, cfg.lora2, total_steps)
        starts[seed] = {k: v.clone() for k, v in method.model.adapter_state_dict().items()}
        if frame is None:
            frame, quantised = method.model, names
    assert frame is not None
    n = len(members)
    layers = []
    for name, layer in frame.lora2_layers().items():
        stacked = layer.sibling(adapters=n)
        if "_seed_source" in layer.__dict__:  # adapter dropout's per-forward seed draw (model.DropoutSeeds)
            stacked._seed_source = layer.__dict__["_seed_source"]
        frame.base_model.set_submodule(name, stacked)
        layers.append(stacked)
    rows = AdapterRows(layers)
    heads = []
    for name in frame.modules_to_save:
        module = frame.base_model.get_submodule(name)
        copies = [copy.deepcopy(module) for _ in members]
        heads.append(AdapterHeads(copies, rows))
        frame.base_model.set_submodule(name, heads[-1])
    for m in members:
        frame._load_adapter_state(starts[m.cfg.seed], {}, m.index)
    return frame.to(device), layers, heads, rows, quantised


def _member_optimizer(model: LoRA2Model, layers: list[LoRA2Linear], params: list[torch.Tensor], index: int,
                      cfg: TrainConfig) -> torch.optim.Optimizer:
    """Member ``index``'s AdamW over ``params`` (its slices of the stacked factors, layer by layer, then its
    head copies: AdapterOptimizers' order), named and ordered as its single run's model names and orders its
    parameters, so that the optimiser state is that run's, group for group."""
    position = {id(getattr(layer, name)): j for j, (layer, name) in
                enumerate((layer, name) for layer in layers for name in ADAPTER_PARAMETER_NAMES)}
    named = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if isinstance(module, LoRA2Linear) and leaf in ADAPTER_PARAMETER_NAMES:
            named.append((name, params[position[id(p)]]))
        elif ".heads." in name:
            head, _, rest = name.partition(".heads.")
            copy_index, _, key = rest.partition(".")
            if int(copy_index) == index:
                named.append((f"{head}.{key}", p))
        else:
            raise InputError(f"{name} trains in the sweep's model but is neither an adapter factor nor a module "
                             "to save; a sweep cannot give each member its own copy of it.")
    return adamw(named, lambda n: n.startswith(tuple(f"base_model.{h}." for h in model.modules_to_save)), cfg)


# --- the loop -----------------------------------------------------------------------------------------------


def _member_batches(sweep: _Sweep, m: _Member) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Member ``m``'s micro-batches from its first step on: its single run's (train._step_batches)."""
    cfg, step = m.cfg, m.first_step
    while step < sweep.total_steps:
        epoch, into = divmod(step, sweep.steps_per_epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        micro = batches(sweep.train_set, cfg.batch_size, sweep.collate, generator, skip=into * cfg.grad_accum)
        for _ in range(min(sweep.steps_per_epoch - into, sweep.total_steps - step)):
            yield [next(micro) for _ in range(cfg.grad_accum)]
            step += 1


def concatenate(parts: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The members' batches as one: rows after rows, right-padded to the longest."""
    length = max(p["input_ids"].shape[1] for p in parts)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() == 2:
            tensors = [F.pad(t, (0, length - t.shape[1]), value=pads[key]) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The loss transformers' heads compute from these logits and labels (a member's rows only)."""
    if task == "causal-lm":
        shift = logits[:, :-1].float()
        return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    if task == "regression" or logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def _train(sweep: _Sweep, stop: dict[str, Any], callbacks) -> None:
    cfg, members = sweep.cfg, sweep.members
    running = [m for m in members if not m.done]
    for m in running:
        m.batches = _member_batches(sweep, m)
    step = min(m.first_step for m in running)
    sweep.start = sweep.window_clock = time.perf_counter()
    with sweep.bar, sweep.peak:
        while step < sweep.total_steps and any(not m.done for m in members):
            step = max(step, min(m.first_step for m in members if not m.done))  # the lagging ones may have diverged
            active = [m for m in members if not m.done and m.first_step <= step]
            step_batches = [next(m.batches) for m in active]
            for micro in range(cfg.grad_accum):
                _forward_backward(sweep, active, [micro_batches[micro] for micro_batches in step_batches])
            step += 1
            budget = _optimizer_step(sweep, active, step)
            evaluating = step % cfg.eval_every == 0 or step == sweep.total_steps
            stopping = stop["signal"] is not None
            if step % cfg.log_every == 0 or evaluating or stopping:
                _check_in(sweep, active, step, budget)
            active = [m for m in active if not m.done]
            if evaluating and active:
                _evaluate_and_checkpoint(sweep, active, step, budget)
            for callback in callbacks or []:
                callback({"step": step, "budget": budget, "members": [m.index for m in active]})
            if stop["signal"] is not None:
                for m in active:
                    m.state["step"] = step
                    save_checkpoint(m.out / CHECKPOINT_DIR, m.method, m.optimizer, m.scheduler, m.scaler, m.state,
                                    m.out)
                raise TrainingInterrupted(f"stopped by signal {stop['signal']} at step {step}; {stop['hint']}.")


def _forward_backward(sweep: _Sweep, active: list[_Member], parts: list[dict[str, torch.Tensor]]) -> None:
    """A micro-batch of every active member (``parts``), in one forward and one backward."""
    cfg = sweep.cfg
    counts = [0] * len(sweep.members)
    for m, part in zip(active, parts):
        counts[m.index] = part["input_ids"].shape[0]
    sweep.rows.set(counts)
    batch = concatenate(parts, sweep.collate.pad_token_id)
    batch = {k: v.to(sweep.device, non_blocking=True) for k, v in batch.items()}
    labels = batch.pop("labels")
    total = None
    with autocast_context(sweep.device, sweep.precision):
        logits = sweep.model.base_model(**batch).logits
        for m, rows, part_labels in zip(active, logits.split([counts[m.index] for m in active]),
                                        labels.split([counts[m.index] for m in active])):
            loss = task_loss(rows, part_labels, cfg.task)
            if m.regularizer is not None:
                regularizer = m.regularizer()
                m.last_regularizer = regularizer.detach()
                loss = loss + sweep.model.lora2_config.orth_reg_weight * regularizer
            loss = loss / cfg.grad_accum
            sweep.windows[m.index] += loss.detach()
            scaled = m.scaler.scale(loss)
            total = scaled if total is None else total + scaled
    total.backward()


def _optimizer_step(sweep: _Sweep, active: list[_Member], step: int) -> int:
    """Per member: unscale, clip, step, schedule (a diverged member's gradients zeroed first); then one
    allocator call for all, members not in this step left as they were."""
    optimizers = sweep.optimizers
    optimizers.link_gradients()
    finite = {}
    for m in active:
        m.scaler.unscale_(m.optimizer)
        norm = torch.nn.utils.clip_grad_norm_([p for g in m.optimizer.param_groups for p in g["params"]],
                                              m.cfg.max_grad_norm)
        finite[m.index] = torch.isfinite(norm)  # the member's whole gradient, from the norm clipping computes anyway
    _keep_from_allocator(sweep, torch.stack([finite.get(i, sweep.true) for i in range(len(sweep.members))]))
    for m in active:
        m.scaler.step(m.optimizer)
        m.scaler.update()
        m.scheduler.step()
    waiting = [m for m in sweep.members if m not in active]
    kept = [_allocator_part(sweep, m.index) for m in waiting]
    budget = sweep.allocator.step(step)
    for m, part in zip(waiting, kept):
        _restore_allocator_part(sweep, m.index, part)
    optimizers.zero_grad()
    sweep.bar.update(1)
    return budget


@torch.no_grad()
def _keep_from_allocator(sweep: _Sweep, finite: torch.Tensor) -> None:
    """A member whose gradient is not finite (``finite``: a flag a member, on the device) gets zeros instead, in
    every parameter of its own, with no host sync. Its loss, already in its window, stops it at the next
    check; until then it must not make the allocator's one importance call (which skips a step with any
    non-finite gradient) skip the others' step. Every parameter of it, not just the scored λ, B₁, A₂: its
    values must stay finite too, since once stopped it takes no rows, and a member with NaN in A₁ or B₂ gets
    NaN gradients for λ, B₁, A₂ even then (an empty sum, 0, times NaN)."""
    diverged = ~finite
    for p in sweep.optimizers.stacked:  # one in-place launch a stacked factor, for every member
        if p.grad is not None:
            p.grad.masked_fill_(diverged.view(-1, *[1] * (p.dim() - 1)), 0.0)
    for i, params in enumerate(sweep.optimizers.params):
        for p in params[len(sweep.optimizers.slices[i]):]:  # its head copies
            if p.grad is not None:
                p.grad.masked_fill_(diverged[i], 0.0)


def _allocator_part(sweep: _Sweep, index: int) -> tuple:
    return (sweep.allocator.group_state_dict(index), [layer.singular_values[index].detach().clone()
                                                      for layer in sweep.layers],
            [layer.rank_mask[index].clone() for layer in sweep.layers])


@torch.no_grad()
def _restore_allocator_part(sweep: _Sweep, index: int, part: tuple) -> None:
    state, values, masks = part
    sweep.allocator.load_group_state_dict(index, state)
    for layer, value, mask in zip(sweep.layers, values, masks):
        layer.singular_values[index].copy_(value)
        layer.rank_mask[index].copy_(mask)


def _check_in(sweep: _Sweep, active: list[_Member], step: int, budget: int) -> None:
    """Read every member's loss window (one host sync); a non-finite one stops that member alone."""
    losses = sweep.windows.tolist()
    seconds_per_step = (time.perf_counter() - sweep.window_clock) / max(step - min(m.window_start for m in active), 1)
    sweep.window_clock = time.perf_counter()
    sweep.windows.zero_()
    shown = []
    for m in active:
        loss = losses[m.index] / (step - m.window_start)
        window_start, m.window_start = m.window_start, step
        if not math.isfinite(loss):
            message = diverged_message(m.out, loss, step, window_start)
            logger.warning("sweep member lr %g seed %d: %s The others go on.", m.cfg.learning_rate, m.cfg.seed, message)
            atomic_write_text(m.out / DIVERGED_FILE, message)
            m.done = True
            continue
        shown.append(f"{loss:.4f}")
        record = {"event": "train", "step": step, "lr": m.scheduler.get_last_lr()[0], "budget": budget, "loss": loss}
        if m.last_regularizer is not None:
            record["orth_reg"] = float(m.last_regularizer)
        _log(m.out, {**record, "seconds_per_step": seconds_per_step})
    shown = " ".join(shown)
    if sweep.bar.disable:
        logger.info("step %d/%d  losses %s  budget %d  %.2f s/step", step, sweep.total_steps, shown, budget,
                    seconds_per_step)
    else:
        sweep.bar.set_postfix(losses=shown, budget=budget)


@torch.no_grad()
def _evaluate(sweep: _Sweep, members: list[_Member], dataset: TextDataset | None = None) -> list[dict[str, float]]:
    """Every member in ``members`` on ``dataset`` (validation by default): each batch once per member, in one
    forward of them all."""
    dataset = dataset or sweep.eval_set
    model = sweep.model.base_model
    was_training = model.training
    model.eval()
    sums = [MetricSums(dataset) for _ in members]
    for batch in batches(dataset, sweep.cfg.eval_batch_size, sweep.collate):
        rows = batch["input_ids"].shape[0]
        counts = [0] * len(sweep.members)
        for m in members:
            counts[m.index] = rows
        sweep.rows.set(counts)
        inputs = {k: v.to(sweep.device).repeat(len(members), *[1] * (v.dim() - 1))
                  for k, v in batch.items() if k != "labels"}
        with autocast_context(sweep.device, sweep.precision):
            logits = model(**inputs).logits
        labels = batch["labels"].to(sweep.device)
        for part, member_sums in zip(logits.split(rows), sums):
            member_sums.add(part, labels)
    model.train(was_training)
    return [s.metrics() for s in sums]


def _evaluate_and_checkpoint(sweep: _Sweep, active: list[_Member], step: int, budget: int) -> None:
    """train._evaluate_and_checkpoint, for each member: log, history, best/, checkpoint/."""
    tick = time.perf_counter()
    for m, metrics in zip(active, _evaluate(sweep, active)):
        m.final_metrics = metrics if step == sweep.total_steps else None
        record_evaluation(m.out, m.cfg, m.state, metrics, sweep.metric_name, step, budget, m.method, m.optimizer,
                          m.scheduler, m.scaler)
    if sweep.bar.disable:
        logger.info("step %d/%d  eval %s %s", step, sweep.total_steps, sweep.metric_name,
                    " ".join(f"{m.state['history'][-1][sweep.metric_name]:.4f}" for m in active))
    sweep.eval_seconds += time.perf_counter() - tick


def _finish(sweep: _Sweep) -> None:
    """train._finish, for each member that trained to the end: the final (and test) evaluation, adapter/,
    result.json."""
    cfg = sweep.cfg
    seconds = time.perf_counter() - sweep.start
    finishing = [m for m in sweep.members if not m.done]
    need = [m for m in finishing if m.final_metrics is None]
    for m, metrics in zip(need, _evaluate(sweep, need) if need else []):
        m.final_metrics = metrics
    test_metrics: list[dict[str, float] | None] = [None] * len(finishing)
    if cfg.test_file is not None and finishing:
        label = None if cfg.task == "causal-lm" else cfg.label_column
        test_set = build_dataset(cfg.test_file, sweep.tokenizer, cfg.task, cfg.text_column, label,
                                 cfg.text_pair_column, cfg.max_length, label_names=sweep.train_set.label_names or None)
        test_metrics = _evaluate(sweep, finishing, test_set)
    trainable = [sum(p.numel() for p in params) for params in sweep.optimizers.params]
    total = sum({id(p): p.numel() for p in sweep.model.parameters()}.values())
    for m, tests in zip(finishing, test_metrics):
        write_whole(m.out / "adapter", m.method.save, "the final adapter",
                    f"resume with `lora2 train --resume {m.out}`" if m.cfg.save_checkpoints else "start the run again",
                    "final adapter")
        if tests is not None:
            _log(m.out, {"step": sweep.total_steps, "event": "test", "rows": len(test_set), **tests})
        final = m.final_metrics[sweep.metric_name]
        m.result = TrainResult(
            output_dir=str(m.out), method="lora2", metric_name=sweep.metric_name,
            metric_before=m.state["metric_before"], metric_after=final, best_metric=max(m.state["best"], final),
            steps=sweep.total_steps, steps_per_epoch=sweep.steps_per_epoch, seconds=time.perf_counter() - sweep.start,
            train_seconds=seconds - sweep.eval_seconds, steps_timed=sweep.total_steps - m.first_step,
            peak_memory_mb=sweep.peak.mebibytes, trainable_parameters=trainable[m.index],
            # a single run's model: the base and one member's adapter and head
            total_parameters=total - sum(trainable) + trainable[m.index], history=m.state["history"],
            test_metrics=tests)
        atomic_write_text(m.out / RESULT_FILE, json.dumps(dataclasses.asdict(m.result), indent=2))
        m.done = True


def summary_table(configs: list[TrainConfig], results: list[TrainResult | None]) -> str:
    """The members ranked by their best validation metric (diverged last), as a Markdown table."""
    order = sorted(range(len(configs)), key=lambda i: math.inf if results[i] is None else -results[i].best_metric)
    metric = next((r.metric_name for r in results if r is not None), "metric")
    lines = [f"| rank | learning rate | seed | {metric} before | after | best | folder |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for rank, i in enumerate(order, 1):
        r, c = results[i], configs[i]
        cells = ("diverged", "", "") if r is None else (f"{r.metric_before:.4f}", f"{r.metric_after:.4f}",
                                                         f"{r.best_metric:.4f}")
        lines.append(f"| {rank} | {c.learning_rate:g} | {c.seed} | {' | '.join(cells)} | {c.output_dir} |")
    return "\n".join(lines)


def plot_sweep(configs: list[TrainConfig], results: list[TrainResult | None], path: Path) -> Path:
    """Left: each member's validation metric over the steps; right: the best one against the learning rate,
    a line a seed (a diverged member is missing from both)."""
    from .compare import _pyplot
    from .io import atomic_path

    plt = _pyplot()
    fig, (curves, rates) = plt.subplots(1, 2, figsize=(10, 4))
    metric = next(r.metric_name for r in results if r is not None)
    for i, (c, r) in enumerate(zip(configs, results)):
        if r is None:
            continue
        steps = [0] + [h["step"] for h in r.history]
        values = [r.metric_before] + [h[metric] for h in r.history]
        curves.plot(steps, values, marker="o", markersize=3, color=f"C{i}", label=f"lr {c.learning_rate:g} seed {c.seed}")
    for j, seed in enumerate(dict.fromkeys(c.seed for c in configs)):
        points = sorted((c.learning_rate, r.best_metric) for c, r in zip(configs, results) if c.seed == seed and r)
        if points:
            rates.plot(*zip(*points), marker="o", color=f"C{j}", label=f"seed {seed}")
    curves.set(xlabel="step", ylabel=f"validation {metric}", title="each member")
    rates.set(xscale="log", xlabel="learning rate (log)", ylabel=f"best validation {metric}", title="the sweep")
    for ax in (curves, rates):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    return path
