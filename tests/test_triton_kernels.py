"""The fused Triton kernels against the reference, on CUDA tensors when a GPU is here and otherwise on
CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1); and the same kernels
compiled for sm_90 / sm_80 by the real compiler (which the interpreter skips), in a process of its own.

Tolerances: fp32 inputs 1e-4 relative (IEEE dots, as torch's default fp32 matmul precision);
bf16 / fp16 inputs 2e-2 relative (the kernels round x and A₁ to the input dtype for the tensor
cores, as PEFT's LoRA does under autocast; the reference keeps them in fp32).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import KERNEL_DEVICE
from lora2_kernels.triton_kernels import lora_linear as kernels
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora2_kernels import LoRA2Linear, ops, reference

PARAMS = ("q_down", "q_up", "singular_values", "p_down", "p_up")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _pair(in_f=70, out_f=45, r=6, k=5, conv=False, bias=True, dtype=torch.float32, mask=None, seed=0):
    """(triton layer, float64 reference layer) with the same random adapter."""
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f, bias=bias)
    if conv and not bias:
        base.bias = None
    layer = LoRA2Linear.from_linear(base, r=r, k=k, alpha=8.0, backend="triton")
    with torch.no_grad():
        for name in PARAMS:
            getattr(layer, name).normal_()
        if mask is not None:
            layer.set_rank_mask(torch.tensor(mask, dtype=torch.float32))
    ref = copy.deepcopy(layer).double()
    ref.backend = "reference"
    return layer.to(device=KERNEL_DEVICE).to(dtype=dtype) if dtype != torch.float32 else layer.to(KERNEL_DEVICE), ref


def _run(layer, x, grad_y):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    y.backward(grad_y.to(y.dtype))
    return [y.detach(), x.grad] + [getattr(layer, n).grad for n in PARAMS]


CASES = {
    "odd sizes": {},
    "r != k, masked": {"r": 7, "k": 3, "mask": [1, 0, 1, 1, 0, 1, 0]},
    "fully pruned": {"r": 4, "k": 4, "mask": [0, 0, 0, 0]},
    "no bias": {"bias": False},
    "conv1d": {"conv": True},
    "conv1d no bias": {"conv": True, "bias": False},
    "k = 1": {"r": 2, "k": 1},
    "k = 17 (two rank tiles)": {"r": 5, "k": 17},
}


@pytest.mark.parametrize("lead", [(37,), (3, 13)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_gradient_match_the_reference_fp32(case, lead):
    layer, ref = _pair(**CASES[case])
    x = torch.randn(*lead, 70)
    grad_y = torch.randn(*lead, 45)
    got = _run(layer, x.to(KERNEL_DEVICE), grad_y.to(KERNEL_DEVICE))
    expected = _run(ref, x.double(), grad_y.double())
    names = ["y", "dx", *PARAMS]
    for name, a, b in zip(names, got, expected):
        if b.abs().max() == 0:  # e.g. dλ of a fully pruned module
            assert a.abs().max() == 0, name
            continue
        assert _rel(a, b) < TOLERANCE[torch.float32], (case, name, _rel(a, b))
    if "mask" in CASES[case]:
        masked = torch.tensor(CASES[case]["mask"]) == 0
        assert torch.all(got[4].cpu()[masked] == 0)  # no gradient reaches a masked λ


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv", [False, True])
def test_half_precision_within_the_documented_tolerance(dtype, conv):
    layer, ref = _pair(conv=conv, dtype=dtype, mask=[1, 1, 0, 1, 1, 1])
    x = torch.randn(2, 19, 70)
    grad_y = torch.randn(2, 19, 45)
    got = _run(layer, x.to(KERNEL_DEVICE, dtype), grad_y.to(KERNEL_DEVICE))
    expected = _run(ref, x.to(dtype).double(), grad_y.to(dtype).double())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == layer.q_down.dtype
    for name, a, b in zip(["y", "dx", *PARAMS], got, expected):
        assert _rel(a, b) < TOLERANCE[dtype], (name, _rel(a, b))


def test_autocast_bf16_on_an_fp32_model():
    layer, ref = _pair()
    x = torch.randn(37, 70, device=KERNEL_DEVICE)
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y, ref(x.cpu().bfloat16().double())) < TOLERANCE[torch.bfloat16]


def test_host_functions_match_the_reference_including_the_rank_only_backward():
    """Without an input gradient, the dX GEMM runs in its rank-k-only mode (g = dY·up only)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 70), torch.randn(45, 70), torch.randn(45)
    down, up = torch.randn(5, 70), torch.randn(45, 5)
    dev = [t.to(KERNEL_DEVICE) for t in (x, w, b, down, up)]
    y, h = kernels.lora_linear_forward(*dev)
    y_ref, h_ref = reference.lora_linear_forward(x.double(), w.double(), b.double(), down.double(), up.double())
    assert _rel(y, y_ref) < 1e-4 and _rel(h, h_ref) < 1e-4 and h.dtype == torch.float32
    grad_y = torch.randn(37, 45)
    got = kernels.lora_linear_backward(grad_y.to(KERNEL_DEVICE), dev[0], dev[1], dev[3], dev[4], h,
                                       needs_input_grad=False, needs_weight_grad=True, needs_bias_grad=True)
    expected = reference.lora_linear_backward(grad_y.double(), x.double(), w.double(), down.double(), up.double(),
                                              h_ref, needs_weight_grad=True, needs_bias_grad=True)
    assert got[0] is None
    for a, e in zip(got[1:], expected[1:]):
        assert _rel(a, e) < 1e-4


def test_empty_input():
    layer, _ = _pair()
    x = torch.randn(0, 70, device=KERNEL_DEVICE, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 45) and x.grad.shape == (0, 70) and torch.count_nonzero(layer.q_down.grad) == 0


def test_deterministic_bit_for_bit():
    """No atomics anywhere: the same inputs give the same bits, forward and backward."""
    layer, _ = _pair(r=4, k=4)
    x, grad_y = torch.randn(150, 70, device=KERNEL_DEVICE), torch.randn(150, 45, device=KERNEL_DEVICE)
    first, second = _run(layer, x, grad_y), _run(layer, x, grad_y)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="on a GPU the autotuner picks among the configs")
@pytest.mark.parametrize("index", range(len(kernels.MATMUL_CONFIGS)))
def test_every_autotune_config_computes_the_same(monkeypatch, index):
    """Each config the autotuner may pick, run under the interpreter: tile shapes change the masks."""
    monkeypatch.setattr(kernels, "INTERPRETER_MATMUL_CONFIG", dict(kernels.MATMUL_CONFIGS[index].kwargs))
    reduce_config = kernels.REDUCE_CONFIGS[index % len(kernels.REDUCE_CONFIGS)].kwargs
    monkeypatch.setattr(kernels, "INTERPRETER_REDUCE_CONFIG", dict(reduce_config))
    layer, ref = _pair(in_f=150, out_f=140, r=4, k=3)
    x, grad_y = torch.randn(140, 150), torch.randn(140, 140)
    for name, a, b in zip(["y", "dx", *PARAMS], _run(layer, x, grad_y), _run(ref, x.double(), grad_y.double())):
        assert _rel(a, b) < 1e-4, name


def test_reduction_splits_over_tokens_and_sums_exactly():
    """rank_reduce splits the token dimension across programs; the partial sums must add up."""
    torch.manual_seed(0)
    a, b = torch.randn(700, 5, device=KERNEL_DEVICE), torch.randn(700, 33, device=KERNEL_DEVICE)
    launch, partial = kernels.reduce_launch(a, b, programs=64)
    assert partial.shape[0] > 1  # really split
    torch.testing.assert_close(kernels.rank_reduce(a, b).cpu(), (a.t().double() @ b.double()).float().cpu(),
                               rtol=1e-5, atol=1e-4)


# --- torch integration ------------------------------------------------------------------------------------


def _op_args(backend: str):
    torch.manual_seed(0)
    return (torch.randn(5, 32, device=KERNEL_DEVICE, requires_grad=True), torch.randn(24, 32, device=KERNEL_DEVICE),
            torch.randn(24, device=KERNEL_DEVICE), torch.randn(4, 32, device=KERNEL_DEVICE, requires_grad=True),
            torch.randn(24, 4, device=KERNEL_DEVICE, requires_grad=True), False, backend)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_custom_op_passes_opcheck(backend):
    torch.library.opcheck(torch.ops.lora2.lora_linear.default, _op_args(backend))


def test_custom_op_and_autograd_function_agree():
    """Eager runs LoRALinearFunction, torch.compile runs the custom op: the same numbers."""
    x, w, b, down, up, fan, backend = _op_args("triton")
    y1 = ops.LoRALinearFunction.apply(x, w, b, down, up, fan, backend)
    g1 = torch.autograd.grad(y1.square().sum(), (x, down, up))
    y2 = torch.ops.lora2.lora_linear(x, w, b, down, up, fan, backend)[0]
    g2 = torch.autograd.grad(y2.square().sum(), (x, down, up))
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_torch_compile_fullgraph_through_the_kernels():
    layer, ref = _pair(r=4, k=4)
    backend = "inductor" if KERNEL_DEVICE == "cuda" else "aot_eager"  # inductor has no CPU Triton
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(2, 9, 70, device=KERNEL_DEVICE)
    got = _run(compiled, x, torch.ones(2, 9, 45, device=KERNEL_DEVICE))
    expected = _run(ref, x.cpu().double(), torch.ones(2, 9, 45, dtype=torch.float64))
    for name, a, b in zip(["y", "dx", *PARAMS], got, expected):
        assert _rel(a, b) < 1e-4, name


def test_a_model_trains_the_same_through_the_kernels():
    """get_lora2_model with backend="triton" vs "reference": the same loss and gradients after 2 steps."""
    from conftest import batch, make_model

    from lora2 import LoRA2Config, get_lora2_model

    results = {}
    for backend in ("triton", "reference"):
        model = get_lora2_model(make_model("llama"), LoRA2Config(r=4, k=4, target_rank=2, backend=backend))
        model.to(KERNEL_DEVICE).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        losses = []
        for seed in range(2):
            inputs = {k: v.to(KERNEL_DEVICE) for k, v in batch(seed).items()}
            loss = model(**inputs, labels=torch.tensor([0, 1, 1], device=KERNEL_DEVICE)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        results[backend] = (losses, [p.detach().cpu() for p in model.parameters() if p.requires_grad])
    assert results["triton"][0] == pytest.approx(results["reference"][0], rel=1e-4)
    for a, b in zip(results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# --- compiled for the GPU -----------------------------------------------------------------------------------


def test_every_kernel_and_config_compiles_for_hopper_and_ampere():
    """triton.compile(..., target=GPUTarget("cuda", 90 / 80, 32)) on the launches the host code makes:
    the compiler's checks the interpreter skips (tl.dot K >= 16, shared memory, layouts)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "lora2_kernels.triton_kernels.compile_all", "--json"],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.stdout, run.stderr[-4000:]
    report = json.loads(run.stdout)
    results = report["results"]
    failures = [f"sm_{r['arch']} {r['case']} [{r['config']}]: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    assert run.returncode == 0
    for arch in (90, 80):
        for kernel, configs in kernels.CONFIGS.items():
            cases = {r["case"] for r in results if r["kernel"] == kernel and r["arch"] == arch}
            assert cases, (arch, kernel)
            for case in cases:
                compiled = [r for r in results if r["case"] == case and r["arch"] == arch and not r["pruned"]]
                assert compiled, f"no config of {case} fits sm_{arch}"
                if arch == 90 and "float32" not in case:  # half inputs: every config fits a Hopper
                    assert len(compiled) == len(configs), case


def test_autotuning_is_keyed_by_token_buckets_not_token_counts():
    """Dynamic padding gives nearly every batch another token count: the tuning key is its bucket."""
    assert [kernels.token_bucket(t) for t in (0, 1, 16, 17, 1000, 1024, 1025, 8192)] == \
        [16, 16, 16, 32, 1024, 1024, 2048, 8192]
    assert "M_BUCKET" in kernels.lora_matmul_kernel.arg_names and "T_BUCKET" in kernels.rank_reduce_kernel.arg_names
