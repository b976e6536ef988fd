"""lora2.sweep: N adapters trained together over one frozen base, each equal to its single run.

Issue 32, items 2 and 4, at the library level: three adapters (their own initialisation seed, learning rate
and data order) trained as one model of three-adapter layers, with gradient accumulation, the orthogonality
regulariser and the rank allocator (one importance call, a budget each), against three models trained alone:
the same adapter tensors (fp32, dropout-free), masks, importance averages and optimiser state, through the
kernels (interpreter) and through the reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from torch import nn

from lora2.allocator import RankAllocator
from lora2.config import LoRA2Config
from lora2.regularizer import OrthogonalRegularizer
from lora2.sweep import AdapterHeads, AdapterOptimizers, AdapterView, stack_adapters
from lora2_kernels import LoRA2Linear
from lora2_kernels.linear import AdapterRows

SEEDS = (3, 5, 7)
RATES = (1e-2, 3e-2, 1e-3)
STEPS, ACCUM, BATCH = 4, 2, 5
# the allocator's whole schedule in four steps: warm-up, a masking at steps 2 and 3 (the last: enforced)
ALLOCATOR = LoRA2Config(r=4, k=3, target_rank=2, init_warmup=1, final_warmup=1, mask_interval=1)
ORTH = 0.1


def base_model() -> nn.Sequential:
    """Two frozen linear layers to adapt and a head (index 3) that trains with the adapter, as a classifier's."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.Linear(8, 8)).requires_grad_(False)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g)
    return x, torch.tanh(x[:, :8] * 2)


def adapted(base: nn.Sequential, seed: int, backend: str) -> nn.Sequential:
    """The base's linear layers with one LoRA² adapter each and a fresh head, initialised from ``seed`` (λ
    nonzero, so every factor has a gradient from the first step)."""
    model = copy.copy(base)
    model._modules = dict(base._modules)
    torch.manual_seed(seed)
    for index in (0, 2):
        layer = LoRA2Linear.from_linear(base[index], r=4, k=3, backend=backend)
        with torch.no_grad():
            layer.singular_values.normal_()
        model[index] = layer
    model[3] = nn.Linear(8, 8)
    return model.to(KERNEL_DEVICE)


def batch_indices(seed: int, step: int, micro: int) -> torch.Tensor:
    """Adapter ``seed``'s data order: its own permutation each step."""
    order = torch.randperm(40, generator=torch.Generator().manual_seed(seed * 100 + step))
    return order[micro * BATCH:(micro + 1) * BATCH]


def train_alone(base, seed, rate, backend):
    model = adapted(base, seed, backend)
    layers = {"0": model[0], "2": model[2]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate)
    allocator = RankAllocator(layers, ALLOCATOR, STEPS)
    regularizer = OrthogonalRegularizer(list(layers.values()))
    x, y = data()
    for step in range(STEPS):
        for micro in range(ACCUM):
            rows = batch_indices(seed, step, micro)
            loss = F.mse_loss(model(x[rows].to(KERNEL_DEVICE)), y[rows].to(KERNEL_DEVICE)) + ORTH * regularizer()
            (loss / ACCUM).backward()
        optimizer.step()
        allocator.step(step + 1)
        optimizer.zero_grad()
    return model, optimizer, allocator


# the kernels' run is in the slow tier (8 s of the interpreter); tests/test_adapters.py checks them per adapter
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.slow), "reference"])
def test_each_adapter_of_a_sweep_equals_its_single_run(backend):
    base = base_model()
    singles = [train_alone(base, seed, rate, backend) for seed, rate in zip(SEEDS, RATES)]

    starts = [adapted(base, seed, backend) for seed in SEEDS]  # the single runs' initialisations
    sweep = copy.copy(base)
    sweep._modules = dict(base._modules)
    for index in (0, 2):
        sweep[index] = stack_adapters([start[index] for start in starts])
    layers = [sweep[0], sweep[2]]
    rows = AdapterRows(layers)
    sweep[3] = AdapterHeads([start[3] for start in starts], rows)
    sweep = sweep.to(KERNEL_DEVICE)
    optimizers = AdapterOptimizers(layers, lambda i, params: torch.optim.AdamW(params, lr=RATES[i]),
                                   extra=[list(head.parameters()) for head in sweep[3].heads])
    # one allocator for all: every adapter's modules, adapter by adapter, a budget each
    views = {f"{i}.{j}": view for i in range(len(SEEDS)) for j, view in enumerate(optimizers.views(i))}
    allocator = RankAllocator(views, ALLOCATOR, STEPS, groups=len(SEEDS))
    regularizers = [OrthogonalRegularizer([AdapterView(layer, i) for layer in layers]) for i in range(len(SEEDS))]
    x, y = data()
    for step in range(STEPS):
        for micro in range(ACCUM):
            picks = [batch_indices(seed, step, micro) for seed in SEEDS]
            rows.set([len(p) for p in picks])
            out = sweep(torch.cat([x[p] for p in picks]).to(KERNEL_DEVICE))
            # each adapter's loss over its own rows, as its single run computes it; their sum trains all
            loss = sum(F.mse_loss(part, y[p].to(KERNEL_DEVICE)) + ORTH * regularizer()
                       for part, p, regularizer in zip(out.split(BATCH), picks, regularizers))
            (loss / ACCUM).backward()
        optimizers.step()
        allocator.step(step + 1)
        optimizers.zero_grad()

    count = len(views) // len(SEEDS)
    for i, (alone, optimizer, allocator_alone) in enumerate(singles):
        for index in (0, 2):
            for name in ("q_down", "q_up", "singular_values", "p_down", "p_up"):
                got, want = getattr(sweep[index], name)[i], getattr(alone[index], name)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, i=i, n=name: f"adapter {i} {n}: {m}")
        torch.testing.assert_close(sweep[3].heads[i].weight, alone[3].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sweep[0].rank_mask[i], alone[0].rank_mask)
        torch.testing.assert_close(sweep[2].rank_mask[i], alone[2].rank_mask)
        assert alone[0].rank_mask.sum() + alone[2].rank_mask.sum() == ALLOCATOR.target_rank * 2  # pruned to budget
        for key, value in allocator_alone.state.items():
            torch.testing.assert_close(allocator.state[key][i * count:(i + 1) * count], value, rtol=1e-4, atol=1e-9)
        mine, theirs = optimizers.optimizers[i].state_dict(), optimizer.state_dict()
        assert mine["param_groups"] == theirs["param_groups"]
        for key, state in theirs["state"].items():
            torch.testing.assert_close(mine["state"][key]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_a_diverged_adapter_is_found_and_stays_as_it_is_while_the_others_train():
    base = base_model()
    sweep = copy.copy(base)
    sweep._modules = dict(base._modules)
    sweep[0] = stack_adapters([adapted(base, seed, "reference")[0] for seed in SEEDS])
    sweep[2] = stack_adapters([adapted(base, seed, "reference")[2] for seed in SEEDS])
    sweep[3] = nn.Identity()
    layers = [sweep[0], sweep[2]]
    AdapterRows(layers).set([4, 4, 4])
    optimizers = AdapterOptimizers(layers, lambda i, params: torch.optim.AdamW(params, lr=1e-2))
    before = [layer.q_down[1].clone() for layer in layers]
    sweep(torch.randn(12, 16)).square().sum().backward()
    assert optimizers.finite().tolist() == [True, True, True]
    layers[1].p_up.grad[1, 0, 0] = float("nan")  # adapter 1 diverged: it stops, the others go on
    finite = optimizers.finite()
    assert finite.tolist() == [True, False, True]
    optimizers.step(adapters=[i for i, ok in enumerate(finite.tolist()) if ok])
    for layer, kept in zip(layers, before):
        assert torch.equal(layer.q_down[1], kept)
        assert not torch.equal(layer.q_down[0], layer.q_down[1])


def test_stacking_refuses_layers_of_different_shapes_or_bases():
    base = base_model()
    a = LoRA2Linear.from_linear(base[0], r=4, k=3)
    with pytest.raises(ValueError, match=r"differ in \['r'\]"):
        stack_adapters([a, LoRA2Linear.from_linear(base[0], r=5, k=3)])
    with pytest.raises(ValueError, match=r"differ in \['weight'\]"):
        stack_adapters([a, LoRA2Linear.from_linear(nn.Linear(16, 32), r=4, k=3)])
    with pytest.raises(ValueError, match="above 1"):
        AdapterOptimizers([a], lambda i, params: torch.optim.SGD(params, lr=1.0))


def test_adapter_heads_refuse_a_batch_split_another_way():
    rows = AdapterRows([])
    heads = AdapterHeads([nn.Linear(8, 2), nn.Linear(8, 2)], rows)
    rows.set([3, 1])
    assert heads(torch.randn(4, 8)).shape == (4, 2)
    with pytest.raises(ValueError, match=r"adapters' rows are \[3, 1\]"):
        heads(torch.randn(5, 8))
