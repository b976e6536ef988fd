"""Property tests over the config space and module shapes: on valid input, construction, forward,
backward, merge, allocator step and save/load never fail and stay consistent; on invalid input the
only outcome is a ValueError."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora2 import LoRA2Config, LoRA2Model, get_lora2_model
from lora2.allocator import RankAllocator


class TwoLayerNet(nn.Module):
    """Linear (or GPT-2 Conv1D) → GELU → Linear → head: both adapted module types, with a saved head."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, conv: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = Conv1D(d_hidden, d_in) if conv else nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out)
        self.classifier = nn.Linear(d_out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.down(torch.nn.functional.gelu(self.up(x))))


config_values = dict(
    r=st.integers(-1, 10), k=st.integers(-1, 10), target_rank=st.integers(-1, 11),
    alpha=st.floats(-2, 64) | st.just(math.nan), dropout=st.floats(-0.5, 1.0),
    init=st.sampled_from(["orthogonal", "normal", "kaiming"]),
)
shapes = dict(d_in=st.integers(1, 24), d_hidden=st.integers(1, 24), d_out=st.integers(1, 24), conv=st.booleans(),
              seed=st.integers(0, 2**16))


def _valid(r, k, target_rank, alpha, dropout, init) -> bool:
    return (r >= 1 and k >= 1 and 1 <= target_rank <= r and alpha > 0 and 0 <= dropout < 1
            and init in ("orthogonal", "normal"))


def _randomize(model: LoRA2Model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora2_layers().values():
            for p in (layer.q_down, layer.q_up, layer.singular_values, layer.p_down, layer.p_up):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**config_values, **shapes)
def test_valid_configs_work_end_to_end_and_invalid_ones_raise_value_error(
        r, k, target_rank, alpha, dropout, init, d_in, d_hidden, d_out, conv, seed):
    fields = dict(r=r, k=k, target_rank=target_rank, alpha=alpha, dropout=dropout, init=init,
                  target_modules=["up", "down"], total_steps=8, init_warmup=1, final_warmup=2, mask_interval=1,
                  beta1=0.9, beta2=0.5)
    if not _valid(r, k, target_rank, alpha, dropout, init):
        with pytest.raises(ValueError):
            get_lora2_model(TwoLayerNet(d_in, d_hidden, d_out, conv, seed), LoRA2Config(**fields))
        return

    model = get_lora2_model(TwoLayerNet(d_in, d_hidden, d_out, conv, seed), LoRA2Config(**fields))
    _randomize(model, seed)
    x = torch.randn(3, 2, d_in)
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    for layer in model.lora2_layers().values():
        for p in (layer.q_down, layer.q_up, layer.singular_values, layer.p_down, layer.p_up):
            assert p.grad is not None and torch.isfinite(p.grad).all()

    allocator = RankAllocator(model.lora2_layers(), model.lora2_config)
    for step in range(1, 9):
        allocator.step(step)
    # the schedule ends (step total − final_warmup = 6) at exactly target_rank × modules, enforced by the masks
    assert allocator.current_budget() == allocator.target_budget == 2 * target_rank
    assert sum(len(v) for v in model.rank_pattern().values()) == 2 * target_rank

    model.eval()
    with torch.no_grad():
        adapted = model(x)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
        assert torch.allclose(merged, adapted, rtol=1e-4, atol=1e-4)
        assert torch.allclose(model(x), adapted, rtol=1e-5, atol=1e-5)

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = LoRA2Model.from_pretrained(TwoLayerNet(d_in, d_hidden, d_out, conv, seed), directory)
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), adapted)
        assert loaded.rank_pattern() == model.rank_pattern()


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 16), d_out=st.integers(1, 16), r=st.integers(1, 6), k=st.integers(1, 6))
def test_unsupported_layer_types_are_named(d_in, d_out, r, k):
    model = nn.ModuleDict({"embed": nn.Embedding(d_in + 1, d_out), "conv": nn.Conv2d(d_in, d_out, 1)})
    for name, kind in (("embed", "Embedding"), ("conv", "Conv2d")):
        with pytest.raises(ValueError, match=rf"{name} \({kind}\)"):
            get_lora2_model(model, LoRA2Config(r=r, k=k, target_rank=1, target_modules=[name]))
