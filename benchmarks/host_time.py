"""Host time of one projection's training step (forward + backward): what the CPU spends per call.

Small layers are host-bound: DeBERTa's 768 → 768 projection at 32 × 256 tokens is ~36 µs of GPU work, so
the Python and dispatch around the kernels decide the speed there. Measured per call as the median wall
time of ``layer(x).backward(g)`` with methods interleaved (the same moment of a noisy machine for each):

- on a GPU: the real launches on small inputs (64 tokens: the GPU finishes before the host issues the
  next call, so the wall time is the host's), the device synchronised only after all calls;
- on a CPU (CI, no GPU): lora2's launches stubbed (``Launch.run`` returns at once, under the interpreter's
  host path) on tiny CPU tensors, so what is timed is lora2's own host code: argument checks, autograd,
  allocations, launch set-up; Triton's launcher itself is not (it needs a GPU). The frozen nn.Linear
  runs F.linear on the same tiny tensors (8 × 64: its compute is a microsecond).

    python -m benchmarks.host_time            # JSON: µs per call and ratios to the frozen layer
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import torch
from torch import nn

# (name, method, dtype regime, dropout)
CASES = (
    ("frozen nn.Linear", "floor", "bf16", 0.0),
    ("LoRA², bf16 base + fp32 adapter", "lora2", "bf16", 0.0),
    ("LoRA², all bf16", "lora2", "all-bf16", 0.0),
    ("LoRA², dropout 0.1 (in a model: shared seeds)", "lora2", "bf16", 0.1),
    ("PEFT LoRA r=8, bf16 base + fp32 adapter", "peft", "bf16", 0.0),
)


@contextlib.contextmanager
def stubbed_launches():
    """lora2's kernel launches return at once (CPU host-time measurement)."""
    from lora2_kernels.triton_kernels import lora_linear as kernels

    original = kernels.Launch.run

    def stub(launch):
        return dict(kernels.INTERPRETER_MATMUL_CONFIG) if launch.kernel in kernels.AUTOTUNED else {}

    kernels.Launch.run = stub
    try:
        yield
    finally:
        kernels.Launch.run = original


def _module(method: str, regime: str, dropout: float, features: int, device: str) -> nn.Module:
    from lora2_kernels import LoRA2Linear
    from lora2_kernels.linear import DropoutSeeds

    torch.manual_seed(0)
    base = nn.Linear(features, features, device=device, dtype=torch.bfloat16).requires_grad_(False)
    if method == "floor":
        return base
    if method == "peft":
        import peft

        return peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                                         lora_dropout=dropout))
    layer = LoRA2Linear.from_linear(base, r=8, k=8, dropout=dropout, backend="triton").train()
    if regime == "all-bf16":
        layer.to(torch.bfloat16)
    model = nn.Sequential(layer)
    DropoutSeeds(model, [layer])  # as LoRA2Model adapts a model
    return model


def measure(device: str | None = None, calls: int = 300, rounds: int = 3) -> dict[str, dict[str, float]]:
    """{case: {"us": median µs per forward + backward, "ratio": over the frozen layer's}}."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    tokens, features = (64, 768) if device == "cuda" else (8, 64)
    modules = {name: _module(method, regime, dropout, features, device) for name, method, regime, dropout in CASES}
    x = torch.randn(tokens, features, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.ones(tokens, features, device=device, dtype=torch.bfloat16)
    times: dict[str, list[float]] = {name: [] for name in modules}
    stub = stubbed_launches() if device != "cuda" else contextlib.nullcontext()
    with stub:
        for module in modules.values():  # first calls: compilation, autotuning, lazy initialisation
            for _ in range(3):
                module(x).backward(grad)
        for _ in range(rounds):
            for name, module in modules.items():
                spent = []
                for _ in range(calls // rounds):
                    start = time.perf_counter()
                    module(x).backward(grad)
                    spent.append(time.perf_counter() - start)
                    x.grad = None
                times[name].extend(spent)
        if device == "cuda":
            torch.cuda.synchronize()
    floor = statistics.median(times["frozen nn.Linear"])
    return {name: {"us": 1e6 * statistics.median(t), "ratio": statistics.median(t) / floor}
            for name, t in times.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    return "\n".join(["| projection step | host µs per forward + backward | × frozen layer |", "|---|---:|---:|"]
                     + [f"| {name} | {r['us']:.0f} | {r['ratio']:.2f} |" for name, r in results.items()])


if __name__ == "__main__":  # CPU: run under TRITON_INTERPRET=1 (the kernels' host path on CPU tensors)
    print(json.dumps(measure()))  # noqa: T201
