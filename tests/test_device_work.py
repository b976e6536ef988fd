"""Device work per adapted projection per training step: the count a GPU would launch (aten ops that
are kernels + Triton launches; views and allocations excluded), measured on CPU under the
interpreter. Targets (issue "Kernels v2"): a lone layer ≤ 5 launches; a model of N projections costs
a + b·N with b ≤ 4 and a ≤ 4. For scale: the frozen nn.Linear is 2, PEFT LoRA 17."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE, require
from torch import nn

from benchmarks.device_work import REGIMES, adapter_counts, four_bit_counts, peer_counts, regime_counts, step_work
from lora2_kernels import LoRA2Linear

IN, OUT, TOKENS = 48, 40, 24


def _layer(dtype=torch.bfloat16, bias=True, dropout=0.0, seed=0, out=OUT) -> LoRA2Linear:
    torch.manual_seed(seed)
    layer = LoRA2Linear(IN, out, bias=bias, r=6, k=4, dropout=dropout, backend="triton").to(KERNEL_DEVICE)
    layer.weight.data = layer.weight.data.to(dtype)
    if bias:
        layer.bias.data = layer.bias.data.to(dtype)
    with torch.no_grad():
        layer.singular_values.normal_()
    return layer.train()


def _x(dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(TOKENS, IN, device=KERNEL_DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, 4), (torch.float32, 3)], ids=["bf16", "fp32"])
def test_a_lone_layer_launches_its_kernels_and_nothing_else(dtype, expected):
    work = step_work(_layer(dtype), _x(dtype))
    assert work.total == expected <= 5, work.ops
    assert set(work.ops) <= {"triton:cast", "triton:forward", "triton:dx", "triton:finish"}, work.ops


@pytest.mark.parametrize("bias", [True, False])
def test_bias_adds_no_launch_and_a_lone_layers_dropout_one_seed_draw(bias):
    assert step_work(_layer(bias=bias), _x()).total == 4
    work = step_work(_layer(dropout=0.1, bias=bias), _x())
    assert work.total == 5 and work.ops["randint"] == 1, work.ops  # its seed, drawn on the device


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_a_model_costs_a_plus_b_per_projection(dropout):
    """With dropout, a model's layers share one seed draw per forward (DropoutSeeds, as LoRA2Model
    registers it): a = 1, and b stays 4."""
    from lora2_kernels.linear import DropoutSeeds

    def chain(n):
        model = nn.Sequential(*[_layer(seed=i, out=IN, dropout=dropout) for i in range(n)])
        DropoutSeeds(model, list(model))
        return model

    counts = {n: step_work(chain(n), _x()).total for n in (1, 2, 4)}
    b = (counts[4] - counts[2]) / 2
    a = counts[2] - 2 * b
    assert counts[1] == a + b  # linear in N
    assert b == 4 and a == (1 if dropout else 0), counts


def test_the_peers_count_as_the_issue_measured():
    """The yardsticks, by the same counter (benchmarks.device_work.peer_counts, which the throughput
    benchmark prints): the frozen layer 2 launches, PEFT LoRA r=8 well above LoRA²'s 4."""
    require("peft", "pip install -e '.[test]' (peft is in the test extra)")
    counts = peer_counts(KERNEL_DEVICE)
    assert counts["frozen nn.Linear"] == 2
    assert counts["LoRA² kernels, bf16"] == 4 and counts["LoRA² kernels, fp32"] == 3
    assert counts["PEFT LoRA r=8 (bf16 autocast)"] >= 10


def test_every_dtype_regime_is_within_two_launches_of_the_frozen_layer():
    """Issue "Kernels v3", item 3: bf16 base + fp32 adapter under autocast, all bf16, an fp32 module under
    bf16 autocast and FSDP2 with param_dtype=bf16, each ≤ the frozen layer's launches + 2 (an all-bf16
    layer took 15 before the kernels read bf16 factors and wrote bf16 gradients themselves), and below PEFT."""
    require("peft", "pip install -e '.[test]' (peft is in the test extra)")
    counts = regime_counts(KERNEL_DEVICE)
    assert set(counts) == {regime[0] for regime in REGIMES}
    for name, row in counts.items():
        assert row["floor"] < row["lora2"] <= row["floor"] + 2 < row["peft"], (name, row)


def test_over_a_4bit_base_the_kernels_launch_no_more_than_the_frozen_4bit_layer():
    """Issue "Kernels v3", item 4 (4-bit launches counted): the kernels dequantise W inside their K loops, so a
    QLoRA² step of one projection launches fewer than bitsandbytes' frozen Linear4bit alone (which dequantises
    W each way, 8); above FUSED_DEQUANT_MAX_TOKENS rows one dequantising launch each way brings it level. PEFT
    QLoRA launches several times more."""
    require("peft", "pip install -e '.[test]' (peft is in the test extra)")
    require("bitsandbytes", "pip install bitsandbytes==0.50.2")
    from lora2_kernels.triton_kernels.lora_linear import FUSED_DEQUANT_MAX_TOKENS

    counts = four_bit_counts(KERNEL_DEVICE, token_counts=(24, FUSED_DEQUANT_MAX_TOKENS + 16))
    in_loop, dequantised = counts[24], counts[FUSED_DEQUANT_MAX_TOKENS + 16]
    assert in_loop["lora2"] < in_loop["floor"] < in_loop["peft"], in_loop
    assert dequantised["lora2"] == in_loop["lora2"] + 2, dequantised  # one dequantise launch each way
    assert dequantised["lora2"] <= dequantised["floor"] < dequantised["peft"], dequantised


def test_several_adapters_take_the_launches_of_one():
    """A sweep's adapters over one base (issue 32): the device work of a projection's training step does not
    grow with the number of adapters (one launch set for all of them, the base GEMM shared)."""
    counts = adapter_counts(KERNEL_DEVICE)
    assert counts[1] == counts[2] == counts[4], counts
