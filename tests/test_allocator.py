"""Rank allocator and orthogonality regulariser."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_model, randomize_adapters
from torch import nn

from lora2 import LoRA2Config, get_lora2_model
from lora2.allocator import RankAllocator
from lora2.layer import Lora2Linear
from lora2.regularizer import OrthogonalRegularizer


def _setup(total=40, init=5, final=10, interval=3, r=4, target=2, family="bert"):
    cfg = LoRA2Config(r=r, k=2, target_rank=target, init_warmup=init, final_warmup=final, mask_interval=interval)
    model = get_lora2_model(make_model(family), cfg)
    randomize_adapters(model, scale=0.3)
    return model, RankAllocator(model.lora2_layers(), cfg, total_steps=total)


def _backward(model, seed):
    model.train()
    model.zero_grad()
    model(**batch(seed), labels=torch.tensor([0, 1, 1])).loss.backward()


def test_budget_follows_cubic_schedule_exactly():
    model, alloc = _setup()
    m = len(model.lora2_layers())
    start, end = 4 * m, 2 * m
    for step in range(1, 41):
        budget, remask = alloc.budget_at(step)
        if step <= 5:
            assert (budget, remask) == (start, False)
        elif step > 30:
            assert (budget, remask) == (end, False)
        else:
            expected = int(end + (start - end) * (1 - (step - 5) / 25) ** 3)
            assert budget == expected
            assert remask == (step % 3 == 0 or step == 30)
    assert alloc.budget_at(30)[0] == end


def test_training_applies_budget_and_freezes_pattern():
    model, alloc = _setup()
    patterns = {}
    for step in range(1, 41):
        _backward(model, step)
        budget = alloc.step(step)
        kept = alloc.current_budget()
        scheduled, remask = alloc.budget_at(step)
        if remask:
            assert kept == scheduled == budget
        patterns[step] = model.rank_pattern()
    assert alloc.current_budget() == alloc.target_budget
    assert all(patterns[s] == patterns[30] for s in range(30, 41))  # frozen in the final warm-up


def test_lowest_scores_are_masked():
    model, alloc = _setup()
    _backward(model, 0)
    alloc.update_importance()
    scores = alloc.scores().clone()
    budget = alloc.initial_budget - 7
    masks = alloc.mask_to_budget(budget)
    kept_scores, dropped_scores = scores[masks == 1], scores[masks == 0]
    assert masks.sum() == budget
    assert kept_scores.min() >= dropped_scores.max()


def test_masked_values_stay_zero_and_masked():
    model, alloc = _setup(init=0, final=0, interval=1, total=20)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ever_masked: dict[str, set[int]] = {}
    for step in range(1, 21):
        _backward(model, step)
        optimizer.step()
        alloc.step(step)
        for name, layer in model.lora2_layers().items():
            masked = set(range(layer.r)) - set(layer.kept_indices())
            assert ever_masked.get(name, set()) <= masked, "a pruned singular value came back"
            ever_masked[name] = masked
            assert torch.all(layer.singular_values[list(masked)] == 0)


def test_scores_use_only_the_small_factors():
    model, alloc = _setup()
    _backward(model, 0)
    for layer in model.lora2_layers().values():  # poison the big factors: the scores must not see them
        layer.q_down.grad.fill_(float("nan"))
        layer.p_up.grad.fill_(float("nan"))
        layer.q_down.data.fill_(float("nan"))
        layer.p_up.data.fill_(float("nan"))
    alloc.update_importance()
    assert torch.isfinite(alloc.scores()).all()
    m, r, k = len(model.lora2_layers()), 4, 2
    assert {k_: tuple(v.shape) for k_, v in alloc.state.items()} == {
        "ema_lambda": (m, r), "unc_lambda": (m, r), "ema_b1": (m, r, k), "unc_b1": (m, r, k),
        "ema_a2": (m, k, r), "unc_a2": (m, k, r)}


def test_score_formula_matches_adalora_definition():
    model, alloc = _setup()
    cfg = model.lora2_config
    layers = list(model.lora2_layers().values())
    ema = {id(p): torch.zeros_like(p) for l in layers for p in (l.singular_values, l.q_up, l.p_down)}
    unc = {k: torch.zeros_like(v) for k, v in ema.items()}
    for step in range(3):
        _backward(model, step)
        alloc.update_importance()
        for l in layers:
            for p in (l.singular_values, l.q_up, l.p_down):
                i = (p * p.grad).abs()
                ema[id(p)] = cfg.beta1 * ema[id(p)] + (1 - cfg.beta1) * i
                unc[id(p)] = cfg.beta2 * unc[id(p)] + (1 - cfg.beta2) * (i - ema[id(p)]).abs()
    s = lambda p: ema[id(p)] * unc[id(p)]  # noqa: E731
    expected = torch.stack([s(l.singular_values) + s(l.q_up).mean(1) + s(l.p_down).mean(0) for l in layers])
    torch.testing.assert_close(alloc.scores(), expected, rtol=1e-5, atol=1e-12)


def test_allocator_state_round_trip():
    model, alloc = _setup()
    _backward(model, 0)
    alloc.update_importance()
    other = RankAllocator(model.lora2_layers(), model.lora2_config, total_steps=40)
    other.load_state_dict(alloc.state_dict())
    assert torch.equal(other.scores(), alloc.scores())
    with pytest.raises(ValueError, match="wrong shape"):
        other.load_state_dict({k: v[:1] for k, v in alloc.state_dict().items()})


def test_allocator_needs_total_steps_that_fit_warmups():
    model = get_lora2_model(make_model("bert"), LoRA2Config(init_warmup=10, final_warmup=10))
    with pytest.raises(ValueError, match="needs total_steps"):
        RankAllocator(model.lora2_layers(), model.lora2_config)
    with pytest.raises(ValueError, match="total_steps must be larger than init_warmup"):
        RankAllocator(model.lora2_layers(), model.lora2_config, total_steps=15)


# --- regulariser --------------------------------------------------------------------------------


def _orthonormal_layer(n: int, r: int, k: int, cross_orthogonal: bool) -> Lora2Linear:
    layer = Lora2Linear(nn.Linear(n, n), r=r, k=k, alpha=1.0)
    eye = torch.eye(max(n, r))
    with torch.no_grad():
        layer.q_down.copy_(eye[:k, :n])              # A₁ rows e_0..e_{k-1}
        layer.q_up.copy_(eye[:r, :k])                # B₁ columns e_0..e_{k-1}
        layer.p_down.copy_(eye[:k, :r])              # A₂ rows e_0..e_{k-1}
        shift = k if cross_orthogonal else 0         # B₂ columns: outside or inside A₁'s rows
        layer.p_up.copy_(eye[:n, shift:shift + k])
    return layer


def test_regulariser_zero_for_orthonormal_and_orthogonal_planes():
    layers = [_orthonormal_layer(8, 4, 2, cross_orthogonal=True) for _ in range(3)]
    reg = OrthogonalRegularizer(layers)
    assert float(reg().detach()) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        terms = OrthogonalRegularizer([_orthonormal_layer(8, 4, 2, cross_orthogonal=False)]).terms()
    assert float(terms["cross"]) > 0.5  # same read and write plane
    assert all(float(terms[t]) == pytest.approx(0.0, abs=1e-7) for t in ("a1", "b1", "a2", "b2"))


def test_regulariser_matches_dense_definition_and_has_gradients():
    torch.manual_seed(0)
    layers = [Lora2Linear(nn.Linear(6, 6), 4, 3, 1.0, init="normal", init_std=0.5),
              Lora2Linear(nn.Linear(6, 10), 4, 3, 1.0, init="normal", init_std=0.5),
              Lora2Linear(nn.Linear(10, 6), 4, 3, 1.0, init="normal", init_std=0.5)]
    value = OrthogonalRegularizer(layers)()
    eye = torch.eye(3)
    expected = 0.0
    for l in layers:
        expected += torch.linalg.norm(l.q_down @ l.q_down.T - eye) + torch.linalg.norm(l.q_up.T @ l.q_up - eye)
        expected += torch.linalg.norm(l.p_down @ l.p_down.T - eye) + torch.linalg.norm(l.p_up.T @ l.p_up - eye)
        if l.in_features == l.out_features:
            q, p = l.q_up @ l.q_down, l.p_up @ l.p_down
            expected += torch.linalg.norm(q @ p)
    torch.testing.assert_close(value, expected / 3)
    value.backward()
    for l in layers:
        for name in ("q_down", "q_up", "p_down", "p_up"):
            g = getattr(l, name).grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_regulariser_is_added_to_training_loss_only():
    model = get_lora2_model(make_model("bert"), LoRA2Config(orth_reg_weight=0.5, init="normal"))
    labels = torch.tensor([0, 1, 1])
    model.eval()
    plain = model(**batch(), labels=labels).loss
    model.train()
    torch.manual_seed(0)
    model.base_model.eval()  # no dropout, so the only difference is the regulariser
    model.training = True
    regularised = model(**batch(), labels=labels).loss
    assert float((regularised - plain).detach()) == pytest.approx(0.5 * float(model.orthogonal_regularizer()().detach()), rel=1e-4)
