"""The fused Triton kernels against an oracle that shares no code with them: the dense float64
formula of a LoRA² layer written out below, from the raw parameters, with float64 autograd for
every gradient. Runs on CUDA tensors when a GPU is here and otherwise on CPU tensors under the
Triton interpreter (conftest sets TRITON_INTERPRET=1); the same kernels compiled for sm_90 / sm_80
by the real compiler (which the interpreter skips) run in a process of their own at the end.

Inputs where every term shows: the base GEMM x·Wᵀ, the bias and the adapter x·ΔWᵀ are scaled to
the same size, so dropping any one of them moves the output (and dX) by a third of its norm; each
term is also tested alone. Tolerances follow flash-attention's rule: the kernel's error against
float64 may be at most twice the error of PyTorch's own unfused computation in the same dtype (the
PEFT-style y = F.linear(x, W, b) + F.linear(F.linear(x, A₁), B₂·C), autograd included), plus a
floor of a few units in the last place where PyTorch happens to be exact.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from lora2_kernels.triton_kernels import lora_linear as kernels
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora2_kernels import LoRA2Linear, ops

PARAMS = ("q_down", "q_up", "singular_values", "p_down", "p_up")
NAMES = ("y", "dx", *PARAMS)
ALPHA = 8.0
TERMS = ("base", "bias", "adapter")


# --- the oracle: the paper's formula in float64, nothing shared with lora2_kernels ----------------------


def oracle(raw: dict, x: torch.Tensor, grad_y: torch.Tensor) -> list[torch.Tensor]:
    """[y, dx, dA₁, dB₁, dλ, dA₂, dB₂] of y = x·(W + ΔW)ᵀ + b, ΔW = (α/r)·B₂·A₂·diag(λ⊙m)·B₁·A₁, in float64."""
    leaves = [raw[n].detach().double().clone().requires_grad_() for n in PARAMS]
    q_down, q_up, singular_values, p_down, p_up = leaves
    r = singular_values.shape[0]
    delta = (ALPHA / r) * p_up @ p_down @ torch.diag(singular_values * raw["mask"].double()) @ q_up @ q_down
    x = x.detach().double().requires_grad_()
    y = x @ (raw["weight"].double() + delta).T + raw["bias"].double()
    grads = torch.autograd.grad(y, [x, *leaves], grad_y.double())
    return [y.detach(), *grads]


def torch_peer(raw: dict, x: torch.Tensor, grad_y: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The same quantities as PyTorch computes them unfused in ``dtype`` (PEFT's LoRA under autocast):
    the base and the two rank-k GEMMs in ``dtype``, the fp32 adapter factors cast to it."""
    leaves = [raw[n].detach().float().clone().requires_grad_() for n in PARAMS]
    q_down, q_up, singular_values, p_down, p_up = leaves
    r = singular_values.shape[0]
    up = p_up @ ((ALPHA / r) * p_down @ torch.diag(singular_values * raw["mask"].float()) @ q_up)
    x = x.detach().to(dtype).requires_grad_()
    y = F.linear(x, raw["weight"].to(dtype), raw["bias"].to(dtype))
    y = y + F.linear(F.linear(x, q_down.to(dtype)), up.to(dtype))
    grads = torch.autograd.grad(y, [x, *leaves], grad_y.to(dtype))
    return [y.detach(), *grads]


def make_layer(in_f=70, out_f=45, r=6, k=5, conv=False, bias=True, dtype=torch.float32, mask=None, seed=0,
               terms=TERMS):
    """A LoRA2Linear(backend="triton") on KERNEL_DEVICE and its raw parameters (float64, W as out × in).

    The terms in ``terms`` each give the output the same norm for x ~ N(0, 1): ‖b‖ = ‖W‖_F = ‖ΔW‖_F.
    The others are zero. The rank mask is written into the buffer while the masked λ stay nonzero,
    so the layer must apply the mask itself. W and b are rounded to ``dtype``; the adapter is fp32.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mask = torch.ones(r, dtype=torch.float64) if mask is None else torch.tensor(mask, dtype=torch.float64)
    raw = {"weight": randn(out_f, in_f) / math.sqrt(in_f), "q_down": randn(k, in_f) / math.sqrt(in_f),
           "q_up": randn(r, k) / math.sqrt(k), "singular_values": randn(r) + 2.0 * torch.sign(randn(r)),
           "p_down": randn(k, r) / math.sqrt(r), "p_up": randn(out_f, k) / math.sqrt(k), "mask": mask}
    norm = raw["weight"].norm()
    raw["bias"] = randn(out_f) * (norm / math.sqrt(out_f))  # ‖b‖ ≈ ‖W‖_F
    delta = (ALPHA / r) * raw["p_up"] @ raw["p_down"] @ torch.diag(raw["singular_values"] * mask) @ raw["q_up"] \
        @ raw["q_down"]
    if delta.norm() > 0:
        raw["singular_values"] *= norm / delta.norm()  # ‖ΔW‖_F = ‖W‖_F
    if "base" not in terms:
        raw["weight"].zero_()
    if "bias" not in terms or not bias:
        raw["bias"].zero_()
    if "adapter" not in terms:
        raw["singular_values"].zero_()

    base = Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f, bias=bias)
    if not bias:
        base.bias = None
    with torch.no_grad():
        base.weight.copy_(raw["weight"].T if conv else raw["weight"])
        if bias:
            base.bias.copy_(raw["bias"])
    layer = LoRA2Linear.from_linear(base, r=r, k=k, alpha=ALPHA, backend="triton")
    with torch.no_grad():
        for name in PARAMS:
            getattr(layer, name).copy_(raw[name])
            raw[name] = getattr(layer, name).detach().double().clone()  # what the layer holds (fp32)
        layer.rank_mask.copy_(mask)
    layer.weight.data = layer.weight.data.to(dtype)
    if bias:
        layer.bias.data = layer.bias.data.to(dtype)
    w = layer.weight.detach().double()
    raw["weight"] = w.T.clone() if conv else w.clone()  # what the layer holds (rounded to dtype)
    raw["bias"] = layer.bias.detach().double().clone() if bias else torch.zeros(out_f, dtype=torch.float64)
    return layer.to(KERNEL_DEVICE), raw


def run_layer(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, autocast: torch.dtype | None = None
              ) -> list[torch.Tensor]:
    """[y, dx, dA₁, dB₁, dλ, dA₂, dB₂] through the layer (or a compiled module of it); the forward
    under ``autocast`` if given, the backward outside it (as a training loop does)."""
    x = x.detach().clone().to(KERNEL_DEVICE).requires_grad_()
    for name in PARAMS:
        getattr(layer, name).grad = None
    with torch.autocast(KERNEL_DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = layer(x)
    y.backward(grad_y.to(KERNEL_DEVICE, y.dtype))
    return [y.detach(), x.grad] + [getattr(layer, n).grad for n in PARAMS]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max()) if b.numel() else 0.0


def tolerances(raw, x, grad_y, dtype, expected) -> list[float]:
    """Per quantity: 2 × PyTorch's own error in ``dtype`` against float64, plus a floor.

    y and dX (the large tensors, where a dropped term shows): the floor is 8 fp32 ulp of the largest
    value (where PyTorch happens to be exact). The adapter gradients are r-, k- and k × k-sized
    reductions through the k × k core, whose largest error over a handful of values (one, for k = 1)
    is a noisy statistic amplified by cancellation, so their floor is 4 ulp of the input dtype and at
    least 32 fp32 ulp (4e-6); a wrong kernel moves them by O(1) (scripts/mutants.py shows it)."""
    peer = torch_peer(raw, x, grad_y, dtype)
    fp32_ulp = torch.finfo(torch.float32).eps
    floors = [8 * fp32_ulp] * 2 + [max(4 * torch.finfo(dtype).eps, 32 * fp32_ulp)] * len(PARAMS)
    return [2 * _max_err(p, e) + floor * float(e.abs().max()) for p, e, floor in zip(peer, expected, floors)]


def assert_matches_oracle(got, expected, tols, context) -> None:
    assert got[0].shape == expected[0].shape and got[1].shape == expected[1].shape
    for name, a, e, tol in zip(NAMES, got, expected, tols):
        err = _max_err(a, e)
        assert err <= tol, f"{context}: {name} off by {err:.3g}, allowed {tol:.3g} (2 × PyTorch's own error)"


def check(layer, raw, lead=(37,), dtype=torch.float32, seed=1, context=""):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, raw["weight"].shape[1], generator=g).to(dtype)
    grad_y = torch.randn(*lead, raw["weight"].shape[0], generator=g).to(dtype)
    expected = oracle(raw, x, grad_y)
    tols = tolerances(raw, x, grad_y, dtype, expected)
    got = run_layer(layer, x, grad_y)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert all(t.dtype == torch.float32 for t in got[2:])  # adapter gradients stay fp32
    assert_matches_oracle(got, expected, tols, context)
    return got, expected, tols


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
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("lead", [(37,), (3, 13)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_gradient_match_the_oracle(case, lead, dtype):
    layer, raw = make_layer(dtype=dtype, **CASES[case])
    got, expected, tols = check(layer, raw, lead, dtype, context=case)
    if "mask" in CASES[case]:
        masked = torch.tensor(CASES[case]["mask"]) == 0
        assert torch.all(got[4].cpu()[masked] == 0)  # no gradient reaches a masked λ


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_inputs_make_every_term_visible_at_the_tolerance(dtype, conv):
    """The premise of the oracle tests: with the three terms at equal norm, removing any one of them
    (or the base or adapter part of dX) moves y / dX by far more than the tolerance."""
    layer, raw = make_layer(dtype=dtype, conv=conv, mask=[1, 1, 0, 1, 1, 1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 70, generator=g).to(dtype).double()
    grad_y = torch.randn(37, 45, generator=g).to(dtype).double()
    expected = oracle(raw, x, grad_y)
    tols = tolerances(raw, x, grad_y, dtype, expected)
    zero = torch.zeros_like
    without = {"base": oracle({**raw, "weight": zero(raw["weight"])}, x, grad_y),
               "bias": oracle({**raw, "bias": zero(raw["bias"])}, x, grad_y),
               "adapter": oracle({**raw, "singular_values": zero(raw["singular_values"])}, x, grad_y)}
    for term in TERMS:
        assert _max_err(without[term][0], expected[0]) > 20 * tols[0], f"y does not show the {term} term"
    for term in ("base", "adapter"):
        assert _max_err(without[term][1], expected[1]) > 20 * tols[1], f"dX does not show the {term} term"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_each_term_alone_matches_the_oracle(term, conv, dtype):
    layer, raw = make_layer(dtype=dtype, conv=conv, terms=(term,))
    check(layer, raw, (2, 19), dtype, context=f"{term} alone")


def test_autocast_bf16_on_an_fp32_layer():
    """Autocast casts x, W and b to bf16 as F.linear would; the adapter stays fp32."""
    layer, raw = make_layer()
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(37, 70, generator=g), torch.randn(37, 45, generator=g)
    rounded = {**raw, "weight": raw["weight"].bfloat16().double(), "bias": raw["bias"].bfloat16().double()}
    expected = oracle(rounded, x.bfloat16(), grad_y.bfloat16())
    tols = tolerances(rounded, x.bfloat16(), grad_y.bfloat16(), torch.bfloat16, expected)
    got = run_layer(layer, x, grad_y, autocast=torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32  # dX in x's own dtype
    assert_matches_oracle(got, expected, tols, "autocast")


def test_host_functions_match_the_oracle_including_the_rank_only_backward():
    """The kernels' host functions on plain tensors (down, up given): forward, and the backward in its
    rank-k-only mode (no input gradient: the dX GEMM computes just g = dY·up) with dW and db."""
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 70), torch.randn(45, 70) / 8, torch.randn(45)
    down, up = torch.randn(5, 70) / 8, torch.randn(45, 5)
    dev = [t.to(KERNEL_DEVICE) for t in (x, w, b, down, up)]
    y, h = kernels.lora_linear_forward(*dev)
    x64, w64, b64, down64, up64 = (t.double().requires_grad_() for t in (x, w, b, down, up))
    y64 = x64 @ w64.T + b64 + (x64 @ down64.T) @ up64.T
    h64 = (x64 @ down64.T).detach()
    assert h.dtype == torch.float32
    assert _max_err(y, y64.detach()) < 1e-5 * float(y64.detach().abs().max()) and _max_err(h, h64) < 1e-5 * float(h64.abs().max())
    grad_y = torch.randn(37, 45)
    got = kernels.lora_linear_backward(grad_y.to(KERNEL_DEVICE), dev[0], dev[1], dev[3], dev[4], h,
                                       needs_input_grad=False, needs_weight_grad=True, needs_bias_grad=True)
    expected = torch.autograd.grad(y64, (w64, b64, down64, up64), grad_y.double())
    assert got[0] is None
    for name, a, e in zip(("dW", "db", "d down", "d up"), got[1:], expected):
        assert _max_err(a, e) < 1e-5 * float(e.abs().max()), name


def test_empty_input():
    layer, _ = make_layer()
    x = torch.randn(0, 70, device=KERNEL_DEVICE, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 45) and x.grad.shape == (0, 70) and torch.count_nonzero(layer.q_down.grad) == 0


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="the interpreter runs programs one by one: always the same "
                    "bits; on CPU the compiled IR is checked for atomics instead (test_no_atomics_in_any_kernel)")
def test_deterministic_bit_for_bit():
    """No atomics anywhere: the same inputs give the same bits, forward and backward."""
    layer, raw = make_layer(r=4, k=4, in_f=700, out_f=450)
    x, grad_y = torch.randn(1500, 700, device=KERNEL_DEVICE), torch.randn(1500, 450, device=KERNEL_DEVICE)
    first, second = run_layer(layer, x, grad_y), run_layer(layer, x, grad_y)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="on a GPU the autotuner picks among the configs")
@pytest.mark.parametrize("index", range(len(kernels.MATMUL_CONFIGS)))
def test_every_autotune_config_computes_the_same(monkeypatch, index):
    """Each config the autotuner may pick, run under the interpreter: tile shapes change the masks."""
    monkeypatch.setattr(kernels, "INTERPRETER_MATMUL_CONFIG", dict(kernels.MATMUL_CONFIGS[index].kwargs))
    reduce_config = kernels.REDUCE_CONFIGS[index % len(kernels.REDUCE_CONFIGS)].kwargs
    monkeypatch.setattr(kernels, "INTERPRETER_REDUCE_CONFIG", dict(reduce_config))
    layer, raw = make_layer(in_f=150, out_f=140, r=4, k=3)
    check(layer, raw, (140,), context=f"config {index}")


def test_reduction_splits_over_tokens_and_sums_exactly():
    """rank_reduce splits the token dimension across programs; the partial sums must add up."""
    torch.manual_seed(0)
    a, b = torch.randn(700, 5, device=KERNEL_DEVICE), torch.randn(700, 33, device=KERNEL_DEVICE)
    launch, partial = kernels.reduce_launch(a, b, programs=64)
    assert partial.shape[0] > 1  # really split
    torch.testing.assert_close(kernels.rank_reduce(a, b).cpu(), (a.t().double() @ b.double()).float().cpu(),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("matmul_precision, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_torchs_matmul_precision(matmul_precision, expected):
    """The interpreter ignores tl.dot's precision, so the choice is checked where it is made: fp32
    inputs get IEEE dots unless torch allows TF32; half inputs' fp32 rank-k dots always use TF32."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul_precision)
        x, w = torch.randn(4, 32), torch.randn(8, 32)
        launch, _, _ = kernels.matmul_launch(x, w, (w.stride(1), w.stride(0)), torch.randn(2, 32), (1, 32),
                                             torch.randn(8, 2), (1, 2), None, 8, 2, compute_out=True)
        assert launch.flags["PRECISION"] == expected
        launch, _ = kernels.reduce_launch(torch.randn(4, 2), x)
        assert launch.flags["PRECISION"] == expected
        assert kernels.dot_precision(torch.bfloat16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


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
    layer, raw = make_layer(r=4, k=4)
    backend = "inductor" if KERNEL_DEVICE == "cuda" else "aot_eager"  # inductor has no CPU Triton
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(2, 9, 70, generator=g), torch.randn(2, 9, 45, generator=g)
    expected = oracle(raw, x, grad_y)
    assert_matches_oracle(run_layer(compiled, x, grad_y), expected, tolerances(raw, x, grad_y, torch.float32,
                                                                                 expected), "compiled")


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


@pytest.fixture(scope="module")
def compile_report() -> list[dict]:
    """compile_all's results (every kernel × config × sm_90 / sm_80), in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "lora2_kernels.triton_kernels.compile_all", "--json"],
                         capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.stdout, run.stderr[-4000:]
    return json.loads(run.stdout)["results"]


def test_every_kernel_and_config_compiles_for_hopper_and_ampere(compile_report):
    """triton.compile(..., target=GPUTarget("cuda", 90 / 80, 32)) on the launches the host code makes:
    the compiler's checks the interpreter skips (tl.dot K >= 16, shared memory, layouts)."""
    results = compile_report
    failures = [f"sm_{r['arch']} {r['case']} [{r['config']}]: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    for arch in (90, 80):
        for kernel, configs in kernels.CONFIGS.items():
            cases = {r["case"] for r in results if r["kernel"] == kernel and r["arch"] == arch}
            assert cases, (arch, kernel)
            for case in cases:
                compiled = [r for r in results if r["case"] == case and r["arch"] == arch and not r["pruned"]]
                assert compiled, f"no config of {case} fits sm_{arch}"
                if arch == 90 and "float32" not in case:  # half inputs: every config fits a Hopper
                    assert len(compiled) == len(configs), case


def test_no_atomics_in_any_kernel(compile_report):
    """Determinism by construction: no compiled kernel has an atomic (the interpreter, which runs the
    programs one after another, cannot show a race; the IR can)."""
    compiled = [r for r in compile_report if not r["pruned"]]
    assert compiled and all(r["atomics"] is not None for r in compiled)
    assert [r["case"] for r in compiled if r["atomics"]] == []


def test_autotuning_is_keyed_by_token_buckets_not_token_counts():
    """Dynamic padding gives nearly every batch another token count: the tuning key is its bucket."""
    assert [kernels.token_bucket(t) for t in (0, 1, 16, 17, 1000, 1024, 1025, 8192)] == \
        [16, 16, 16, 32, 1024, 1024, 2048, 8192]
    assert "M_BUCKET" in kernels.lora_matmul_kernel.arg_names and "T_BUCKET" in kernels.rank_reduce_kernel.arg_names
