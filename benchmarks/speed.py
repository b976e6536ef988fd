"""Training-step speed and memory: LoRA² against the frozen-model floor, full fine-tuning, PEFT LoRA
and PEFT AdaLoRA, measured side by side in one process, eager and torch.compile.

Shapes (randomly initialised, real architectures):
    deberta-v3-base   DeBERTa-v3-base, sequence classification, batch 32 × 256   (GPU)
    llama-1.1b        LLaMA 1.1B (22 layers, 2048 hidden, GQA 32/4), causal LM, batch 8 × 1024   (GPU)
    cpu-small         all-MiniLM-L6 shape (BERT, 6 × 384), classification, batch 8 × 128   (CPU)

Methods (adapters on all attention + MLP linears, r = 8):
    floor     frozen base, forward + backward to the inputs: the cost no adapter can avoid
    full      full fine-tuning, AdamW
    lora      PEFT LoRA r=8
    adalora   PEFT AdaLoRA 12→8, update_and_allocate every step (its share reported as "allocator")
    lora2     LoRA² r=8 k=8, orthogonality regulariser in the loss, rank allocator every step

Both allocators run in their pruning phase with a re-mask every step: the worst case. GPU steps use
bf16 autocast; CPU steps fp32. Each number is the median of --steps timed steps after --warmup.

    python benchmarks/speed.py                       # the shapes for this machine, eager + compiled
    python benchmarks/speed.py --shapes cpu-small --modes eager --steps 10 --json runs/speed-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from lora2 import LoRA2Config, get_lora2_model
from lora2.allocator import RankAllocator
from lora2.config import DEFAULT_TARGET_MODULES
from lora2.memory import PeakMemory

logger = logging.getLogger("speed")
METHODS = ("floor", "full", "lora", "adalora", "lora2")
PRUNING_STEP = 100  # allocator steps are numbered from here: inside the pruning phase


@dataclass(frozen=True)
class Shape:
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


SHAPES = {s.name: s for s in (Shape("deberta-v3-base", 32, 256, False), Shape("llama-1.1b", 8, 1024, True),
                              Shape("cpu-small", 8, 128, False))}


@dataclass
class Measurement:
    shape: str
    mode: str
    method: str
    ms_per_step: float | None = None
    allocator_ms: float | None = None  # allocator (+ AdaLoRA's bookkeeping) part of the step
    regularizer_ms: float | None = None  # LoRA²'s regulariser forward + backward, measured alone
    peak_memory_mb: float | None = None
    tokens_per_s: float | None = None
    trainable_parameters: int | None = None
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(shape: Shape, method: str, device: torch.device) -> tuple[torch.nn.Module, Callable[[int], None] | None,
                                                                      torch.nn.Module]:
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
    if method in ("lora", "adalora"):
        import peft

        if method == "lora":
            config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
            return peft.get_peft_model(model, config), None, model
        config = peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=32, target_modules=targets, tinit=0, tfinal=0,
                                    deltaT=1, total_step=10 * PRUNING_STEP, orth_reg_weight=0.1)
        adapted = peft.get_peft_model(model, config)
        return adapted, adapted.base_model.update_and_allocate, adapted
    lora2 = get_lora2_model(model, LoRA2Config(r=8, k=8, target_rank=6, alpha=16, target_modules=targets,
                                               mask_interval=1, total_steps=10 * PRUNING_STEP))
    allocator = RankAllocator(lora2.lora2_layers(), lora2.lora2_config)
    return lora2, allocator.step, lora2


def _inputs(shape: Shape, device: torch.device, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(100, vocab - 1, (shape.batch, shape.length), generator=g).to(device)
    if shape.causal_lm:
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 2, (shape.batch,), generator=g).to(device)}


def measure(shape: Shape, method: str, mode: str, device: torch.device, steps: int, warmup: int) -> Measurement:
    result = Measurement(shape.name, mode, method)
    module, hook, adapted = _build(shape, method, device)
    batch = _inputs(shape, device, adapted.config.vocab_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    trainable = [p for p in module.parameters() if p.requires_grad]
    result.trainable_parameters = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    forward = torch.compile(module) if mode == "compiled" else module
    embeddings = adapted.get_input_embeddings()

    def step(i: int) -> float:
        """One training step; returns the seconds spent in the allocator hook."""
        with autocast:
            if method == "floor":  # gradients flow to the inputs, no weight gradients
                inputs = embeddings(batch["input_ids"]).detach().requires_grad_()
                loss = forward(inputs_embeds=inputs, labels=batch["labels"]).loss
            else:
                loss = forward(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        spent = 0.0
        if hook is not None:
            _sync(device)
            t = time.perf_counter()
            hook(PRUNING_STEP + i)
            _sync(device)
            spent = time.perf_counter() - t
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        return spent

    try:
        for i in range(warmup):  # compilation and allocator warm-up happen here
            step(i)
        times, hooks = [], []
        with PeakMemory(device) as peak:
            for i in range(steps):
                _sync(device)
                t = time.perf_counter()
                hooks.append(step(warmup + i))
                _sync(device)
                times.append(time.perf_counter() - t)
        result.ms_per_step = 1000 * statistics.median(times)
        result.allocator_ms = 1000 * statistics.median(hooks) if hook is not None else None
        result.peak_memory_mb = peak.mebibytes
        result.tokens_per_s = shape.batch * shape.length / statistics.median(times)
        if method == "lora2":
            regularizer = adapted.orthogonal_regularizer()
            reg_times = []
            for _ in range(max(3, steps // 2)):
                _sync(device)
                t = time.perf_counter()
                regularizer().backward()
                _sync(device)
                reg_times.append(time.perf_counter() - t)
            result.regularizer_ms = 1000 * statistics.median(reg_times)
    except Exception as e:  # a peer that cannot compile is reported, not fatal  # noqa: BLE001
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        logger.warning("%s / %s / %s failed: %s", shape.name, mode, method, result.error)
    return result


def _release(device: torch.device) -> None:
    """Free the last measurement's model, optimiser and compiled graphs before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def merged_inference(shape: Shape, device: torch.device, steps: int) -> dict[str, float]:
    """Inference ms of the base model, LoRA² with adapters live, and LoRA² merged into the weights."""
    torch.manual_seed(0)
    module, _, lora2 = _build(shape, "lora2", device)
    batch = {k: v for k, v in _inputs(shape, device, lora2.config.vocab_size).items() if k == "input_ids"}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    lora2.eval()

    @torch.no_grad()
    def time_forward(model: torch.nn.Module) -> float:
        times = []
        for i in range(steps + 2):
            _sync(device)
            t = time.perf_counter()
            with autocast:
                model(**batch)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    adapted_ms = time_forward(lora2)
    merged = lora2.merge_and_unload()
    merged_ms = time_forward(merged)
    base = _build(shape, "floor", device)[0].eval()
    return {"base_ms": time_forward(base), "lora2_adapted_ms": adapted_ms, "lora2_merged_ms": merged_ms}


def table(results: list[Measurement]) -> str:
    head = (f"{'shape':<16} {'mode':<9} {'method':<8} {'ms/step':>9} {'x floor':>8} {'x LoRA':>7} "
            f"{'alloc ms':>9} {'alloc %':>8} {'peak MiB':>9} {'tokens/s':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        same = [x for x in results if x.shape == r.shape and x.mode == r.mode and x.ms_per_step]
        floor = next((x.ms_per_step for x in same if x.method == "floor"), None)
        lora = next((x.ms_per_step for x in same if x.method == "lora"), None)
        if r.ms_per_step is None:
            lines.append(f"{r.shape:<16} {r.mode:<9} {r.method:<8} {'—':>9}  {r.error or ''}")
            continue
        ratio = (lambda ref: f"{r.ms_per_step / ref:.2f}" if ref else "—")
        alloc = f"{r.allocator_ms:.2f}" if r.allocator_ms is not None else "—"
        share = f"{100 * r.allocator_ms / r.ms_per_step:.2f}" if r.allocator_ms is not None else "—"
        lines.append(f"{r.shape:<16} {r.mode:<9} {r.method:<8} {r.ms_per_step:>9.1f} {ratio(floor):>8} "
                     f"{ratio(lora):>7} {alloc:>9} {share:>8} {r.peak_memory_mb:>9.0f} {r.tokens_per_s:>10.0f}")
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16 autocast"
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}, fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        help="default: deberta-v3-base llama-1.1b on a GPU, cpu-small on the CPU")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 30 on GPU, 10 on CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default="runs/speed.json", help="where to write every number")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or (["deberta-v3-base", "llama-1.1b"] if device.type == "cuda" else ["cpu-small"])
    steps = args.steps or (30 if device.type == "cuda" else 10)
    results, inference = [], {}
    for name in shapes:
        for mode in args.modes:
            for method in args.methods:
                logger.info("%s · %s · %s", name, mode, method)
                results.append(measure(SHAPES[name], method, mode, device, steps, args.warmup))
                _release(device)
        inference[name] = merged_inference(SHAPES[name], device, steps)
    print(f"\n{device_description(device)}; median of {steps} steps\n")  # noqa: T201
    print(table(results))  # noqa: T201
    print("\nInference (no grad): " + "; ".join(  # noqa: T201
        f"{n}: base {v['base_ms']:.1f} ms, LoRA² adapted {v['lora2_adapted_ms']:.1f} ms, merged "
        f"{v['lora2_merged_ms']:.1f} ms" for n, v in inference.items()))
    regs = [r for r in results if r.regularizer_ms is not None]
    for r in regs:
        print(f"LoRA² regulariser alone ({r.shape}, {r.mode}): {r.regularizer_ms:.2f} ms "  # noqa: T201
              f"= {100 * r.regularizer_ms / r.ms_per_step:.2f} % of its step")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    from lora2.io import atomic_write_text

    atomic_write_text(path, json.dumps({"device": device_description(device), "steps": steps,
                                        "results": [asdict(r) for r in results], "inference": inference}, indent=2))
    print(f"\nJSON: {path}")  # noqa: T201


if __name__ == "__main__":
    main()
