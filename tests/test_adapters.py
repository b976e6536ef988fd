"""Several LoRA² adapters over one frozen base, one launch each way for all of them (issue "many adapters",
the kernels): every factor stacked (adapters, ...), and a segment table that says which rows of the batch
are whose. Each adapter's rows and gradients are held to the float64 oracle of that adapter alone
(test_triton_kernels.oracle: the dense formula, nothing shared with the kernels); the reference path is the
kernels' twin; the launch count does not grow with the adapters.

The segments cross the interpreter's 32-row tiles, start mid-tile, and one adapter has no rows at all.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE
from lora2_kernels.triton_kernels import lora_linear as kernels
from test_triton_kernels import (
    ALPHA,
    PARAMS,
    _dtype_id,
    _max_err,
    assert_matches_oracle,
    make_layer,
    oracle,
    tolerances,
)
from torch import nn

from lora2_kernels import LoRA2Linear, ops

ROWS = [37, 0, 70]  # adapter 1 has no rows this batch; adapter 2 starts mid-tile
MASKS = [[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]]


def make_adapters(count=3, dtype=torch.float32):
    """Raw float64 parameters of ``count`` adapters sharing the first one's W and b (rounded to ``dtype``)."""
    raws = [make_layer(r=6, k=5, dtype=dtype, mask=MASKS[i % len(MASKS)], seed=i)[1] for i in range(count)]
    for raw in raws[1:]:
        raw["weight"], raw["bias"] = raws[0]["weight"], raws[0]["bias"]
    return raws


def segments_of(rows: list[int]) -> torch.Tensor:
    bounds = [0]
    for n in rows:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=KERNEL_DEVICE)


def run_adapters(raws, x, grad_y, dtype, rows=ROWS, dropout=0.0, seed=None, backend="triton"):
    """[y, dx, dA₁, dB₁, dλ, dA₂, dB₂] of the stacked layer (the factor gradients stacked)."""
    factors = [torch.stack([raw[n].float() for raw in raws]).to(KERNEL_DEVICE).requires_grad_() for n in PARAMS]
    masks = torch.stack([raw["mask"].float() for raw in raws]).to(KERNEL_DEVICE)
    x = x.detach().to(KERNEL_DEVICE, dtype).requires_grad_()
    y = ops.lora2_linear(x, raws[0]["weight"].to(KERNEL_DEVICE, dtype), raws[0]["bias"].to(KERNEL_DEVICE, dtype),
                         *factors, masks, ALPHA, dropout_p=dropout, backend=backend, seed=seed,
                         segments=segments_of(rows))
    y.backward(grad_y.to(KERNEL_DEVICE, dtype))
    return [y.detach(), x.grad] + [f.grad for f in factors]


def inputs(raws, rows=ROWS, seed=1):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = raws[0]["weight"].shape
    return torch.randn(sum(rows), in_f, generator=g), torch.randn(sum(rows), out_f, generator=g)


def assert_each_adapter_matches_its_oracle(got, raws, x, grad_y, dtype, rows=ROWS, keep=None, p=0.0):
    start = 0
    for i, (raw, n) in enumerate(zip(raws, rows)):
        own = slice(start, start + n)
        start += n
        if n == 0:  # no rows: no gradient, and nothing else written
            assert all(torch.count_nonzero(g[i]) == 0 for g in got[2:]), f"adapter {i} has no rows but a gradient"
            continue
        x_i, dy_i = x[own].to(dtype), grad_y[own].to(dtype)
        keep_i = keep[own] if keep is not None else None
        expected = oracle(raw, x_i, dy_i, keep_i, p)
        mine = [got[0][own], got[1][own], *(g[i] for g in got[2:])]
        assert_matches_oracle(mine, expected, tolerances(raw, x_i, dy_i, dtype, expected, keep_i, p), f"adapter {i}")


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_each_adapter_matches_the_oracle_of_that_adapter_alone(dtype, groups, monkeypatch):
    """One launch each way for three adapters: each adapter's rows of y and dX, and its factors' gradients,
    are what that adapter alone computes on those rows (float64 oracle), with one or several column groups."""
    monkeypatch.setattr(kernels, "INTERPRETER_COLUMN_GROUPS", groups)
    raws = make_adapters(dtype=dtype)
    x, grad_y = inputs(raws)
    got = run_adapters(raws, x, grad_y, dtype)
    assert_each_adapter_matches_its_oracle(got, raws, x, grad_y, dtype)


def test_dropout_with_adapters_matches_the_oracle_given_the_same_mask():
    """Dropout's keep mask is drawn per row of the whole batch (Philox at the row's index), whoever's row it is."""
    raws = make_adapters()
    x, grad_y = inputs(raws)
    p, seed = 0.25, torch.tensor([11], dtype=torch.int64, device=KERNEL_DEVICE)
    got = run_adapters(raws, x, grad_y, torch.float32, dropout=p, seed=seed)
    keep = kernels.dropout_keep_mask(seed, x.shape[0], x.shape[1], p, KERNEL_DEVICE).cpu()
    assert_each_adapter_matches_its_oracle(got, raws, x, grad_y, torch.float32, keep=keep, p=p)


def test_one_adapter_stacked_is_todays_layer_and_adapters_add_no_launch(monkeypatch):
    """One adapter stacked with its segment computes what the unstacked layer computes, bit for bit; and the
    launches of a step (forward, dX, finish; the cast for bf16 inputs) are as many for 3 adapters as for 1."""
    monkeypatch.setenv("LORA2_BASE_GEMM", "fused")  # on a GPU: no timing runs of the cuBLAS split in the count
    counted = []
    original = kernels.Launch.run
    monkeypatch.setattr(kernels.Launch, "run", lambda launch: counted.append(launch.kernel) or original(launch))
    raws = make_adapters(dtype=torch.bfloat16)
    x, grad_y = inputs(raws)
    stacked = run_adapters(raws[:1], x, grad_y, torch.bfloat16, rows=[x.shape[0]])
    one_stacked = list(counted)
    counted.clear()
    xb = x.to(KERNEL_DEVICE, torch.bfloat16).requires_grad_()
    factors = [raws[0][n].float().to(KERNEL_DEVICE).requires_grad_() for n in PARAMS]
    y = ops.lora2_linear(xb, raws[0]["weight"].to(KERNEL_DEVICE, torch.bfloat16),
                         raws[0]["bias"].to(KERNEL_DEVICE, torch.bfloat16), *factors,
                         raws[0]["mask"].float().to(KERNEL_DEVICE), ALPHA)
    y.backward(grad_y.to(KERNEL_DEVICE, torch.bfloat16))
    single = list(counted)
    for a, b in zip(stacked, [y, xb.grad] + [f.grad for f in factors]):
        assert torch.equal(a.squeeze(0) if a.dim() > b.dim() else a, b)
    counted.clear()
    run_adapters(raws, x[:sum(ROWS)], grad_y[:sum(ROWS)], torch.bfloat16)
    assert single == one_stacked == counted == ["cast", "forward", "dx", "finish"]


def test_the_reference_path_is_the_kernels_twin():
    """backend="reference" runs each segment through its adapter in plain autograd: the kernels' numbers."""
    raws = make_adapters()
    x, grad_y = inputs(raws)
    kernel = run_adapters(raws, x, grad_y, torch.float32)
    reference = run_adapters(raws, x, grad_y, torch.float32, backend="reference")
    for name, a, b in zip(("y", "dx", *PARAMS), kernel, reference):
        assert _max_err(a, b) <= 1e-4 * (1 + float(b.abs().max())), name


def test_adapters_through_the_custom_ops_opcheck_and_compile_fullgraph():
    """The custom ops take the segments (opcheck: schema, fakes with stacked factors, autograd), and inductor
    compiles a layer over them without a graph break, forward and backward equal to eager."""
    raws = make_adapters(dtype=torch.bfloat16)
    x, grad_y = inputs(raws)
    factors = [torch.stack([raw[n].float() for raw in raws]).to(KERNEL_DEVICE) for n in PARAMS]
    masks = torch.stack([raw["mask"].float() for raw in raws]).to(KERNEL_DEVICE)
    weight = raws[0]["weight"].to(KERNEL_DEVICE, torch.bfloat16)
    bias = raws[0]["bias"].to(KERNEL_DEVICE, torch.bfloat16)
    segments = segments_of(ROWS)
    xb = x.to(KERNEL_DEVICE, torch.bfloat16)
    args = (xb, weight, bias, *factors, masks, ALPHA, False, False, 0.0, None, None, None, None, None, None, 0, 256, 0,
            segments)
    torch.library.opcheck(torch.ops.lora2.lora2_linear.default, args)

    def step(fn):
        leaves = [f.clone().requires_grad_() for f in factors]
        inp = xb.clone().requires_grad_()
        y = fn(inp, *leaves)
        y.backward(grad_y.to(KERNEL_DEVICE, torch.bfloat16))
        return [y.detach(), inp.grad] + [f.grad for f in leaves]

    def layer(inp, *leaves):
        return ops.lora2_linear(inp, weight, bias, *leaves, masks, ALPHA, segments=segments)

    eager = step(layer)
    torch._dynamo.reset()
    compiled = step(torch.compile(layer, fullgraph=True, backend="inductor"))
    for name, a, b in zip(("y", "dx", *PARAMS), compiled, eager):
        assert torch.equal(a, b), f"compiled {name} differs from eager"


def test_misfit_adapters_are_refused_with_the_fix():
    raws = make_adapters()
    x = torch.randn(sum(ROWS), 70, device=KERNEL_DEVICE)
    weight, bias = raws[0]["weight"].float().to(KERNEL_DEVICE), raws[0]["bias"].float().to(KERNEL_DEVICE)
    stacked = [torch.stack([raw[n].float() for raw in raws]).to(KERNEL_DEVICE) for n in PARAMS]
    masks = torch.stack([raw["mask"].float() for raw in raws]).to(KERNEL_DEVICE)
    with pytest.raises(ValueError, match="3 adapters need segments"):
        ops.lora2_linear(x, weight, bias, *stacked, masks, ALPHA)
    with pytest.raises(ValueError, match="int32 tensor of 4 row offsets"):
        ops.lora2_linear(x, weight, bias, *stacked, masks, ALPHA, segments=segments_of(ROWS).long())
    with pytest.raises(ValueError, match="not every factor is stacked alike: rank_mask"):
        ops.lora2_linear(x, weight, bias, *stacked, masks[0], ALPHA, segments=segments_of(ROWS))
    with pytest.raises(ValueError, match="segments are for several adapters"):
        ops.lora2_linear(x, weight, bias, *(s[0] for s in stacked), masks[0], ALPHA, segments=segments_of(ROWS))


# --- the layer: LoRA2Linear(adapters=N) ------------------------------------------------------------------


def _trained_looking(layer: nn.Module, seed: int = 0) -> None:
    """Nonzero λ and a partial mask in every adapter, so each adapter's ΔW differs and shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.singular_values.copy_(torch.randn(layer.singular_values.shape, generator=g) + 2.0)
        mask = (torch.rand(layer.rank_mask.shape, generator=g) > 0.3).float()
        layer.set_rank_mask(mask.to(layer.rank_mask.device))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_layer_of_three_adapters_is_three_layers_on_their_rows(backend):
    """LoRA2Linear(adapters=3) over (sequences, tokens, features) input: each adapter's sequences come out as
    that adapter alone computes them (select_adapter), and each adapter's gradients are that layer's."""
    torch.manual_seed(0)
    layer = LoRA2Linear(40, 24, r=4, k=4, adapters=3, backend=backend).to(KERNEL_DEVICE)
    _trained_looking(layer)
    sequences = [2, 0, 3]
    x = torch.randn(sum(sequences), 7, 40, device=KERNEL_DEVICE, requires_grad=True)
    layer.set_adapter_rows(sequences)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    start = 0
    for i, n in enumerate(sequences):
        own = slice(start, start + n)
        start += n
        alone = layer.select_adapter(i)
        x_i = x[own].detach().clone().requires_grad_()
        y_i = alone(x_i)
        y_i.backward(grad_y[own])
        torch.testing.assert_close(y[own], y_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad[own], x_i.grad, rtol=1e-5, atol=1e-5)
        for name in PARAMS:
            torch.testing.assert_close(getattr(layer, name).grad[i], getattr(alone, name).grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, i=i: f"adapter {i} {name}: {m}")


def test_several_adapters_keep_the_state_dict_keys_stacked_and_one_adapter_is_unchanged():
    single = LoRA2Linear(40, 24, r=4, k=3)
    many = LoRA2Linear(40, 24, r=4, k=3, adapters=3)
    assert list(single.state_dict()) == list(many.state_dict())
    for key, value in single.state_dict().items():
        if key in ("weight", "bias", "merged"):
            assert many.state_dict()[key].shape == value.shape
        else:
            assert many.state_dict()[key].shape == (3, *value.shape), key
    assert many.adapter_parameter_count() == 3 * single.adapter_parameter_count()
    assert single.select_adapter(0).state_dict().keys() == single.state_dict().keys()
    for i in range(3):  # each adapter's orthonormal init is its own
        q = many.q_down[i].detach()
        torch.testing.assert_close(q @ q.T, torch.eye(3), atol=1e-5, rtol=0)


def test_several_adapters_refuse_a_batch_nobody_split_and_one_adapters_operations():
    layer = LoRA2Linear(40, 24, r=4, k=3, adapters=2, backend="reference")
    x = torch.randn(5, 40)
    with pytest.raises(RuntimeError, match="no one said which rows of the batch are whose"):
        layer(x)
    layer.set_adapter_rows([2, 2])
    with pytest.raises(ValueError, match="add up to 4"):
        layer(x)
    layer.set_adapter_rows([5])
    with pytest.raises(ValueError, match="split 1 ways"):
        layer(x)
    with pytest.raises(RuntimeError, match=r"select_adapter\(i\)"):
        layer.merge()
    with pytest.raises(ValueError, match="adapters=0"):
        LoRA2Linear(40, 24, adapters=0)


def test_a_compiled_layer_of_adapters_follows_each_batchs_split():
    """inductor, fullgraph, over a 3-adapter layer: forward and gradients equal eager's, and a new row split
    (another batch) is taken, not a stale one baked into the graph."""
    torch.manual_seed(0)
    layer = LoRA2Linear(40, 24, r=4, k=4, adapters=3, backend="triton").to(KERNEL_DEVICE)
    _trained_looking(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = torch.randn(6, 5, 40, device=KERNEL_DEVICE)
    results = []
    for split in ([2, 1, 3], [3, 3, 0]):
        layer.set_adapter_rows(split)
        for module in (layer, compiled):
            layer.zero_grad()
            y = module(x)
            y.square().sum().backward()
            results.append([y.detach(), *(getattr(layer, n).grad.clone() for n in PARAMS)])
    for eager, got in (results[0:2], results[2:4]):
        assert all(torch.equal(a, b) for a, b in zip(eager, got))
    assert not torch.equal(results[0][0], results[2][0])  # the split matters
