"""Device work of a training step, counted on any machine: the kernels a GPU would launch.

Every aten op that runs at least one kernel on a GPU counts once (views and allocations do not; the
dropout seeds' draw on the device does), and so does every launch of lora2's Triton kernels.
On a CPU the Triton kernels run under the interpreter, whose own tensor copies are not counted.

    with DeviceWork() as work:
        y = layer(x); y.backward(grad)
    work.total, work.ops   # e.g. 4, Counter({'triton:forward': 1, 'triton:dx': 1, ...})

Used by tests/test_device_work.py (the targets) and by ``python -m benchmarks.throughput``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# Ops that launch nothing: allocations (torch.empty and friends only reserve memory) and metadata.
NOT_KERNELS = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
               aten.new_empty_strided.default, aten.empty_like.default, aten.lift_fresh.default,
               aten._local_scalar_dense.default}


def _launches_kernels(func) -> bool:
    if func in NOT_KERNELS or func.is_view:
        return False
    return func.overloadpacket not in (aten.detach, aten.alias, aten._unsafe_view, aten.view, aten.t, aten.transpose,
                                       aten.expand, aten.permute, aten.as_strided, aten.unsqueeze, aten.squeeze)


class DeviceWork(TorchDispatchMode):
    """Counts device kernels: aten ops (as dispatched under autograd) and Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self._in_triton = 0
        self._patched = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an op that returns no tensor (aten.promote_types, say) computes on the host
        returns_tensor = any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0])
        if not self._in_triton and returns_tensor and _launches_kernels(func):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __enter__(self):
        from lora2_kernels.triton_kernels import lora_linear as kernels

        original = kernels.Launch.run
        work = self

        def counted(launch):
            work.ops[f"triton:{launch.kernel}"] += 1
            work._in_triton += 1
            try:
                return original(launch)
            finally:
                work._in_triton -= 1

        self._patched = (kernels.Launch, original)
        kernels.Launch.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        cls, original = self._patched
        cls.run = original
        return super().__exit__(*exc)


class _Model(torch.nn.Module):
    """A model whose one projection is ``proj`` (what PEFT's target_modules name)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def step_work(module: torch.nn.Module, x: torch.Tensor) -> DeviceWork:
    """The device work of one forward + backward of ``module`` on ``x`` (which requires grad, as the
    input of a layer inside a model does); the upstream gradient is made outside the count."""
    x = x.detach().requires_grad_()
    with torch.no_grad():
        grad = torch.ones_like(module(x))
    for p in module.parameters():
        p.grad = None
    with DeviceWork() as work:
        y = module(x)
        torch.autograd.backward(y, grad)
    return work


def peer_counts(device: str = "cpu", in_f: int = 48, out_f: int = 40, tokens: int = 24) -> dict[str, int]:
    """Launches per training step of one projection: the frozen layer, PEFT LoRA r=8 under bf16
    autocast, LoRA² through the kernels (bf16 and fp32, with and without adapter dropout), and the
    slope and intercept of a model of N LoRA² projections (work = a + b·N)."""
    import peft
    from torch import nn

    from lora2_kernels import LoRA2Linear

    def lora2(n_in, n_out, dtype, dropout=0.0, seed=0):
        torch.manual_seed(seed)
        layer = LoRA2Linear(n_in, n_out, r=8, k=8, dropout=dropout, backend="triton").to(device)
        layer.weight.data, layer.bias.data = layer.weight.data.to(dtype), layer.bias.data.to(dtype)
        return layer.train()

    x = torch.randn(tokens, in_f, device=device)
    counts = {"frozen nn.Linear": step_work(nn.Linear(in_f, out_f).to(device, torch.bfloat16).requires_grad_(False),
                                            x.bfloat16()).total}
    model = peft.get_peft_model(_Model(nn.Linear(in_f, out_f)), peft.LoraConfig(r=8, target_modules=["proj"]))
    model = model.to(device).train()
    with torch.autocast(device, dtype=torch.bfloat16):
        counts["PEFT LoRA r=8 (bf16 autocast)"] = step_work(model, x).total
    counts["LoRA² kernels, bf16"] = step_work(lora2(in_f, out_f, torch.bfloat16), x.bfloat16()).total
    counts["LoRA² kernels, fp32"] = step_work(lora2(in_f, out_f, torch.float32), x).total
    counts["LoRA² kernels, bf16, dropout 0.1 (a lone layer: + its seed draw)"] = step_work(
        lora2(in_f, out_f, torch.bfloat16, 0.1), x.bfloat16()).total
    for dropout in (0.0, 0.1):
        def chain(n):  # as LoRA2Model adapts a model: its layers share one seed draw per forward
            from lora2_kernels.linear import DropoutSeeds

            model = nn.Sequential(*[lora2(in_f, in_f, torch.bfloat16, dropout, seed=i) for i in range(n)])
            DropoutSeeds(model, list(model))
            return model

        work = {n: step_work(chain(n), x.bfloat16()).total for n in (2, 4)}
        slope = (work[4] - work[2]) // 2
        label = f"LoRA² model of N projections{', dropout 0.1' if dropout else ''}"
        counts[f"{label}: b (per projection)"] = slope
        counts[f"{label}: a (per step)"] = work[2] - 2 * slope
    return counts


# The dtype regimes a model meets (issue "Kernels v3", item 3): (name, base dtype, adapter dtype, input dtype,
# autocast dtype or None, FSDP2 with param_dtype=bf16). Autocast regimes take fp32 inputs, as a projection
# after a LayerNorm does (the cast of x is then every method's work).
REGIMES = (
    ("bf16 base + fp32 adapter, bf16 autocast", torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, False),
    ("all bf16 (model.to(bfloat16))", torch.bfloat16, torch.bfloat16, torch.bfloat16, None, False),
    ("fp32 module under bf16 autocast", torch.float32, torch.float32, torch.float32, torch.bfloat16, False),
    ("FSDP2, MixedPrecisionPolicy(param_dtype=bf16)", torch.float32, torch.float32, torch.float32, None, True),
)


def _steady_work(module: torch.nn.Module, x: torch.Tensor, autocast: torch.dtype | None) -> DeviceWork:
    """The device work of one forward + backward after a first one (FSDP2 initialises lazily). Each forward
    is its own autocast region, as in a model whose projection input is not a leaf: autocast's cast cache
    (which keeps casts of leaf tensors within one region) would otherwise hide the cast of x."""
    x = x.detach().requires_grad_()
    device_type = x.device.type
    for counted in (False, True):
        for p in (x, *module.parameters()):
            p.grad = None
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            with torch.no_grad():
                grad = torch.ones_like(module(x))
        with DeviceWork() as work:
            with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                y = module(x)
            torch.autograd.backward(y, grad)
        if counted:
            return work
    raise AssertionError("unreachable")


def regime_counts(device: str = "cpu", in_f: int = 48, out_f: int = 40, tokens: int = 24) -> dict[str, dict[str, int]]:
    """Per dtype regime (REGIMES): launches per training step of one projection for the frozen layer (the
    floor), PEFT LoRA r=8 and LoRA² through the kernels. Under FSDP2 (a one-process group here) every
    method's trainable parameters stay whole (``ignored_params``), as ``lora2 train --fsdp`` keeps the
    adapter; the base is sharded and gathered in bf16."""
    import peft
    import torch.distributed as dist
    from torch import nn

    from lora2_kernels import LoRA2Linear

    def build(method: str, base: torch.dtype, adapter: torch.dtype) -> nn.Module:
        torch.manual_seed(0)
        if method == "lora2":
            model = _Model(LoRA2Linear(in_f, out_f, r=8, k=8, backend="triton"))
        else:
            model = _Model(nn.Linear(in_f, out_f))
            if method == "peft":
                model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["proj"]))
            else:
                model.requires_grad_(False)
        model = model.to(device).train()
        for p in model.parameters():
            p.data = p.data.to(adapter if p.requires_grad else base)
        return model

    created = False
    if any(regime[5] for regime in REGIMES) and not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created = True
    counts: dict[str, dict[str, int]] = {}
    try:
        for name, base, adapter, x_dtype, autocast, fsdp in REGIMES:
            row = {}
            for method in ("floor", "peft", "lora2"):
                model = build(method, base, adapter)
                if fsdp:
                    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16),
                                ignored_params={p for p in model.parameters() if p.requires_grad})
                x = torch.randn(tokens, in_f, device=device, dtype=x_dtype)
                row[method] = _steady_work(model, x, autocast).total
            counts[name] = row
    finally:
        if created:
            dist.destroy_process_group()
    return counts


def four_bit_counts(device: str = "cpu", in_f: int = 64, out_f: int = 48, token_counts: tuple[int, ...] = (24, 400)
                    ) -> dict[int, dict[str, int]]:
    """Over a bitsandbytes NF4 base (issue "Kernels v3", item 4: 4-bit launches counted), per token count:
    launches per training step of one projection for the frozen Linear4bit (the floor), PEFT QLoRA r=8 and
    LoRA² through the kernels; fp32 inputs and adapter under bf16 autocast. Up to FUSED_DEQUANT_MAX_TOKENS
    rows the kernels dequantise W in their K loops; above, one launch more each way dequantises it."""
    import peft
    from torch import nn

    from lora2_kernels import LoRA2Linear, four_bit

    counts: dict[int, dict[str, int]] = {}
    for tokens in token_counts:
        row = {}
        for method in ("floor", "peft", "lora2"):
            torch.manual_seed(0)
            base = four_bit.quantize_linear(nn.Linear(in_f, out_f), "nf4", compute_dtype=torch.bfloat16, device=device)
            if method == "lora2":
                model = _Model(LoRA2Linear.from_linear(base, r=8, k=8, backend="triton"))
            else:
                model = _Model(base)
                if method == "peft":
                    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["proj"]))
            model = model.to(device).train()
            row[method] = _steady_work(model, torch.randn(tokens, in_f, device=device), torch.bfloat16).total
        counts[tokens] = row
    return counts


def adapter_counts(device: str = "cpu", in_f: int = 48, out_f: int = 40, tokens: int = 24,
                   adapters: tuple[int, ...] = (1, 2, 4)) -> dict[int, int]:
    """Several adapters over one base (a sweep in one run), per adapter count: the device work of one training
    step of one projection, every adapter's ``tokens`` rows in it; bf16 base, fp32 adapters under autocast. The
    row split is set once per batch for the whole model (``AdapterRows``), outside the count."""
    from lora2_kernels import LoRA2Linear

    counts = {}
    for n in adapters:
        torch.manual_seed(0)
        layer = LoRA2Linear(in_f, out_f, r=8, k=8, backend="triton", adapters=n)
        layer.weight.data = layer.weight.data.bfloat16()
        layer.bias.data = layer.bias.data.bfloat16()
        if n > 1:
            layer.set_adapter_rows([tokens] * n)
        model = _Model(layer).to(device).train()
        counts[n] = _steady_work(model, torch.randn(n * tokens, in_f, device=device), torch.bfloat16).total
    return counts


if __name__ == "__main__":  # python -m benchmarks.device_work (CPU: under TRITON_INTERPRET=1)
    import json
    import os

    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    print(json.dumps({"peers": peer_counts(device), "regimes": regime_counts(device),
                      "4-bit": four_bit_counts(device), "adapters": adapter_counts(device)}))
