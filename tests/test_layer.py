"""The layer alone: thin chain == dense reference, merge/unmerge, dtypes, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora2.layer import Lora2Linear, reference_delta_weight


def _layer(base: nn.Module, r: int = 4, k: int = 3, alpha: float = 8.0, seed: int = 0,
           std: float = 1.0) -> Lora2Linear:
    torch.manual_seed(seed)
    layer = Lora2Linear(base, r=r, k=k, alpha=alpha)
    with torch.no_grad():  # by default O(1) factors, so ΔW is comparable to W and errors are visible
        for p in (layer.q_down, layer.q_up, layer.singular_values, layer.p_down, layer.p_up):
            p.normal_(std=std)
        layer.singular_values.normal_()
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


@settings(max_examples=30, deadline=None)
@given(
    in_f=st.integers(1, 40), out_f=st.integers(1, 40), r=st.integers(1, 12), k=st.integers(1, 12),
    conv=st.booleans(), pruned=st.integers(0, 12), seed=st.integers(0, 2**16),
)
def test_thin_chain_equals_dense_reference(in_f, out_f, r, k, conv, pruned, seed):
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f)
    layer = _layer(base, r=r, k=k, seed=seed)
    mask = torch.ones(r)
    mask[: min(pruned, r - 1)] = 0
    layer.set_rank_mask(mask)
    x = torch.randn(5, in_f)
    dense = reference_delta_weight(layer)  # float64, factor by factor
    assert _rel(layer.adapter_forward(x).double(), x.double() @ dense.T) < 1e-5
    assert _rel(layer(x).double(), base(x).double() + x.double() @ dense.T) < 1e-5
    assert _rel(layer.delta_weight().double(), dense) < 1e-5


def test_starts_at_base_model():
    base = nn.Linear(16, 8)
    layer = Lora2Linear(base, r=4, k=4, alpha=4.0)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.singular_values) == 0
    for p in (layer.q_down, layer.q_up, layer.p_down, layer.p_up):
        assert p.std() > 0


def test_forward_never_materialises_delta_weight(monkeypatch):
    layer = _layer(nn.Linear(64, 48), r=8, k=4)
    shapes = []
    real_linear = torch.nn.functional.linear

    def spy(inp, weight, bias=None):
        shapes.append(tuple(weight.shape))
        return real_linear(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    monkeypatch.setattr(Lora2Linear, "delta_weight", lambda self: pytest.fail("forward built ΔW"))
    monkeypatch.setattr(torch, "addmm", lambda m, a, b: shapes.append(tuple(b.t().shape)) or m + a @ b)
    layer(torch.randn(2, 64)).sum().backward()
    adapter_shapes = shapes[1:]  # shapes[0] is the frozen base weight
    assert adapter_shapes == [(4, 64), (48, 4)]  # k × in down, out × k up: never out × in


@settings(max_examples=30, deadline=None)
@given(in_f=st.integers(1, 40), out_f=st.integers(1, 40), r=st.integers(1, 8), k=st.integers(1, 8),
       conv=st.booleans(), lead=st.sampled_from([(5,), (2, 3), (1, 1, 4)]), seed=st.integers(0, 2**16))
def test_fused_path_equals_plain_path_forward_and_gradients(in_f, out_f, r, k, conv, lead, seed):
    """The fused addmm forward is a fast path; the plain two-F.linear path is the reference."""
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f)
    layer = _layer(base, r=r, k=k, seed=seed)
    x = torch.randn(*lead, in_f, requires_grad=True)
    results = {}
    for fused in (True, False):
        layer.fused = fused
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results[fused] = (out.detach(), x.grad.clone(),
                          [p.grad.clone() for p in (layer.q_down, layer.q_up, layer.singular_values,
                                                    layer.p_down, layer.p_up)])
    (out_f_, x_f, g_f), (out_p, x_p, g_p) = results[True], results[False]
    assert out_f_.shape == out_p.shape
    torch.testing.assert_close(out_f_, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_f, x_p, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_reach_exactly_the_adapter_factors():
    layer = _layer(nn.Linear(10, 6))
    layer(torch.randn(4, 10)).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    for name in ("q_down", "q_up", "singular_values", "p_down", "p_up"):
        g = getattr(layer, name).grad
        assert g is not None and torch.count_nonzero(g) > 0, name


def test_masked_singular_values_get_no_gradient_and_stay_zero():
    layer = _layer(nn.Linear(10, 6), r=5, k=3)
    layer.set_rank_mask(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    assert layer.singular_values[1] == 0 and layer.singular_values[3] == 0
    assert layer.ranknum.item() == 3
    layer(torch.randn(4, 10)).sum().backward()
    assert layer.singular_values.grad[1] == 0 and layer.singular_values.grad[3] == 0
    assert torch.all(layer.q_up.grad[[1, 3]] == 0) and torch.all(layer.p_down.grad[:, [1, 3]] == 0)
    assert layer.kept_indices() == [0, 2, 4]


@pytest.mark.parametrize("conv", [False, True])
def test_merge_unmerge_round_trip(conv):
    base = Conv1D(12, 20) if conv else nn.Linear(20, 12)
    layer = _layer(base, std=0.2)  # trained-adapter magnitudes: |ΔW| ~ 1e-2, fp32 round-off ~ 1e-9
    assert layer.delta_weight().abs().max() > 1e-3
    w0 = base.weight.detach().clone()
    x = torch.randn(7, 20)
    adapted = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-6)
    layer.merge()  # idempotent: ΔW is never added twice
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert (base.weight - w0).abs().max() < 1e-6
    layer.unmerge()  # guarded: no-op
    assert (base.weight - w0).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base(dtype):
    base = nn.Linear(32, 16).to(dtype)
    layer = _layer(base)
    x = torch.randn(4, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = base(x).float() + x.float() @ reference_delta_weight(layer).float().T
    assert _rel(y.float(), ref) < 2e-2
    y.float().sum().backward()
    assert layer.q_down.grad is not None and layer.q_down.grad.dtype == torch.float32


def test_autocast_bf16():
    layer = _layer(nn.Linear(32, 16))
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    ref = layer.base_layer(x) + x @ reference_delta_weight(layer).float().T
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), ref) < 2e-2


def test_rejects_unsupported_layers():
    with pytest.raises(TypeError, match="Embedding"):
        Lora2Linear(nn.Embedding(10, 4), r=2, k=2, alpha=1.0)
    with pytest.raises(TypeError, match="Conv2d"):
        Lora2Linear(nn.Conv2d(3, 3, 1), r=2, k=2, alpha=1.0)


def test_fully_pruned_module_contributes_nothing():
    layer = _layer(nn.Linear(8, 8))
    layer.set_rank_mask(torch.zeros(4))
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), layer.base_layer(x) + 0.0 * layer(x)) or torch.allclose(layer(x), layer.base_layer(x))
    assert torch.isfinite(layer(x)).all()
