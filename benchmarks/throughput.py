"""Speed and memory of LoRA² against its peers, all measured side by side in one process.

    python -m benchmarks.throughput                      # everything this machine can run
    python -m benchmarks.throughput --sections layers --modes eager
    python -m benchmarks.throughput --sections steps --shapes llama-1.1b --out runs/throughput-llama

Sections (each prints a markdown table; everything also goes to OUT/results.json and OUT/results.md):

layers     One projection, forward and forward+backward (bf16 on a GPU): the frozen nn.Linear
           (the floor: forward + dX), PEFT LoRA r=8, LoRA² r=8 k=8 through the PyTorch reference, and
           LoRA² through the fused Triton kernels; eager and torch.compile. Shapes: the LLaMA-1.1B
           projections 2048→2048, 2048→256, 2048→5632, 5632→2048 at 8×1024 tokens and DeBERTa-base's
           768→768, 768→3072, 3072→768 at 32×256 tokens (GPU); MiniLM's at 8×128 tokens (CPU).
steps      Whole training steps of randomly initialised real architectures (DeBERTa-v3-base 32×256,
           LLaMA-1.1B 8×1024 on a GPU with bf16 autocast; a MiniLM-sized BERT 8×128 in fp32 on the CPU),
           AdamW: floor (frozen, backward to the inputs), full fine-tuning, PEFT LoRA r=8, PEFT
           AdaLoRA 12→8, LoRA² with the reference path, LoRA² with the kernels; eager and compiled.
           Both allocators run in their pruning phase and re-mask every step: their worst case.
host       Host time per projection step (forward + backward) beside the frozen nn.Linear's and PEFT's, the
           methods interleaved (benchmarks/host_time.py): on a GPU with real launches on small inputs; on a
           CPU with lora2's launches stubbed, in a subprocess under the Triton interpreter.
work       Device work per projection per training step: kernels launched (aten ops that are kernels +
           Triton launches), for the frozen layer, PEFT LoRA and LoRA² (benchmarks/device_work.py;
           on a CPU counted under the Triton interpreter in a subprocess).
model      The roofline cost model per projection (benchmarks/cost_model.py): LoRA² against the frozen
           layer for the LLaMA-1.1B and DeBERTa shapes, "model, not measured"; on a GPU with the
           layers section, beside the measured ratio.
allocator  The importance update of 154 modules (LLaMA-1.1B's 22 layers × 7 projections, r=8, k=8):
           the compiled op (csrc/) against the stacked-torch reference, and a whole allocator step.

Timing, the same for every method of a table: layers on CUDA by replaying a CUDA graph of the call
(triton.testing.do_bench_cudagraph: the device's time alone, not the GPU waiting on Python between
launches; reduce-overhead makes its own graphs and is timed with CUDA events), host time apart (host);
steps by wall clock between two synchronisations per step and none inside (the allocator hook is timed
with CUDA events); on the CPU, the median of wall-clock runs after a warm-up. Layer rows run at adapter
dropout 0 and 0.1 (--dropout), LoRA² and PEFT alike; the 4-bit peers at 256 tokens (in-loop
dequantisation) and 8,192 (dequantised once). Ratios compare peers of the same run only. The Triton
kernels need a GPU: on a CPU their rows say so instead of timing the interpreter. --smoke runs every
section on tiny shapes (CI).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from lora2 import LoRA2Config, get_lora2_model
from lora2.allocator import RankAllocator
from lora2.config import DEFAULT_TARGET_MODULES
from lora2.memory import PeakMemory
from lora2_kernels import LoRA2Linear, importance_update, reference, warmup

from . import cost_model

logger = logging.getLogger("throughput")
SECTIONS = ("work", "host", "model", "layers", "steps", "allocator")
PRUNING_STEP = 100  # allocator steps are numbered from here: inside the pruning phase


# --- timing ---------------------------------------------------------------------------------------------


def bench(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor] | None = None,
          runs: int = 20, graph: bool = False) -> float:
    """Median milliseconds of ``fn``. On a GPU with ``graph``: replays of a CUDA graph of ``fn``
    (triton.testing.do_bench_cudagraph), so the time is the device's alone, not the GPU waiting on Python
    between launches (benchmarks/host_time.py times the host); without, CUDA events around each call."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none,
                                                           return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}"


# --- layers ---------------------------------------------------------------------------------------------

# the 4-bit peers: the same projection as bitsandbytes NF4 (QLoRA's base), under PEFT LoRA or LoRA²
# lora2-triton runs the fused kernels (LORA2_BASE_GEMM=fused), lora2-split the cuBLAS split (=cublas): the
# autotuner's two candidates side by side (benchmarks/cost_model.py models both)
LAYER_PEERS = ("floor", "peft-lora", "lora2-reference", "lora2-triton", "lora2-split", "peft-lora-4bit", "lora2-4bit")
BASE_GEMM_OF_PEER = {"lora2-triton": "fused", "lora2-split": "cublas"}
GPU_LAYER_SHAPES = [("llama q/o", 8192, 2048, 2048), ("llama q/o, 256 tokens", 256, 2048, 2048),
                    ("llama k/v", 8192, 2048, 256),
                    ("llama gate/up", 8192, 2048, 5632), ("llama down", 8192, 5632, 2048),
                    ("deberta qkvo", 8192, 768, 768), ("deberta up", 8192, 768, 3072),
                    ("deberta down", 8192, 3072, 768)]
CPU_LAYER_SHAPES = [("minilm qkvo", 1024, 384, 384), ("minilm up", 1024, 384, 1536), ("minilm down", 1024, 1536, 384)]


@dataclass
class LayerResult:
    shape: str
    tokens: int
    in_features: int
    out_features: int
    peer: str
    mode: str
    dropout: float = 0.0
    forward_ms: float | None = None
    timing: str | None = None  # "CUDA graph", "CUDA events" or "wall clock"
    forward_backward_ms: float | None = None
    note: str | None = None


def _layer_peer(peer: str, in_f: int, out_f: int, device: torch.device, dtype: torch.dtype,
                dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    base.requires_grad_(False)
    if peer == "floor":
        return base
    if peer.endswith("-4bit"):
        from lora2_kernels.four_bit import quantize_linear

        base = quantize_linear(base, "nf4", compute_dtype=dtype, device=device)
        if peer == "lora2-4bit":  # the fused 4-bit kernels on a GPU, the reference path on a CPU
            layer = LoRA2Linear.from_linear(base, r=8, k=8, dropout=dropout).train()
            with torch.no_grad():
                layer.singular_values.normal_()
            return layer
    if peer in ("peft-lora", "peft-lora-4bit"):
        import peft

        # PEFT's own LoRA layer (fp32 adapters, as PEFT keeps them), on the same frozen projection
        return peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                                         lora_dropout=dropout)).train()
    layer = LoRA2Linear.from_linear(base, r=8, k=8, backend="triton" if peer in BASE_GEMM_OF_PEER else "reference",
                                    dropout=dropout).train()
    with torch.no_grad():
        layer.singular_values.normal_()  # a trained adapter: λ ≠ 0
    return layer


COMPILE_MODES = {"compiled": "default", "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune"}


def measure_layer(name: str, tokens: int, in_f: int, out_f: int, peer: str, mode: str,
                  device: torch.device, dropout: float = 0.0) -> LayerResult:
    result = LayerResult(name, tokens, in_f, out_f, peer, mode, dropout)
    if peer in BASE_GEMM_OF_PEER and device.type != "cuda":
        result.note = "needs a GPU"
        return result
    import os

    forced = os.environ.get("LORA2_BASE_GEMM")
    if peer in BASE_GEMM_OF_PEER:
        os.environ["LORA2_BASE_GEMM"] = BASE_GEMM_OF_PEER[peer]
    try:
        return _measure_layer(result, peer, mode, device, dropout)
    finally:
        if forced is None:
            os.environ.pop("LORA2_BASE_GEMM", None)
        else:
            os.environ["LORA2_BASE_GEMM"] = forced


def _measure_layer(result: LayerResult, peer: str, mode: str, device: torch.device, dropout: float) -> LayerResult:
    name, tokens, in_f, out_f = result.shape, result.tokens, result.in_features, result.out_features
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        module = _layer_peer(peer, in_f, out_f, device, dtype, dropout)
        forward = torch.compile(module, mode=COMPILE_MODES[mode]) if mode in COMPILE_MODES else module
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        grad_y = torch.randn(tokens, out_f, device=device, dtype=dtype)
        trainable = [p for p in module.parameters() if p.requires_grad]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

        def fwd():
            with torch.no_grad(), autocast:
                return forward(x)

        def fwd_bwd():
            with autocast:
                y = forward(x)
            y.backward(grad_y)

        # every method alike: CUDA-graph replays where the graph captures (reduce-overhead makes its own graphs,
        # which do not nest in another capture), else CUDA events around each call
        graph = device.type == "cuda" and mode != "reduce-overhead"
        try:
            result.forward_ms = bench(fwd, device, graph=graph)
            result.forward_backward_ms = bench(fwd_bwd, device, grad_to_none=[x, *trainable], graph=graph)
            result.timing = "CUDA graph" if graph else ("CUDA events" if device.type == "cuda" else "wall clock")
        except Exception as e:  # noqa: BLE001 -- a method whose step does not capture: events, and say so
            if not graph:
                raise
            logger.warning("%s / %s / %s: CUDA graph capture failed (%s); timed with CUDA events", name, mode, peer,
                           type(e).__name__)
            torch.cuda.synchronize(device)
            result.forward_ms = bench(fwd, device)
            result.forward_backward_ms = bench(fwd_bwd, device, grad_to_none=[x, *trainable])
            result.timing = "CUDA events (capture failed)"
    except Exception as e:  # a peer that fails (e.g. cannot compile) is reported, not fatal  # noqa: BLE001
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        logger.warning("%s / %s / %s failed: %s", name, mode, peer, result.note)
    return result


def layer_table(results: list[LayerResult]) -> str:
    lines = ["| shape | tokens × in → out | mode | peer | dropout | fwd ms | fwd+bwd ms | fwd+bwd × floor (bf16) "
             "| × PEFT LoRA (on the same base, same dropout) | timing |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        # the floor has no dropout: every row is compared with it; PEFT with its own row at the same dropout
        same = {x.peer: x for x in results if (x.shape, x.mode) == (r.shape, r.mode)
                and (x.dropout == r.dropout or x.peer == "floor")}

        def ratio(peer: str) -> str:
            ref = same.get(peer)
            if r.forward_backward_ms is None or ref is None or not ref.forward_backward_ms:
                return "—"
            return f"{r.forward_backward_ms / ref.forward_backward_ms:.2f}"

        def ms(value: float | None) -> str:
            return f"{value:.3f}" if value is not None else (r.note or "—")

        lines.append(f"| {r.shape} | {r.tokens} × {r.in_features} → {r.out_features} | {r.mode} | {r.peer} | "
                     f"{r.dropout:g} | {ms(r.forward_ms)} | {ms(r.forward_backward_ms)} | {ratio('floor')} | "
                     f"{ratio('peft-lora-4bit' if r.peer.endswith('-4bit') else 'peft-lora')} | {r.timing or '—'} |")
    return "\n".join(lines)


# --- whole training steps ---------------------------------------------------------------------------------

STEP_METHODS = ("floor", "full", "peft-lora", "peft-adalora", "lora2-reference", "lora2")


@dataclass(frozen=True)
class ModelShape:
    name: str
    batch: int
    length: int
    causal_lm: bool

    def config(self) -> transformers.PretrainedConfig:
        if self.name == "deberta-v3-base":
            return transformers.DebertaV2Config(
                hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                vocab_size=128100, max_position_embeddings=512, relative_attention=True, position_buckets=256,
                pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0,
                position_biased_input=False, num_labels=2)
        if self.name == "llama-1.1b":
            return transformers.LlamaConfig(
                hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
        if self.name == "cpu-small":
            return transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                           intermediate_size=1536, vocab_size=30522, num_labels=2)
        raise KeyError(self.name)


MODEL_SHAPES = {s.name: s for s in (ModelShape("deberta-v3-base", 32, 256, False),
                                    ModelShape("llama-1.1b", 8, 1024, True), ModelShape("cpu-small", 8, 128, False))}


@dataclass
class StepResult:
    shape: str
    mode: str
    method: str
    ms_per_step: float | None = None
    allocator_ms: float | None = None  # the allocator (+ AdaLoRA's bookkeeping) part of the step
    regularizer_ms: float | None = None  # LoRA²'s regulariser forward + backward, measured alone
    peak_memory_mb: float | None = None
    tokens_per_s: float | None = None
    trainable_parameters: int | None = None
    note: str | None = None


def _build_step_model(shape: ModelShape, method: str, device: torch.device):
    """(module to train, post-step hook, the adapted model for extra measurements)."""
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if shape.causal_lm else transformers.AutoModelForSequenceClassification
    with torch.device(device):  # initialise on the device: a 1.1B model initialises in seconds there
        model = auto.from_config(shape.config())
    model.train()
    targets = DEFAULT_TARGET_MODULES[model.config.model_type]
    if method == "floor":
        model.requires_grad_(False)
        return model, None, model
    if method == "full":
        return model, None, model
    if method in ("peft-lora", "peft-adalora"):
        import peft

        from lora2.methods import peft_task_type

        # The task type makes PEFT wrap the model in its task class, whose forward is AdaLoraModel's:
        # without it AdaLoRA's orthogonal regulariser is never computed (nor timed).
        task_type = peft_task_type(model)
        if method == "peft-lora":
            config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task_type)
            return peft.get_peft_model(model, config), None, model
        config = peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=32, target_modules=targets, tinit=0, tfinal=0,
                                    deltaT=1, total_step=10 * PRUNING_STEP, orth_reg_weight=0.1, task_type=task_type)
        adapted = peft.get_peft_model(model, config)
        return adapted, adapted.base_model.update_and_allocate, adapted
    backend = "reference" if method == "lora2-reference" else "auto"
    lora2 = get_lora2_model(model, LoRA2Config(r=8, k=8, target_rank=6, alpha=16, target_modules=targets,
                                               mask_interval=1, total_steps=10 * PRUNING_STEP, backend=backend))
    allocator = RankAllocator(lora2.lora2_layers(), lora2.lora2_config)
    return lora2, allocator.step, lora2


def _model_inputs(shape: ModelShape, device: torch.device, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(100, vocab - 1, (shape.batch, shape.length), generator=g).to(device)
    if shape.causal_lm:
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 2, (shape.batch,), generator=g).to(device)}


def measure_step(shape: ModelShape, method: str, mode: str, device: torch.device, steps: int,
                 warmup_steps: int) -> StepResult:
    result = StepResult(shape.name, mode, method)
    if method == "lora2" and device.type != "cuda":
        result.note = "needs a GPU (on the CPU, lora2 is lora2-reference)"
        return result
    try:
        module, hook, adapted = _build_step_model(shape, method, device)
        batch = _model_inputs(shape, device, adapted.config.vocab_size)
        if method == "lora2":
            warmup(adapted, shape.batch * shape.length)  # autotune outside the timed steps
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        trainable = [p for p in module.parameters() if p.requires_grad]
        result.trainable_parameters = sum(p.numel() for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        forward = torch.compile(module, mode=COMPILE_MODES[mode]) if mode in COMPILE_MODES else module
        embeddings = adapted.get_input_embeddings()

        def step(i: int) -> Callable[[], float]:
            """One training step; returns how to read the seconds spent in the allocator hook once the step
            is synchronised (CUDA events around it: no synchronisation inside the step, for any method)."""
            with autocast:
                if method == "floor":  # gradients flow to the inputs, no weight gradients
                    inputs = embeddings(batch["input_ids"]).detach().requires_grad_()
                    loss = forward(inputs_embeds=inputs, labels=batch["labels"]).loss
                else:
                    loss = forward(**batch).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            spent: Callable[[], float] = lambda: 0.0  # noqa: E731
            if hook is not None:
                if device.type == "cuda":
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    hook(PRUNING_STEP + i)
                    end.record()
                    spent = lambda: begin.elapsed_time(end) / 1000  # noqa: E731
                else:
                    start = time.perf_counter()
                    hook(PRUNING_STEP + i)
                    seconds = time.perf_counter() - start
                    spent = lambda: seconds  # noqa: E731
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            return spent

        for i in range(warmup_steps):  # compilation and allocator warm-up happen here
            step(i)
        times, hooks = [], []
        with PeakMemory(device) as peak:
            for i in range(steps):
                _sync(device)
                start = time.perf_counter()
                hooks.append(step(warmup_steps + i))
                _sync(device)
                times.append(time.perf_counter() - start)
        result.ms_per_step = 1000 * statistics.median(times)
        result.allocator_ms = 1000 * statistics.median([h() for h in hooks]) if hook is not None else None
        result.peak_memory_mb = peak.mebibytes
        result.tokens_per_s = shape.batch * shape.length / statistics.median(times)
        if method.startswith("lora2"):
            regularizer = adapted.orthogonal_regularizer()
            result.regularizer_ms = bench(lambda: regularizer().backward(), device, runs=max(3, steps // 2))
    except Exception as e:  # a peer that cannot compile is reported, not fatal  # noqa: BLE001
        result.note = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        logger.warning("%s / %s / %s failed: %s", shape.name, mode, method, result.note)
    return result


def step_table(results: list[StepResult]) -> str:
    lines = ["| shape | mode | method | ms/step | × floor | × PEFT LoRA | allocator ms (share) | peak MiB | tokens/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        same = {x.method: x for x in results if (x.shape, x.mode) == (r.shape, r.mode) and x.ms_per_step}
        if r.ms_per_step is None:
            lines.append(f"| {r.shape} | {r.mode} | {r.method} | {r.note or '—'} | | | | | |")
            continue

        def ratio(method: str) -> str:
            return f"{r.ms_per_step / same[method].ms_per_step:.2f}" if method in same else "—"

        alloc = (f"{r.allocator_ms:.2f} ({100 * r.allocator_ms / r.ms_per_step:.2f} %)"
                 if r.allocator_ms is not None else "—")
        lines.append(f"| {r.shape} | {r.mode} | {r.method} | {r.ms_per_step:.1f} | {ratio('floor')} | "
                     f"{ratio('peft-lora')} | {alloc} | {r.peak_memory_mb:.0f} | {r.tokens_per_s:,.0f} |")
    return "\n".join(lines)


# --- the allocator's importance update ----------------------------------------------------------------------


@dataclass
class AllocatorResult:
    modules: int
    r: int
    k: int
    compiled_ms: float | None = None
    reference_ms: float | None = None
    allocator_step_ms: float | None = None  # a whole RankAllocator.step at a masking step, compiled op
    speedup: float | None = None
    # max |compiled − reference| / max |reference| of the scores after one update from the same state:
    # a speed-up is only worth printing for two implementations that compute the same thing
    score_difference: float | None = None
    note: str | None = None


def measure_allocator(device: torch.device, modules: int = 22 * 7, r: int = 8, k: int = 8) -> AllocatorResult:
    """LLaMA-1.1B's adapter count, the shapes the allocator reads (λ, B₁, A₂ and their gradients)."""
    result = AllocatorResult(modules, r, k)
    torch.manual_seed(0)
    layers = {f"layer{i}": LoRA2Linear(16, 16, r=r, k=k, device=device) for i in range(modules)}
    for layer in layers.values():
        for p in (layer.singular_values, layer.q_up, layer.p_down):
            p.grad = torch.randn_like(p)
    params = ([l.singular_values for l in layers.values()], [l.q_up for l in layers.values()],
              [l.p_down for l in layers.values()])
    scores = {}
    for backend, attribute in (("compiled", "compiled_ms"), ("reference", "reference_ms")):
        state = reference.new_importance_state(modules, r, k, device=device)
        try:
            scores[backend] = importance_update(*params, state, 0.85, 0.85, backend=backend)[0].clone()
            setattr(result, attribute, bench(lambda: importance_update(*params, state, 0.85, 0.85, backend=backend),
                                             device, runs=50))
        except RuntimeError as e:
            result.note = str(e).splitlines()[0]
    config = LoRA2Config(r=r, k=k, target_rank=max(1, 3 * r // 4), mask_interval=1, total_steps=10 * PRUNING_STEP)
    allocator = RankAllocator(layers, config)
    result.allocator_step_ms = bench(lambda: allocator.step(PRUNING_STEP), device, runs=50)
    if result.compiled_ms and result.reference_ms:
        result.speedup = result.reference_ms / result.compiled_ms
    if len(scores) == 2:
        result.score_difference = float((scores["compiled"] - scores["reference"]).abs().max()
                                        / scores["reference"].abs().max().clamp_min(1e-30))
    return result


def allocator_table(result: AllocatorResult, steps: list[StepResult]) -> str:
    llama = [s for s in steps if s.shape == "llama-1.1b" and s.method == "lora2" and s.ms_per_step]
    share = (f"{100 * result.allocator_step_ms / llama[0].ms_per_step:.2f} % of the LLaMA-1.1B lora2 step"
             if llama and result.allocator_step_ms else "— (run the steps section on a GPU for the share)")

    def ms(value: float | None) -> str:
        return f"{value:.3f}" if value is not None else (result.note or "—")

    return "\n".join([
        "| modules × r × k | importance op, compiled ms | stacked-torch reference ms | speed-up | "
        "allocator.step at a masking step ms | share of a step |",
        "|---|---:|---:|---:|---:|---|",
        f"| {result.modules} × {result.r} × {result.k} | {ms(result.compiled_ms)} | {ms(result.reference_ms)} | "
        f"{f'{result.speedup:.1f}×' if result.speedup else '—'} | {ms(result.allocator_step_ms)} | {share} |"])


# --- device work --------------------------------------------------------------------------------------------


def _under_interpreter(module: str):
    """The JSON that ``python -m <module>`` prints last, run in a subprocess under the Triton interpreter
    (TRITON_INTERPRET must be set before Triton compiles anything in a process)."""
    import os
    import subprocess

    run = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parent.parent,
                         check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def count_device_work(device: torch.device) -> dict[str, int]:
    """benchmarks.device_work's counts: in this process on a GPU, else under the interpreter in a subprocess."""
    if device.type == "cuda":
        from . import device_work

        return {"peers": device_work.peer_counts("cuda"), "regimes": device_work.regime_counts("cuda"),
                "adapters": device_work.adapter_counts("cuda")}
    return _under_interpreter("benchmarks.device_work")


def measure_host_time(device: torch.device) -> dict[str, dict[str, float]]:
    """benchmarks.host_time's µs per projection step: on a GPU here, else in a subprocess under the
    interpreter with lora2's launches stubbed."""
    if device.type == "cuda":
        from . import host_time

        return host_time.measure("cuda")
    return _under_interpreter("benchmarks.host_time")


# --- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--shapes", nargs="+", choices=sorted(MODEL_SHAPES),
                        help="step shapes (default: deberta-v3-base llama-1.1b on a GPU, cpu-small on the CPU)")
    parser.add_argument("--layer-shapes", nargs="+", help="names of layer shapes to keep (default: all for the device)")
    parser.add_argument("--methods", nargs="+", choices=STEP_METHODS, default=list(STEP_METHODS))
    parser.add_argument("--peers", nargs="+", choices=LAYER_PEERS, default=list(LAYER_PEERS))
    parser.add_argument("--modes", nargs="+", choices=("eager", *COMPILE_MODES),
                        help="eager and torch.compile modes (default: eager compiled reduce-overhead on a GPU, "
                             "eager compiled on the CPU; max-autotune where time allows)")
    parser.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1],
                        help="adapter dropout of the layer rows, LoRA² and PEFT alike (default 0 0.1; the floor has none)")
    parser.add_argument("--smoke", action="store_true",
                        help="every section on tiny shapes, one step: a quick check that the benchmark runs (CI)")
    parser.add_argument("--steps", type=int, help="timed training steps per measurement (default 30 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--out", default=f"runs/throughput-{datetime.date.today().isoformat()}",
                        help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (30 if device.type == "cuda" else 10)
    modes = args.modes or (["eager", "compiled", "reduce-overhead"] if device.type == "cuda" else ["eager", "compiled"])
    if args.smoke and not args.modes:
        modes = ["eager"]  # compiling a model takes minutes on a CPU
    layer_shapes = GPU_LAYER_SHAPES if device.type == "cuda" else CPU_LAYER_SHAPES
    allocator_modules = 22 * 7
    if args.smoke:
        layer_shapes, steps, args.warmup, allocator_modules = [("tiny", 16, 24, 20)], 1, 0, 12
        MODEL_SHAPES["cpu-small"] = ModelShape("cpu-small", 2, 8, False)
    report: dict = {"date": datetime.date.today().isoformat(), "device": device_description(device),
                    "command": " ".join(["python -m benchmarks.throughput", *(sys.argv[1:] if argv is None else argv)]),
                    "layers": [],
                    "steps": [], "allocator": None, "work": None, "host": None, "model": None}
    sections: list[str] = []
    if "work" in args.sections:
        report["work"] = count_device_work(device)
        sections.append("## Device work per projection per training step (kernels launched)\n\n"
                        + "\n".join(["| peer | launches |", "|---|---:|"]
                                     + [f"| {k} | {v} |" for k, v in report["work"]["peers"].items()])
                        + "\n\nBy dtype regime (autocast regimes take fp32 inputs; FSDP2 in a one-process group, "
                          "trainable parameters kept whole):\n\n"
                        + "\n".join(["| regime | frozen layer | PEFT LoRA r=8 | LoRA² | LoRA² − frozen |",
                                      "|---|---:|---:|---:|---:|"]
                                     + [f"| {k} | {v['floor']} | {v['peft']} | {v['lora2']} | {v['lora2'] - v['floor']} |"
                                        for k, v in report["work"]["regimes"].items()])
                        + "\n\nSeveral adapters over one base (a sweep in one run; bf16 base, fp32 adapters, autocast): "
                        + ", ".join(f"{n} → {v}" for n, v in report["work"].get("adapters", {}).items()))
    if "host" in args.sections:
        from .host_time import table as host_table

        report["host"] = measure_host_time(device)
        how = ("real launches, 64 tokens × 768" if device.type == "cuda" else
               "CPU: lora2's launches stubbed, so this is lora2's own host code; Triton's launcher needs a GPU")
        sections.append(f"## Host time per projection step ({how})\n\n" + host_table(report["host"]))
    if "layers" in args.sections:
        shapes = [s for s in layer_shapes if not args.layer_shapes or s[0] in args.layer_shapes]
        for name, tokens, in_f, out_f in shapes:
            for mode in modes:
                for peer in args.peers:
                    for dropout in ([0.0] if peer == "floor" else args.dropout):
                        logger.info("layer %s · %s · %s · dropout %g", name, mode, peer, dropout)
                        report["layers"].append(measure_layer(name, tokens, in_f, out_f, peer, mode, device, dropout))
                        _release(device)
        sections.append("## Layers (median ms)\n\n" + layer_table(report["layers"]))
    if "steps" in args.sections:
        shapes = args.shapes or (["deberta-v3-base", "llama-1.1b"] if device.type == "cuda" else ["cpu-small"])
        for name in shapes:
            for mode in modes:
                for method in args.methods:
                    logger.info("step %s · %s · %s", name, mode, method)
                    report["steps"].append(measure_step(MODEL_SHAPES[name], method, mode, device, steps, args.warmup))
                    _release(device)
        sections.append(f"## Training steps (median of {steps})\n\n" + step_table(report["steps"]))
        regs = [r for r in report["steps"] if r.regularizer_ms is not None and r.ms_per_step]
        if regs:
            sections.append("\n".join(f"LoRA² regulariser alone ({r.shape}, {r.mode}, {r.method}): "
                                      f"{r.regularizer_ms:.2f} ms = {100 * r.regularizer_ms / r.ms_per_step:.2f} % "
                                      "of its step" for r in regs))
    if "model" in args.sections:
        measured = {}
        for r in report["layers"]:
            same = {x.peer: x for x in report["layers"] if (x.shape, x.mode) == (r.shape, r.mode)}
            if r.mode == "eager" and r.peer == "lora2-triton" and r.forward_backward_ms and same.get("floor"):
                ratio = r.forward_backward_ms / same["floor"].forward_backward_ms
                measured[(r.tokens, r.in_features, r.out_features)] = ratio
        rows = cost_model.layer_models()
        report["model"] = [asdict(r) for r in rows]
        by_shape = {r.shape: measured[(r.tokens, r.in_f, r.out_f)] for r in rows if (r.tokens, r.in_f, r.out_f) in measured}
        sections.append("## Cost model per projection (forward + backward)\n\n" + cost_model.model_table(rows, by_shape)
                        + "\n\n" + cost_model.adapters_table())
    if "allocator" in args.sections:
        logger.info("allocator")
        report["allocator"] = measure_allocator(device, modules=allocator_modules)
        sections.append("## Allocator\n\n" + allocator_table(report["allocator"], report["steps"]))
    header = f"# lora2 throughput — {report['date']}, {report['device']}\n\nCommand: `{report['command']}`"
    if device.type != "cuda":
        header += "\n\nCPU run: a smoke test of every peer. The fused Triton kernels and the GPU targets need a GPU."
    markdown = "\n\n".join([header, *sections]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lora2.io import atomic_write_text

    atomic_write_text(out / "results.md", markdown)
    serialisable = {**report, "layers": [asdict(r) for r in report["layers"]],
                    "steps": [asdict(r) for r in report["steps"]],
                    "allocator": asdict(report["allocator"]) if report["allocator"] else None}
    atomic_write_text(out / "results.json", json.dumps(serialisable, indent=2))
    print(markdown)  # noqa: T201 -- the report is the program's output
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
