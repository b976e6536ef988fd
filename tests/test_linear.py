"""LoRA2Linear as a drop-in nn.Linear: construction, state dicts, the forward against the paper's
formula (reference module, scale from the arguments), every gradient, merge, dtypes, autocast,
backends and argument errors. Runs on the CPU (the reference backend)."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora2_kernels import LoRA2Linear, reference

PARAMS = ("q_down", "q_up", "singular_values", "p_down", "p_up")


def _adapted(base: nn.Module, r: int = 4, k: int = 3, alpha: float = 8.0, seed: int = 0, std: float = 1.0,
             **kwargs) -> LoRA2Linear:
    torch.manual_seed(seed)
    layer = LoRA2Linear.from_linear(base, r=r, k=k, alpha=alpha, **kwargs)
    with torch.no_grad():  # O(1) factors by default, so ΔW is comparable to W and errors are visible
        for name in PARAMS:
            getattr(layer, name).normal_(std=std)
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).detach().norm() / b.double().detach().norm().clamp_min(1e-30))


def _paper_delta(layer: LoRA2Linear, scale: float) -> torch.Tensor:
    """ΔW from the paper's formula in float64, the scale given by the test (not read off the layer)."""
    return reference.delta_weight(*(getattr(layer, n).double() for n in PARAMS[:3]), layer.p_down.double(),
                                  layer.p_up.double(), layer.rank_mask.double(), scale)


# --- drop-in ---------------------------------------------------------------------------------------


def test_is_an_nn_linear_with_its_state_dict_keys_and_output():
    torch.manual_seed(0)
    plain = nn.Linear(20, 12)
    layer = LoRA2Linear(20, 12, r=4, k=3)
    assert isinstance(layer, nn.Linear)
    result = layer.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted([*PARAMS, "rank_mask"]) and not result.unexpected_keys
    x = torch.randn(2, 5, 20)
    assert torch.equal(layer(x), plain(x))  # λ = 0 at init: exactly the nn.Linear
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert all(getattr(layer, n).requires_grad for n in PARAMS)


def test_constructor_arguments_like_nn_linear():
    layer = LoRA2Linear(8, 6, bias=False, r=2, k=5, alpha=4, dtype=torch.float64, device="cpu")
    assert layer.bias is None and layer.weight.dtype == torch.float64 and layer.weight.shape == (6, 8)
    assert layer.q_down.shape == (5, 8) and layer.q_up.shape == (2, 5) and layer.singular_values.shape == (2,)
    assert layer.p_down.shape == (5, 2) and layer.p_up.shape == (6, 5)
    assert layer.q_down.dtype == torch.float32  # adapters stay fp32 whatever the base dtype
    assert "r=2, k=5" in repr(layer)


@pytest.mark.parametrize("conv", [False, True])
def test_from_linear_shares_the_weight_and_keeps_its_layout(conv):
    base = Conv1D(12, 20) if conv else nn.Linear(20, 12)
    keys = set(base.state_dict())
    layer = LoRA2Linear.from_linear(base, r=4, k=2)
    assert layer.weight is base.weight and layer.bias is base.bias  # no copy of the frozen weight
    assert layer.fan_in_fan_out == conv and layer.in_features == 20 and layer.out_features == 12
    assert keys <= set(layer.state_dict())  # the base's keys and layout are unchanged
    x = torch.randn(3, 20)
    assert torch.equal(layer(x), base(x))
    back = layer.to_base_layer()
    assert type(back) is type(base) and back.weight is base.weight and torch.equal(back(x), base(x))


def test_from_linear_refuses_other_layers():
    with pytest.raises(TypeError, match="Embedding"):
        LoRA2Linear.from_linear(nn.Embedding(10, 4))
    with pytest.raises(TypeError, match="Conv2d"):
        LoRA2Linear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="already a LoRA2Linear"):
        LoRA2Linear.from_linear(LoRA2Linear(4, 4))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r=0 must be an integer >= 1"), ({"k": 2.5}, "k=2.5 must be an integer"),
    ({"alpha": float("nan")}, "alpha=nan"), ({"dropout": 1.0}, "dropout=1.0"), ({"init": "kaiming"}, "init='kaiming'"),
    ({"init_std": 0}, "init_std=0"), ({"backend": "cuda"}, "backend='cuda' must be one of"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRA2Linear(4, 4, **kwargs)


# --- the method --------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(in_f=st.integers(1, 40), out_f=st.integers(1, 40), r=st.integers(1, 12), k=st.integers(1, 12),
       conv=st.booleans(), pruned=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_forward_equals_the_papers_formula(in_f, out_f, r, k, conv, pruned, seed):
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f)
    layer = _adapted(base, r=r, k=k, alpha=8.0, seed=seed)
    mask = torch.ones(r)
    mask[: min(pruned, r - 1)] = 0
    layer.set_rank_mask(mask)
    x = torch.randn(5, in_f)
    dense = _paper_delta(layer, scale=8.0 / r)  # α / r: constant, the paper's scale
    assert _rel(layer(x), base(x).double() + x.double() @ dense.T) < 1e-5
    assert _rel(layer.delta_weight(), dense) < 1e-5


def test_scale_by_kept_is_alpha_over_kept_values():
    layer = _adapted(nn.Linear(10, 6), r=4, k=3, alpha=8.0, scale_by_kept=True)
    layer.set_rank_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    x = torch.randn(3, 10)
    dense = _paper_delta(layer, scale=8.0 / 2)
    assert _rel(layer(x), layer.to_base_layer()(x).double() + x.double() @ dense.T) < 1e-5


def test_forward_never_materialises_delta_weight(monkeypatch):
    layer = _adapted(nn.Linear(64, 48), r=8, k=4)
    monkeypatch.setattr(LoRA2Linear, "delta_weight", lambda self: pytest.fail("forward built ΔW"))
    big = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        if out.dim() == 2 and out.shape == (48, 64):
            big.append(out.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    layer(torch.randn(2, 64)).sum().backward()
    assert not big, "an out × in product was built"


@pytest.mark.parametrize("conv", [False, True])
def test_every_gradient_matches_the_reference_formulas(conv):
    """Autograd through the layer equals reference.lora_linear_backward → up_backward → core_backward."""
    base = Conv1D(9, 11) if conv else nn.Linear(11, 9)
    layer = _adapted(base, r=5, k=3, alpha=4.0).double()
    layer.set_rank_mask(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    x = torch.randn(2, 7, 11, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    scale = 4.0 / 5
    core = reference.core(layer.singular_values, layer.rank_mask, layer.q_up, layer.p_down, scale)
    up = layer.p_up @ core
    _, hidden = reference.lora_linear_forward(x, layer.weight, layer.bias, layer.q_down, up, conv)
    grad_x, _, _, grad_down, grad_up = reference.lora_linear_backward(grad_y, x, layer.weight, layer.q_down, up,
                                                                      hidden, conv)
    grad_p_up, grad_core = reference.up_backward(grad_up, layer.p_up, core)
    grad_lambda, grad_q_up, grad_p_down = reference.core_backward(grad_core, layer.singular_values, layer.rank_mask,
                                                                  layer.q_up, layer.p_down, scale)
    for got, expected in ((x.grad, grad_x), (layer.q_down.grad, grad_down), (layer.p_up.grad, grad_p_up),
                          (layer.singular_values.grad, grad_lambda), (layer.q_up.grad, grad_q_up),
                          (layer.p_down.grad, grad_p_down)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert layer.singular_values.grad[2] == 0 and layer.singular_values.grad[4] == 0  # masked: no gradient
    assert layer.weight.grad is None  # frozen


def test_unfrozen_weight_and_bias_get_their_gradients():
    layer = _adapted(nn.Linear(6, 4), r=2, k=2).double()
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    y = torch.nn.functional.linear(x, layer.weight.detach() + layer.delta_weight().double().detach(),
                                   layer.bias.detach())
    torch.testing.assert_close(layer.weight.grad, (2 * y).t() @ x)
    torch.testing.assert_close(layer.bias.grad, (2 * y).sum(0))


def test_fully_pruned_module_is_the_base_layer():
    layer = _adapted(nn.Linear(8, 8))
    layer.set_rank_mask(torch.zeros(4))
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), layer.to_base_layer()(x), rtol=0, atol=1e-6)
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.singular_values.grad) == 0


# --- merge, enable ------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True])
def test_merge_unmerge_round_trip(conv):
    base = Conv1D(12, 20) if conv else nn.Linear(20, 12)
    layer = _adapted(base, std=0.2)  # trained-adapter magnitudes: |ΔW| ~ 1e-2, fp32 round-off ~ 1e-9
    assert layer.delta_weight().abs().max() > 1e-3
    w0 = base.weight.detach().clone()
    x = torch.randn(7, 20)
    adapted = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.merge()  # idempotent: ΔW is never added twice
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert (base.weight - w0).abs().max() < 1e-6
    layer.unmerge()  # guarded: no-op
    assert (base.weight - w0).abs().max() < 1e-6


def test_disabling_a_merged_adapter_unmerges_it(caplog):
    layer = _adapted(nn.Linear(10, 6), std=0.3)
    x = torch.randn(3, 10)
    base_out = layer.to_base_layer()(x).detach()
    layer.merge()
    layer.adapter_enabled = False
    assert not layer.merged
    torch.testing.assert_close(layer(x), base_out, rtol=1e-5, atol=1e-6)
    layer.adapter_enabled = True
    assert _rel(layer(x), base_out) > 1e-3


# --- dtypes, autocast ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base(dtype):
    base = nn.Linear(32, 16).to(dtype)
    layer = _adapted(base, std=0.3)
    x = torch.randn(4, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = base(x).double() + x.double() @ _paper_delta(layer, 2.0).T
    assert _rel(y, ref) < 2e-2
    y.float().sum().backward()
    assert layer.q_down.grad is not None and layer.q_down.grad.dtype == torch.float32


def test_autocast_bf16_computes_like_f_linear_under_autocast():
    layer = _adapted(nn.Linear(32, 16), std=0.3)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base = layer.to_base_layer()(x)
    assert y.dtype == torch.bfloat16 == base.dtype
    assert _rel(y, base.double() + x.double() @ _paper_delta(layer, 2.0).T) < 2e-2


# --- backends -------------------------------------------------------------------------------------------


def test_auto_backend_uses_the_reference_on_cpu_and_forced_triton_explains(monkeypatch):
    layer = _adapted(nn.Linear(8, 4))
    x = torch.randn(2, 8)
    assert layer.resolve_backend(x) == ("reference", "cpu tensors; the fused kernels run on CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer.backend = "triton"
    with pytest.raises(RuntimeError, match=r"backend='triton'\) cannot run this call: the Triton kernels run on CUDA"):
        layer(x)


def test_dropout_runs_in_the_fused_kernels():
    """Adapter dropout no longer sends a layer to the reference path: backend='triton' takes it (under
    the interpreter here), and the kernels' plan is what 'auto' picks on a GPU."""
    from conftest import KERNEL_DEVICE

    layer = _adapted(nn.Linear(8, 4), dropout=0.5, backend="triton").to(KERNEL_DEVICE)
    layer.train()
    x = torch.randn(2, 8, device=KERNEL_DEVICE)
    assert layer.resolve_backend(x) == ("triton", None)
    layer(x).sum().backward()
    assert layer.q_down.grad is not None


def test_dropout_applies_to_the_adapter_input_only():
    layer = _adapted(nn.Linear(8, 4), dropout=0.5)
    layer.set_rank_mask(torch.zeros(4))  # no adapter term: the output must be the undropped base output
    layer.train()
    x = torch.randn(50, 8)
    torch.testing.assert_close(layer(x), layer.to_base_layer()(x))


def test_cuda_fallback_is_logged_once(monkeypatch, caplog):
    """On a GPU, a layer the kernels cannot take says why (once); never a silent slow path."""
    from lora2_kernels import linear

    layer = _adapted(nn.Linear(8, 4))
    monkeypatch.setattr(linear.ops, "triton_unsupported", lambda *args: "a reason the test made up")
    monkeypatch.setattr(linear, "_on_gpu", lambda x: True)
    linear._warned.clear()
    with caplog.at_level(logging.WARNING, logger="lora2_kernels.linear"):
        layer(torch.randn(2, 8))
        layer(torch.randn(2, 8))
    messages = [r.getMessage() for r in caplog.records if "a reason the test made up" in r.getMessage()]
    assert len(messages) == 1 and "reference path" in messages[0]
