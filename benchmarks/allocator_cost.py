"""How much of a LoRA² training step the allocator and the regulariser cost.

Real all-MiniLM-L6-v2 (offline package), batch 32 × 64 tokens, fp32 on whatever device is there.
Prints a table of median milliseconds and the share of the full step.

    python benchmarks/allocator_cost.py [--steps 20] [--batch 32] [--length 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora2 import LoRA2Config, get_lora2_model
from lora2.allocator import RankAllocator
from lora2.train import load_base_model, resolve_model_path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = get_lora2_model(load_base_model(resolve_model_path("minilm"), "classification"),
                            LoRA2Config(mask_interval=1)).to(device)
    allocator = RankAllocator(model.lora2_layers(), model.lora2_config, total_steps=10_000)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(1000, 20000, (args.batch, args.length), device=device)
    labels = torch.randint(0, 2, (args.batch,), device=device)
    regularizer = model.orthogonal_regularizer()
    times: dict[str, list[float]] = {"step (fwd+bwd+AdamW, no allocator)": [], "allocator.step": [],
                                     "regulariser fwd+bwd": []}
    model.train()
    for i in range(args.steps + 3):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        _sync(device)
        t1 = time.perf_counter()
        allocator.step(100 + i)  # in the pruning phase: score update + global top-k + mask every step
        _sync(device)
        t2 = time.perf_counter()
        regularizer().backward()
        _sync(device)
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:
            times["step (fwd+bwd+AdamW, no allocator)"].append(t1 - t0)
            times["allocator.step"].append(t2 - t1)
            times["regulariser fwd+bwd"].append(t3 - t2)
    step = statistics.median(times["step (fwd+bwd+AdamW, no allocator)"])
    print(f"device: {device}, modules: {len(model.lora2_layers())}, batch {args.batch} x {args.length}")
    print(f"{'part':<38} {'median ms':>10} {'share of step':>14}")
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        print(f"{name:<38} {ms:>10.2f} {100 * statistics.median(values) / step:>13.2f}%")


if __name__ == "__main__":
    main()
