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
floor of a few units in the last place where PyTorch happens to be exact (4 × for the three
gradients that come from the k × k core, see `tolerances`).
"""

from __future__ import annotations

import json
import logging
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


def oracle(raw: dict, x: torch.Tensor, grad_y: torch.Tensor, keep: torch.Tensor | None = None,
           p: float = 0.0) -> list[torch.Tensor]:
    """[y, dx, dA₁, dB₁, dλ, dA₂, dB₂] of y = x·Wᵀ + b + d(x)·ΔWᵀ, ΔW = (α/r)·B₂·A₂·diag(λ⊙m)·B₁·A₁, in
    float64; d(x) = x ⊙ keep / (1 − p) with a given keep mask (adapter dropout), else x."""
    leaves = [raw[n].detach().double().clone().requires_grad_() for n in PARAMS]
    q_down, q_up, singular_values, p_down, p_up = leaves
    r = singular_values.shape[0]
    delta = (ALPHA / r) * p_up @ p_down @ torch.diag(singular_values * raw["mask"].double()) @ q_up @ q_down
    x = x.detach().double().requires_grad_()
    adapter_x = x if keep is None else x * keep.double() / (1 - p)
    y = x @ raw["weight"].double().T + raw["bias"].double() + adapter_x @ delta.T
    grads = torch.autograd.grad(y, [x, *leaves], grad_y.double())
    return [y.detach(), *grads]


def torch_peer(raw: dict, x: torch.Tensor, grad_y: torch.Tensor, dtype: torch.dtype, keep: torch.Tensor | None = None,
               p: float = 0.0) -> list[torch.Tensor]:
    """The same quantities as PyTorch computes them unfused in ``dtype`` (PEFT's LoRA under autocast):
    the base and the two rank-k GEMMs in ``dtype``, the fp32 adapter factors cast to it."""
    leaves = [raw[n].detach().float().clone().requires_grad_() for n in PARAMS]
    q_down, q_up, singular_values, p_down, p_up = leaves
    r = singular_values.shape[0]
    up = p_up @ ((ALPHA / r) * p_down @ torch.diag(singular_values * raw["mask"].float()) @ q_up)
    x = x.detach().to(dtype).requires_grad_()
    y = F.linear(x, raw["weight"].to(dtype), raw["bias"].to(dtype))
    adapter_x = x if keep is None else x * keep.to(dtype) / (1 - p)
    y = y + F.linear(F.linear(adapter_x, q_down.to(dtype)), up.to(dtype))
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


def tolerances(raw, x, grad_y, dtype, expected, keep=None, p=0.0) -> list[float]:
    """Per quantity: 2 × PyTorch's own error in ``dtype`` against float64, plus a floor.

    y, dX, dA₁ and dB₂ (the large tensors, where a dropped term shows): the floor is 8 fp32 ulp of
    the largest value (where PyTorch happens to be exact). dB₁, dλ and dA₂ all come from the k × k
    core's gradient, a handful of values (one, for k = 1) summed with heavy cancellation: one
    rounding more or less in either implementation moves their largest error by several times, so
    they get 4 × PyTorch's error and a floor of 4 ulp of the input dtype (at least 32 fp32 ulp). A
    wrong kernel moves them by O(1) (scripts/mutants.py shows it)."""
    peer = torch_peer(raw, x, grad_y, dtype, keep, p)
    fp32_ulp = torch.finfo(torch.float32).eps
    core_floor = max(4 * torch.finfo(dtype).eps, 32 * fp32_ulp)
    rules = {"y": (2, 8 * fp32_ulp), "dx": (2, 8 * fp32_ulp), "q_down": (2, 8 * fp32_ulp), "p_up": (2, 8 * fp32_ulp),
             "q_up": (4, core_floor), "singular_values": (4, core_floor), "p_down": (4, core_floor)}
    return [rules[name][0] * _max_err(p, e) + rules[name][1] * float(e.abs().max())
            for name, p, e in zip(NAMES, peer, expected)]


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


@pytest.mark.parametrize("dtype, lead", [(torch.float32, (37,)), (torch.float32, (3, 13)), (torch.bfloat16, (37,)),
                                         (torch.float16, (37,))], ids=["float32-2d", "float32-3d", "bfloat16", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_gradient_match_the_oracle(case, lead, dtype):
    layer, raw = make_layer(dtype=dtype, **CASES[case])
    got, expected, tols = check(layer, raw, lead, dtype, context=case)
    if "mask" in CASES[case]:
        masked = torch.tensor(CASES[case]["mask"]) == 0
        assert torch.all(got[4].cpu()[masked] == 0)  # no gradient reaches a masked λ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("case", ["odd sizes", "conv1d", "k = 17 (two rank tiles)"])
def test_row_bands_of_several_column_groups_match_the_oracle(case, groups, dtype, monkeypatch):
    """Both kernels run row bands: each program a row tile's run of column tiles. With several groups a row
    tile (a GPU with more SMs than row tiles) every group computes h (forward) or gB (dX) for its own tiles and
    keeps it in its own scratch slot; only group 0 writes the row tile's dB₂ and dC partials."""
    monkeypatch.setattr(kernels, "INTERPRETER_COLUMN_GROUPS", groups)
    layer, raw = make_layer(dtype=dtype, **CASES[case])
    check(layer, raw, (37,), dtype, context=f"{case}, {groups} groups")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("case", ["odd sizes", "r != k, masked", "no bias", "conv1d", "k = 17 (two rank tiles)"])
def test_the_cublas_split_matches_the_oracle(case, dtype, monkeypatch):
    """The autotuner's safety net (issue "Kernels v3", item 5): the base GEMM by torch.mm (cuBLAS on a GPU) and
    the adapter added into its output by the kernels (BASE False), forward and dX, held to the same oracle;
    counted: exactly one mm more each way, the kernels' launches unchanged."""
    from benchmarks.device_work import DeviceWork

    monkeypatch.setenv("LORA2_BASE_GEMM", "cublas")
    layer, raw = make_layer(dtype=dtype, **CASES[case])
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(37, 70, generator=g).to(dtype), torch.randn(37, 45, generator=g).to(dtype)
    expected = oracle(raw, x, grad_y)
    if dtype == torch.float32:  # under "highest" fp32 takes the FMA tiles, which have no split
        with DeviceWork() as work:
            run_layer(layer, x, grad_y)
        assert work.ops["mm"] == 0, work.ops
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
    try:
        with DeviceWork() as work:
            got = run_layer(layer, x, grad_y)
    finally:
        if dtype == torch.float32:
            torch.set_float32_matmul_precision(previous)
    assert_matches_oracle(got, expected, tolerances(raw, x, grad_y, dtype, expected), f"cuBLAS split, {case}")
    assert work.ops["mm"] == 2 and work.ops["triton:forward"] == work.ops["triton:dx"] == 1, work.ops


def test_the_cublas_split_with_dropout_matches_the_oracle_given_the_same_mask(monkeypatch):
    monkeypatch.setenv("LORA2_BASE_GEMM", "cublas")
    layer, raw = make_layer(mask=[1, 1, 0, 1, 1, 1])
    seed = torch.tensor(77, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(37, 70, generator=g), torch.randn(37, 45, generator=g)
    keep = kernels.dropout_keep_mask(seed, 37, 70, 0.3, KERNEL_DEVICE).cpu()
    expected = oracle(raw, x, grad_y, keep, 0.3)
    inputs = x.to(KERNEL_DEVICE).requires_grad_()
    factors = [getattr(layer, n) for n in PARAMS]
    y = ops.lora2_linear(inputs, layer.weight, layer.bias, *factors, layer.rank_mask, ALPHA, False, False, 0.3,
                         seed=seed)
    got = [y.detach(), *torch.autograd.grad(y, [inputs, *factors], grad_y.to(KERNEL_DEVICE))]
    assert_matches_oracle(got, expected, tolerances(raw, x, grad_y, torch.float32, expected, keep, 0.3), "split")


def test_the_base_gemm_choice_times_both_keeps_the_faster_and_logs_it(monkeypatch, caplog):
    """On a GPU the first call of a key runs both variants and keeps the faster; the next calls reuse the
    choice; LORA2_BASE_GEMM forces one and a wrong value is refused. (Timings faked: no GPU here.)"""
    import triton.testing

    monkeypatch.delenv("LORA2_BASE_GEMM", raising=False)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(kernels, "_BASE_GEMM_CHOSEN", {})
    ran = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 2.0 if ran[-1] else 3.0)[1])
    key, gpu = ("forward", 8192, 2048, 2048, 8, 8), torch.device("cuda", 0)
    with caplog.at_level(logging.INFO, logger="lora2_kernels.triton_kernels"):
        assert kernels.base_gemm(key, gpu, ran.append) == "cublas"
    assert ran == [False, False, True, True] and "→ cublas" in caplog.text
    assert kernels.base_gemm(key, gpu, ran.append) == "cublas" and len(ran) == 4  # cached: no more timing
    assert kernels.base_gemm(key, torch.device("cpu"), ran.append) == "cublas"
    monkeypatch.setenv("LORA2_BASE_GEMM", "fused")
    assert kernels.base_gemm(key, gpu, ran.append) == "fused"
    monkeypatch.setenv("LORA2_BASE_GEMM", "cuBLAS")
    with pytest.raises(ValueError, match="LORA2_BASE_GEMM='cuBLAS': use one of"):
        kernels.base_gemm(key, gpu, ran.append)


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


def test_an_all_bf16_layer_runs_three_launches_and_matches_its_reference():
    """``model.to(torch.bfloat16)`` makes the factors bf16 too. The kernels read them as they are and
    write each gradient in its factor's dtype (no copies around the launches, see test_device_work);
    the results are the reference path's on the same bf16 parameters, which computes in fp32 and
    rounds once, to one bf16 unit in the last place."""
    layer, _ = make_layer()
    layer.to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x, grad_y = torch.randn(37, 70, generator=g).bfloat16(), torch.randn(37, 45, generator=g).bfloat16()
    got = run_layer(layer, x, grad_y)
    layer.backend = "reference"
    expected = run_layer(layer, x, grad_y)
    for name, a, b in zip(NAMES, got, expected):
        assert a.dtype == b.dtype == torch.bfloat16, name
        scale = float(b.float().abs().max())
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=2 ** -7 * scale, msg=name)


def _factors(raw: dict, scale_by_kept: bool = False):
    return kernels.Factors(*(raw[n].float().to(KERNEL_DEVICE) for n in PARAMS), raw["mask"].float().to(KERNEL_DEVICE),
                           ALPHA, scale_by_kept)


@pytest.mark.parametrize("scale_by_kept", [False, True], ids=["alpha-over-r", "alpha-over-kept"])
def test_host_functions_match_the_oracle_including_the_rank_only_backward(scale_by_kept):
    """The kernels' host functions on plain tensors: forward, and the backward without an input
    gradient (the dX kernel then computes only the rank-k part) but with dW and db."""
    _, raw = make_layer(r=7, k=3, mask=[1, 0, 1, 1, 0, 1, 0])
    f = _factors(raw, scale_by_kept)
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(37, 70, generator=g), torch.randn(37, 45, generator=g)
    w, b = raw["weight"].float(), raw["bias"].float()
    y, h, b2 = kernels.lora2_forward(x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), b.to(KERNEL_DEVICE), f)
    scale = ALPHA / 4 if scale_by_kept else ALPHA / 7  # 4 values kept
    leaves = {n: raw[n].clone().requires_grad_() for n in ("weight", "bias", *PARAMS)}
    delta = scale * leaves["p_up"] @ leaves["p_down"] @ torch.diag(leaves["singular_values"] * raw["mask"]) \
        @ leaves["q_up"] @ leaves["q_down"]
    y64 = x.double() @ (leaves["weight"] + delta).T + leaves["bias"]
    assert h.dtype == torch.float32 and b2 is f.p_up  # fp32 inputs: no cast
    assert _max_err(y, y64.detach()) < 1e-5 * float(y64.abs().max())
    assert _max_err(h, x.double() @ raw["q_down"].T) < 1e-5 * float(h.abs().max())
    got = kernels.lora2_backward(grad_y.to(KERNEL_DEVICE), x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), f, h, b2,
                                 needs_input_grad=False, needs_weight_grad=True, needs_bias_grad=True)
    expected = dict(zip(leaves, torch.autograd.grad(y64, list(leaves.values()), grad_y.double())))
    assert got[0] is None
    for name, a in (("weight", got[1]), ("bias", got[2]), *got[3].items()):
        e = expected[name]
        assert _max_err(a, e) < 1e-5 * float(e.abs().max()), name


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("conv, groups", [(False, 1), (True, 1), (False, 3)], ids=["linear", "conv1d", "3-groups"])
def test_dropout_in_the_kernels_equals_the_oracle_given_the_same_mask(conv, groups, dtype, monkeypatch):
    """The base sees x, the adapter x ⊙ keep / (1 − p); the backward regenerates the same mask, per tile, in
    every column group's tiles: one program a row tile, or (3-groups) up to three a row tile."""
    monkeypatch.setattr(kernels, "INTERPRETER_COLUMN_GROUPS", groups)
    layer, raw = make_layer(dtype=dtype, conv=conv, mask=[1, 1, 0, 1, 1, 1])
    layer.dropout = nn.Dropout(0.3)
    seed = torch.tensor(1234, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(37, 70, generator=g).to(dtype), torch.randn(37, 45, generator=g).to(dtype)
    keep = kernels.dropout_keep_mask(1234, 37, 70, 0.3, KERNEL_DEVICE).cpu()
    expected = oracle(raw, x, grad_y, keep, 0.3)
    tols = tolerances(raw, x, grad_y, dtype, expected, keep, 0.3)
    inputs = x.to(KERNEL_DEVICE).requires_grad_()
    factors = [getattr(layer, n) for n in PARAMS]
    y = ops.lora2_linear(inputs, layer.weight, layer.bias, *factors, layer.rank_mask, ALPHA, False, conv, 0.3,
                         seed=seed)
    got = [y.detach(), *torch.autograd.grad(y, [inputs, *factors], grad_y.to(KERNEL_DEVICE))]
    assert_matches_oracle(got, expected, tols, "dropout")
    no_dropout = oracle(raw, x, grad_y)
    assert _max_err(got[0], no_dropout[0]) > 20 * tols[0]  # the mask really changed the adapter's input


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_kernels_draw_the_mask_and_compute_the_rank_k_products_once_per_row(dropout):
    """Counted by the interpreter (benchmarks/kernel_counts.py) at 64 × 512 → 1024, k = 8: the forward used
    to redraw the keep mask and recompute h = d(x)·A₁ᵀ in every column tile (32 draws an element, 1.56 × the
    GEMM's dot FLOPs), dX to recompute gB = dY·B₂ there (1.61 ×). Row bands compute each once per row tile
    (issue "Kernels v3": ≤ 1.10 and ≤ 1.12), and each Philox evaluation serves four elements."""
    if KERNEL_DEVICE == "cuda":
        pytest.skip("counted under the interpreter")
    from benchmarks.kernel_counts import count_step

    counts = count_step(64, 512, 1024, k=8, dropout=dropout)
    # one Philox evaluation per four elements (its four outputs: one per column of a quad), each way
    draws = 0.25 if dropout else 0.0
    assert counts["forward_draws_per_element"] == draws and counts["backward_draws_per_element"] == draws
    assert counts["forward_flops_over_gemm"] <= 1.08
    assert counts["backward_flops_over_gemm"] <= 1.10
    assert counts["forward_launches"] == 1 and counts["backward_launches"] == 2


def test_column_groups_fill_one_wave_of_a_gpu_and_leave_no_program_idle():
    assert kernels.column_groups(64, 8, torch.device("cpu")) == kernels.INTERPRETER_COLUMN_GROUPS
    kernels._SM_COUNT[7] = 132  # an H100 SXM's SMs
    try:
        gpu = torch.device("cuda", 7)
        assert kernels.column_groups(200, 8, gpu) == 1  # the row tiles alone fill the SMs
        assert kernels.column_groups(64, 8, gpu) == 2  # 8192 tokens in 128-row tiles: 128 programs
        assert kernels.column_groups(1, 8, gpu) == 8  # a short batch: every column tile a program
        assert kernels.column_groups(20, 8, gpu) == 4  # 6 wanted: runs of 2 tiles need only 4 groups
    finally:
        del kernels._SM_COUNT[7]


def test_dropout_mask_keeps_1_minus_p_and_changes_every_step():
    """The keep mask: rate 1 − p within 5 σ overall and per row and column, independent of the seed's
    neighbours; a LoRA2Linear in training draws a new seed per call, and in eval applies no dropout."""
    p, rows, cols = 0.25, 256, 192
    masks = [kernels.dropout_keep_mask(seed, rows, cols, p, KERNEL_DEVICE).cpu().double() for seed in (1, 2)]
    sigma = math.sqrt(p * (1 - p))
    for keep in masks:
        assert abs(keep.mean().item() - (1 - p)) < 5 * sigma / math.sqrt(rows * cols)
        assert (keep.mean(1) - (1 - p)).abs().max() < 5 * sigma / math.sqrt(cols)
        assert (keep.mean(0) - (1 - p)).abs().max() < 5 * sigma / math.sqrt(rows)
    agreement = (masks[0] == masks[1]).double().mean().item()  # independent masks agree on p² + (1−p)²
    assert abs(agreement - (p**2 + (1 - p) ** 2)) < 0.02
    layer, _ = make_layer(dtype=torch.bfloat16)
    layer.dropout = nn.Dropout(p)
    x = torch.randn(16, 70, device=KERNEL_DEVICE, dtype=torch.bfloat16)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def _recorded_launches(monkeypatch) -> list:
    """Every Launch run from now on, as (kernel, its non-tensor arguments, flags, grid)."""
    seen = []
    original = kernels.Launch.run

    def record(launch):
        config = original(launch)
        scalars = tuple(a for a in launch.args if not isinstance(a, torch.Tensor))
        seen.append((launch.kernel, scalars, tuple(sorted(launch.flags.items())), launch.grid(config)))
        return config

    monkeypatch.setattr(kernels.Launch, "run", record)
    return seen


def _dropout_model(features: int = 256, dropout: float = 0.3, shared: bool = True) -> nn.Module:
    """Two LoRA2Linear layers (trained-looking λ) through the kernels; ``shared``: their seeds drawn once
    per forward of the pair, as LoRA2Model does (DropoutSeeds)."""
    from lora2_kernels.linear import DropoutSeeds

    torch.manual_seed(0)
    model = nn.Sequential(*[LoRA2Linear(features, features, r=4, k=4, dropout=dropout, backend="triton")
                            for _ in range(2)]).to(KERNEL_DEVICE).train()
    for layer in model:
        with torch.no_grad():
            layer.singular_values.normal_()
    if shared:
        DropoutSeeds(model, list(model))
    return model


def test_no_launch_takes_a_host_value_that_changes_between_steps(monkeypatch):
    """Issue "Kernels v3, the host side", item 1: a captured CUDA graph replays its launches' arguments as
    they were. So between two training steps with dropout no launch may differ in anything but tensors
    (the seed was a host int drawn per call: a replayed graph drew the same mask every step); the seeds
    are drawn on the device, one tensor per model forward, and the masks differ between the steps."""
    model = _dropout_model(70)
    x = torch.randn(37, 70, device=KERNEL_DEVICE)
    seen = _recorded_launches(monkeypatch)
    steps, outputs = [], []
    for _ in range(2):
        del seen[:]
        y = model(x)
        y.sum().backward()
        steps.append(list(seen))
        outputs.append(y.detach())
    assert [launch[0] for launch in steps[0]] == ["forward", "forward", "dx", "finish", "dx", "finish"]
    assert steps[0] == steps[1]
    assert not torch.equal(outputs[0], outputs[1])  # new masks: the seeds changed on the device


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA graphs need a GPU (scripts/gpu_session.sh runs this)")
def test_a_captured_training_step_draws_new_masks_at_each_replay():
    """A whole training step captured in a CUDA graph and replayed twice: two masks (the outputs and the
    gradients differ), as torch's own dropout under graph capture."""
    model = _dropout_model()
    x = torch.randn(64, 256, device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, first allocations) off the capture, as torch's docs do
        for _ in range(3):
            for p in params:
                p.grad = None
            model(x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = model(x)
        y.sum().backward()
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((y.detach().clone(), model[0].q_down.grad.clone()))
    assert not torch.equal(replays[0][0], replays[1][0]) and not torch.equal(replays[0][1], replays[1][1])


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA graphs need a GPU (scripts/gpu_session.sh runs this)")
def test_reduce_overhead_compiled_training_draws_new_masks_each_step():
    model = _dropout_model()
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(64, 256, device="cuda")
    outputs = []
    for _ in range(5):  # the first calls record, later ones replay the CUDA graphs
        y = compiled(x)
        y.sum().backward()
        outputs.append(y.detach().clone())
    assert not torch.equal(outputs[-1], outputs[-2]) and not torch.equal(outputs[-2], outputs[-3])


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    """torch.utils.checkpoint recomputes the forward inside the backward. Its saved tensors come back as
    other objects: the backward took B₂'s layout from ``b2 is p_up`` and read an fp32 layer's B₂ transposed
    (every factor gradient but dB₂ wrong, with or without dropout). With dropout the recompute must also
    draw the masks of the forward it replaces: a model's layers read the seeds of its forward
    (DropoutSeeds); a lone layer's draw is torch's RNG, which checkpoint restores."""
    from torch.utils.checkpoint import checkpoint

    def grads(shared: bool, checkpointed: bool) -> list[torch.Tensor]:
        model = _dropout_model(70, dropout, shared)
        torch.manual_seed(1)
        x = torch.randn(37, 70, device=KERNEL_DEVICE)
        if shared and dropout:
            model._forward_pre_hooks[next(iter(model._forward_pre_hooks))](model, (x,))  # the model's draw
        run = (lambda t: checkpoint(lambda u: model[1](model[0](u)), t, use_reentrant=False)) if checkpointed \
            else (lambda t: model[1](model[0](t)))
        run(x).square().sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for shared in (False, True):
        plain, recomputed = grads(shared, False), grads(shared, True)
        assert all(torch.equal(a, b) for a, b in zip(plain, recomputed)), f"shared seeds: {shared}"


def test_the_op_takes_any_layout_and_dtype_of_factors_and_refuses_misfits():
    """Non-contiguous factors are made contiguous (the kernels index them as such), bf16 factors run the
    backward (A₁ is read as fp32 there), and factors that do not fit the layer are refused."""
    args = list(_op_args())
    x, p_up = args[0], args[7]
    expected = ops.lora2_linear(*args[:13], backend="triton")
    transposed = p_up.detach().t().contiguous().t().requires_grad_()  # same values, strides (1, out)
    assert not transposed.is_contiguous()
    got = ops.lora2_linear(*args[:7], transposed, *args[8:13], backend="triton")
    torch.testing.assert_close(got, expected)
    half = [a.detach().bfloat16().requires_grad_() for a in args[3:8]]
    y = ops.lora2_linear(x, args[1], args[2], *half, *args[8:13], backend="triton")
    y.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in half)
    with pytest.raises(ValueError, match="do not fit a layer of 32 → 24"):
        ops.lora2_linear(x, args[1], args[2], args[3], args[4], args[5], args[6], p_up[:5], *args[8:13],
                         backend="triton")


def test_rows_too_far_apart_for_32_bit_offsets_are_refused():
    """The row bands address a row tile's rows with int32 offsets; a view whose rows lie further apart is
    refused with the fix, not read wrong (a contiguous input never is: its rows are `in` elements apart)."""
    storage = torch.zeros(kernels.MAX_ROW_STRIDE + 8, dtype=torch.int8)
    wide = storage.as_strided((2, 4), (kernels.MAX_ROW_STRIDE + 1, 1))
    with pytest.raises(ValueError, match=r"contiguous"):
        kernels._flat(wide)
    assert kernels._flat(storage.as_strided((2, 4), (kernels.MAX_ROW_STRIDE, 1))).shape == (2, 4)


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
    """Each config the autotuner may pick, run under the interpreter: tile shapes change the masks, and
    the backward's partials are summed over the row tiles of the config that ran."""
    monkeypatch.setattr(kernels, "INTERPRETER_MATMUL_CONFIG", dict(kernels.MATMUL_CONFIGS[index].kwargs))
    layer, raw = make_layer(in_f=150, out_f=140, r=4, k=3)
    check(layer, raw, (140,), context=f"config {index}")


@pytest.mark.parametrize("matmul_precision, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_torchs_matmul_precision(matmul_precision, expected):
    """The interpreter ignores tl.dot's precision, so the choice is checked where it is made: fp32
    inputs get IEEE dots unless torch allows TF32; half inputs' fp32 rank-k dots always use TF32."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul_precision)
        _, raw = make_layer()
        f = _factors(raw)
        x, w, h = torch.randn(4, 70), torch.randn(45, 70), torch.randn(4, 5)
        launch = kernels.forward_launch(x, w, (1, 70), None, f, f.q_down, 45, 0.0, 0)[0]
        assert launch.flags["PRECISION"] == expected
        launch = kernels.dx_launch(torch.randn(4, 45), x, w, (70, 1), h, f, f.p_up, 0.0, 0, True)[0]
        assert launch.flags["PRECISION"] == expected
        assert kernels.dot_precision(torch.bfloat16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


# --- torch integration ------------------------------------------------------------------------------------


def _op_args(dtype=torch.float32, dropout=0.0, requires_grad=True):
    _, raw = make_layer(in_f=32, out_f=24, r=6, k=4, mask=[1, 1, 0, 1, 1, 1])
    torch.manual_seed(0)
    x = torch.randn(5, 32, device=KERNEL_DEVICE, dtype=dtype, requires_grad=requires_grad)
    factors = [raw[n].float().to(KERNEL_DEVICE).requires_grad_(requires_grad) for n in PARAMS]
    return (x, raw["weight"].to(KERNEL_DEVICE, dtype), raw["bias"].to(KERNEL_DEVICE, dtype), *factors,
            raw["mask"].float().to(KERNEL_DEVICE), ALPHA, False, False, dropout,
            torch.tensor(7, dtype=torch.int64) if dropout else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_custom_ops_pass_opcheck(dtype, dropout):
    """The forward op and the backward op: schema, fake (shapes, dtypes, strides) against the real
    outputs, and autograd registration."""
    args = _op_args(dtype, dropout)
    torch.library.opcheck(torch.ops.lora2.lora2_linear.default, args)
    with torch.no_grad():
        y, hidden, b2 = torch.ops.lora2.lora2_linear(*args)
    grad_y = torch.randn_like(y)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    backward_args = (grad_y, detached[0], detached[1], *detached[3:9], hidden, b2, *detached[9:14])
    for needs in [(True, False, False), (False, True, True), (True, True, True)]:
        torch.library.opcheck(torch.ops.lora2.lora2_linear_backward.default, (*backward_args, *needs))


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_custom_op_and_autograd_function_agree(dropout):
    """Eager runs LoRA2Function, torch.compile runs the custom op and its registered backward: the same
    numbers, with dropout too (the backward redraws the forward's mask from the seed it was given)."""
    args = _op_args(dropout=dropout)
    inputs = (args[0], *args[3:8])
    y1 = ops.LoRA2Function.apply(*args)
    g1 = torch.autograd.grad(y1.square().sum(), inputs)
    y2 = torch.ops.lora2.lora2_linear(*args)[0]
    g2 = torch.autograd.grad(y2.square().sum(), inputs)
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_torch_compile_fullgraph_through_the_kernels():
    """Inductor, forward and backward, through the custom ops (their real backward returned a
    transposed view where the fake said contiguous, which inductor rejected)."""
    layer, raw = make_layer(r=4, k=4)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(2, 9, 70, generator=g), torch.randn(2, 9, 45, generator=g)
    expected = oracle(raw, x, grad_y)
    assert_matches_oracle(run_layer(compiled, x, grad_y), expected, tolerances(raw, x, grad_y, torch.float32,
                                                                                 expected), "compiled")


def test_torch_compile_with_dropout_matches_eager_forward_and_backward():
    """With dropout the compiled graph runs the custom op's registered backward, which must redraw the very
    mask of its forward; eager runs LoRA2Function. Same seed (inductor's fallback_random draws it as eager
    does), same output and gradients, bit for bit; and the mask is there (dropout off changes them)."""
    import torch._inductor.config as inductor_config

    layer, raw = make_layer(r=4, k=4)
    layer.dropout = nn.Dropout(0.3)
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(2, 9, 70, generator=g), torch.randn(2, 9, 45, generator=g)
    torch.manual_seed(5)
    eager = run_layer(layer, x, grad_y)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    torch.manual_seed(5)
    with inductor_config.patch(fallback_random=True):
        got = run_layer(compiled, x, grad_y)
    for name, a, e in zip(NAMES, got, eager):
        assert torch.equal(a, e), f"compiled {name} differs from eager with dropout"
    layer.dropout = nn.Identity()
    assert not torch.equal(run_layer(layer, x, grad_y)[2], eager[2])  # dA₁ sees the mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_half_precision_outputs_are_the_fp32_accumulation_rounded_once(dtype):
    """The kernels accumulate in fp32 and round once, to y's (and dX's) dtype. A second rounding (of the
    accumulator before the bias, say) stays inside "2 × PyTorch's own error" but not here: against the
    exact result rounded once, a value may differ by one ulp only where fp32 accumulation lands within
    its error of a rounding boundary (well under 1 %), and never by more."""
    layer, raw = make_layer(dtype=dtype, terms=("base", "bias"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 70, generator=g).to(dtype)
    grad_y = torch.randn(64, 45, generator=g).to(dtype)
    got = run_layer(layer, x, grad_y)
    exact = {"y": (x.double() @ raw["weight"].T + raw["bias"]).to(dtype),
             "dx": (grad_y.double() @ raw["weight"]).to(dtype)}
    for name, value in zip(("y", "dx"), got[:2]):
        assert value.dtype == dtype
        ulps = (value.cpu().view(torch.int16).int() - exact[name].view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1, f"{name}: {int(ulps.max())} ulp from the exact value rounded once"
        assert float((ulps > 0).float().mean()) <= 0.01, f"{name}: {float((ulps > 0).float().mean()):.1%} of " \
            "the values are not the exact result rounded once"


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


# What CI compiles (about 1.5 minutes on 2 cores): every bf16 and fp32 launch case at k = 8 for sm_90
# (fp16 runs the same code as bf16) with the NF4 forward / dX / dequantise, and the bf16 forward / dX
# for sm_80. The k = 32 rank tile, double quantisation and 4-bit dropout: the full sweep only.
# `python -m lora2_kernels.triton_kernels.compile_all --resources` compiles all of them for both
# (k = 1, 8, 16, 32, the 4-bit kernels double-quantised and with dropout too: about 15 minutes).
CI_COMPILES = [("90", ["bfloat16/k8", "float32/k8", "float32-tf32"], ["4bit-nested", "4bit-dropout"]),
               ("80", ["forward/linear/bfloat16/k8", "dx/linear/bfloat16/k8"], [])]


@pytest.fixture(scope="module")
def compile_report() -> list[dict]:
    """compile_all's results (kernel × case × config × GPU, with ptxas' registers and spills and the
    TTGIR's wgmma waits), in processes without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = []
    for arch, cases, excluded in CI_COMPILES:
        run = subprocess.run([sys.executable, "-m", "lora2_kernels.triton_kernels.compile_all", "--json", "--resources",
                              "--arch", arch, "--cases", *cases, "--exclude", *excluded], capture_output=True, text=True,
                             env=env,
                             timeout=900, check=False)
        assert run.stdout, run.stderr[-4000:]
        results += json.loads(run.stdout)["results"]
    return results


@pytest.mark.slow
def test_every_kernel_and_config_compiles_for_hopper_and_ampere_without_spilling(compile_report):
    """triton.compile(..., target=GPUTarget("cuda", 90 / 80, 32)) on the launches the host code makes:
    the compiler's checks the interpreter skips (tl.dot K >= 16, shared memory, layouts); every
    config the autotuner can keep on that GPU compiles to 0 spill bytes; each case keeps one."""
    results = compile_report
    failures = [f"sm_{r['arch']} {r['case']} [{r['config']}]: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    kept = [r for r in results if not r["pruned"]]
    spills = [f"sm_{r['arch']} {r['case']} [{r['config']}]: {r['spill_bytes']} B" for r in kept
              if r["kernel"] in ("forward", "dx") and r["spill_bytes"] != 0]
    assert not spills, "configs that spill (add them to lora_linear.SPILLS):\n" + "\n".join(spills)
    for arch in (90, 80):
        cases = {r["case"] for r in results if r["arch"] == arch}
        assert {c.split("/")[0] for c in cases} >= {"forward", "dx"}, arch
        for case in cases:
            assert [r for r in kept if r["case"] == case and r["arch"] == arch], f"no config of {case} kept on sm_{arch}"
    assert {r["case"].split("/")[0] for r in results} == {"forward", "dx", "rank-only", "forward-no-bias",
                                                          "forward-dropout", "dx-dropout", "finish", "cast",
                                                          "forward-4bit", "dx-4bit", "dequantize-4bit",
                                                          "forward-split", "dx-split", "forward-split-dropout",
                                                          "dx-split-dropout", "forward-adapters", "dx-adapters",
                                                          "forward-adapters-dropout", "dx-adapters-dropout",
                                                          "finish-adapters"}


@pytest.mark.slow
def test_hopper_main_loops_keep_wgmmas_in_flight(compile_report):
    """In the sm_90 TTGIR of every bf16 / fp16 GEMM kernel, 4-bit ones included, no wgmma wait inside a K loop
    has pendings = 0 (which would make each wgmma wait for the one before: a serialised main loop).

    The 4-bit loops waited on every wgmma until 2026-12-04: their dequantised W tile went through shared
    memory to be the wgmma's B operand. They compute yᵀ = W·xᵀ (dXᵀ = Wᵀ·dYᵀ) now, W the register operand."""
    checked = [r for r in compile_report if r["arch"] == 90 and not r["pruned"] and r["kernel"] in ("forward", "dx")
               and ("bfloat16" in r["case"] or "float16" in r["case"])]
    assert any("4bit" in r["case"] for r in checked)
    # every kernel has a K loop (compile_all.loop_wait_pendings: a loop whose wgmma accumulates into its iter_args)
    assert checked and all(r["loop_wait_pendings"] for r in checked)
    serial = [f"{r['case']} [{r['config']}]: {r['loop_wait_pendings']}" for r in checked if 0 in r["loop_wait_pendings"]]
    assert not serial, "\n".join(serial)


@pytest.mark.slow
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
    assert "M_BUCKET" in kernels.forward_kernel.arg_names and "M_BUCKET" in kernels.dx_kernel.arg_names


def test_warmup_tunes_the_keys_the_training_steps_use(monkeypatch):
    """`lora2_kernels.warmup_keys` + the kernels' warmup cover every autotuning key a training step and an
    evaluation launch: bias-free layers (LLaMA), dropout (off in evaluation), the first layer's backward
    without dX, the dtypes."""
    import lora2_kernels

    torch.manual_seed(0)
    model = nn.Sequential(LoRA2Linear(40, 40, bias=False, r=4, k=4, backend="triton"),
                          LoRA2Linear(40, 24, r=4, k=4, dropout=0.1, backend="triton")).to(KERNEL_DEVICE)
    for layer in model:
        layer.weight.data = layer.weight.data.bfloat16()
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.bfloat16()
    seen = []
    original = kernels.Launch.run

    def record(launch):
        if launch.kernel in kernels.AUTOTUNED:
            seen.append(launch.autotune_key())
        return original(launch)

    monkeypatch.setattr(kernels.Launch, "run", record)
    model.train()
    model(torch.randn(2, 12, 40, device=KERNEL_DEVICE, dtype=torch.bfloat16)).sum().backward()
    step_keys = set(seen)
    seen.clear()
    model.eval()  # an evaluation: dropout off (a key of its own), another batch size, no backward
    with torch.no_grad():
        model(torch.randn(5, 12, 40, device=KERNEL_DEVICE, dtype=torch.bfloat16))
    eval_keys = set(seen) - step_keys
    seen.clear()
    kernels.warmup(lora2_kernels.warmup_keys(model, 24, eval_tokens=60), dtype=torch.bfloat16,
                   device=KERNEL_DEVICE, buckets=1)
    assert {k[0] for k in step_keys} == {"forward", "dx"} and eval_keys
    assert step_keys | eval_keys <= set(seen), (step_keys | eval_keys) - set(seen)
