"""Rank allocator (both pruning semantics) and orthogonality regulariser."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import batch, make_model, randomize_adapters
from torch import nn

from lora2 import LoRA2Config, get_lora2_model
from lora2.allocator import RankAllocator
from lora2.regularizer import OrthogonalRegularizer
from lora2_kernels import LoRA2Linear


def _setup(total=40, init=5, final=10, interval=3, r=4, target=2, family="bert", pruning="adalora"):
    # β₁ ≠ β₂ (the defaults are equal): a swap of the two EMAs must change the scores
    cfg = LoRA2Config(r=r, k=2, target_rank=target, init_warmup=init, final_warmup=final, mask_interval=interval,
                      pruning=pruning, beta1=0.9, beta2=0.5)
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


@pytest.mark.parametrize("pruning", ["adalora", "monotone"])
def test_real_training_ends_at_exactly_the_target_budget(pruning):
    """After real gradients and AdamW steps: every masking keeps exactly the scheduled budget, and the
    run ends with target_rank × modules values enforced and a frozen pattern."""
    model, alloc = _setup(pruning=pruning)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    patterns = {}
    for step in range(1, 41):
        _backward(model, step)
        optimizer.step()
        budget = alloc.step(step)
        scheduled, remask = alloc.budget_at(step)
        assert budget == scheduled
        if remask:
            assert alloc.current_budget() == scheduled
        patterns[step] = model.rank_pattern()
    m = len(model.lora2_layers())
    assert alloc.current_budget() == alloc.target_budget == 2 * m
    assert int(alloc.masks().sum()) == 2 * m  # enforced in the forward for the final warm-up
    assert all(patterns[s] == patterns[30] for s in range(30, 41))
    for layer in model.lora2_layers().values():  # pruned values stayed exactly zero while enforced
        assert torch.all(layer.singular_values[layer.rank_mask == 0] == 0)


def _replayed_kept_set(history: list[list[tuple[torch.Tensor, ...]]], beta1: float, beta2: float, budget: int,
                       steps: int) -> set[tuple[int, int]]:
    """The paper's rules, written out again from the recorded (λ, ∇λ, B₁, ∇B₁, A₂, ∇A₂) of every module at each
    scoring step (the first ``steps`` of them): Ī ← β₁Ī + (1−β₁)|θ∇θ|, Ū ← β₂Ū + (1−β₂)|I − Ī|, s = Ī·Ū;
    score_i = s(λ_i) + mean_j s(B₁[i, j]) + mean_j s(A₂[j, i]); keep the ``budget`` highest, over all modules."""
    scores = []
    for module in range(len(history[0])):
        averages = None
        for record in history[:steps]:
            sensitivity = [(theta * grad).abs().double() for theta, grad in zip(record[module][::2],
                                                                                   record[module][1::2])]
            if averages is None:
                averages = [(torch.zeros_like(s), torch.zeros_like(s)) for s in sensitivity]
            new = []
            for (ema, unc), sen in zip(averages, sensitivity):
                ema = beta1 * ema + (1 - beta1) * sen
                new.append((ema, beta2 * unc + (1 - beta2) * (sen - ema).abs()))
            averages = new
        (e_l, u_l), (e_b1, u_b1), (e_a2, u_a2) = averages
        scores.append(e_l * u_l + (e_b1 * u_b1).mean(dim=1) + (e_a2 * u_a2).mean(dim=0))
    flat = torch.stack(scores).flatten()
    r = len(scores[0])
    return {(int(i) // r, int(i) % r) for i in torch.topk(flat, budget).indices}


def test_the_final_kept_set_is_the_papers_from_every_scoring_step():
    """Which values the run ends with, not only how many: the final pattern (set at the last masking step,
    decay_end) against an independent replay of the EMAs and scores over every scoring step up to and
    including it. The last step's gradients are made to decide the ranking, so a schedule that stops
    scoring one step early (or scores from stale gradients) keeps another set."""
    model, alloc = _setup(total=20, init=2, final=5, interval=4)
    layers = list(model.lora2_layers().values())
    g = torch.Generator().manual_seed(7)
    history = []
    for step in range(1, 21):
        scale = 50.0 if step == alloc.decay_end else 1.0  # the last scoring step dominates
        for layer in layers:
            for p in (layer.singular_values, layer.q_up, layer.p_down):
                p.grad = torch.randn(p.shape, generator=g) * scale
        if step <= alloc.decay_end:
            history.append([(l.singular_values.detach().clone(), l.singular_values.grad.clone(),
                             l.q_up.detach().clone(), l.q_up.grad.clone(), l.p_down.detach().clone(),
                             l.p_down.grad.clone()) for l in layers])
        alloc.step(step)
    kept = {(m, i) for m, layer in enumerate(layers) for i in range(layer.r) if layer.rank_mask[i] == 1}
    assert len(kept) == alloc.target_budget
    expected = _replayed_kept_set(history, 0.9, 0.5, alloc.target_budget, len(history))
    one_step_short = _replayed_kept_set(history, 0.9, 0.5, alloc.target_budget, len(history) - 1)
    assert expected != one_step_short  # the test can tell the two schedules apart
    assert kept == expected


def test_lowest_scores_are_masked():
    model, alloc = _setup()
    _backward(model, 0)
    alloc.update_importance()
    scores = alloc.ranked_scores().clone()
    budget = alloc.initial_budget - 7
    pattern = alloc.mask_to_budget(budget)
    kept_scores, dropped_scores = scores[pattern == 1], scores[pattern == 0]
    assert pattern.sum() == budget
    assert kept_scores.min() >= dropped_scores.max()
    for layer, row in zip(alloc.layers, pattern):
        assert torch.all(layer.singular_values[row == 0] == 0)


def test_adalora_pruned_values_stay_trainable_and_recompete():
    """The paper's (AdaLoRA's) semantics: zeroed, but still trained, and back if they score higher."""
    model, alloc = _setup(init=0, final=0, interval=1, total=20)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _backward(model, 0)
    alloc.update_importance()
    pattern = alloc.mask_to_budget(alloc.initial_budget - 5)
    m, i = (pattern == 0).nonzero()[0].tolist()
    layer = alloc.layers[m]
    assert layer.singular_values[i] == 0 and layer.rank_mask[i] == 1  # zeroed, not masked in the forward
    _backward(model, 1)
    assert layer.singular_values.grad[i] != 0  # still gets a gradient ...
    optimizer.step()
    assert layer.singular_values[i] != 0  # ... and moves again
    alloc.state["ema_lambda"][m, i] = alloc.state["unc_lambda"][m, i] = 1e3  # make it the most important value
    alloc.scores = alloc.state["ema_lambda"] * 0 + torch.arange(alloc.scores.numel()).view_as(alloc.scores) * 1e-9
    alloc.scores[m, i] = 1.0
    assert alloc.mask_to_budget(alloc.initial_budget - 5)[m, i] == 1  # it competed and came back


def test_monotone_pruned_values_never_come_back():
    model, alloc = _setup(init=0, final=0, interval=1, total=20, pruning="monotone")
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
    assert alloc.current_budget() == alloc.target_budget


def test_scale_is_constant_alpha_over_r_by_default_and_alpha_over_kept_for_monotone():
    for pruning, expected in (("adalora", 16.0 / 4), ("monotone", 16.0 / 2)):
        model, alloc = _setup(pruning=pruning)
        layer = next(iter(model.lora2_layers().values()))
        layer.set_rank_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]))
        assert float(layer.scale) == expected, pruning


def test_scores_use_only_the_small_factors():
    model, alloc = _setup()
    _backward(model, 0)
    for layer in model.lora2_layers().values():  # poison the big factors: the scores must not see them
        layer.q_down.grad.fill_(float("nan"))
        layer.p_up.grad.fill_(float("nan"))
        layer.q_down.data.fill_(float("nan"))
        layer.p_up.data.fill_(float("nan"))
    scores = alloc.update_importance()
    assert torch.isfinite(scores).all() and scores.abs().sum() > 0
    m, r, k = len(model.lora2_layers()), 4, 2
    assert {k_: tuple(v.shape) for k_, v in alloc.state.items()} == {
        "ema_lambda": (m, r), "unc_lambda": (m, r), "ema_q_up": (m, r, k), "unc_q_up": (m, r, k),
        "ema_p_down": (m, k, r), "unc_p_down": (m, k, r)}


def test_score_formula_matches_adalora_definition():
    model, alloc = _setup()
    cfg = model.lora2_config
    layers = list(model.lora2_layers().values())
    ema = {id(p): torch.zeros_like(p) for l in layers for p in (l.singular_values, l.q_up, l.p_down)}
    unc = {k: torch.zeros_like(v) for k, v in ema.items()}
    for step in range(3):
        _backward(model, step)
        scores = alloc.update_importance()
        for l in layers:
            for p in (l.singular_values, l.q_up, l.p_down):
                i = (p * p.grad).abs()
                ema[id(p)] = cfg.beta1 * ema[id(p)] + (1 - cfg.beta1) * i
                unc[id(p)] = cfg.beta2 * unc[id(p)] + (1 - cfg.beta2) * (i - ema[id(p)]).abs()
    s = lambda p: ema[id(p)] * unc[id(p)]  # noqa: E731
    expected = torch.stack([s(l.singular_values) + s(l.q_up).mean(1) + s(l.p_down).mean(0) for l in layers])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-12)


def test_non_finite_gradients_leave_the_importance_untouched():
    """An fp16 step the GradScaler skipped has inf gradients: they must not poison the EMAs."""
    model, alloc = _setup()
    _backward(model, 0)
    alloc.update_importance()
    before = {k: v.clone() for k, v in alloc.state.items()}
    _backward(model, 1)
    next(iter(model.lora2_layers().values())).q_up.grad[0, 0] = float("inf")
    scores = alloc.update_importance()
    assert all(torch.equal(before[k], alloc.state[k]) for k in before)
    assert torch.isfinite(scores).all() and int(alloc.skipped_updates) == 1
    _backward(model, 2)
    alloc.update_importance()
    assert not torch.equal(before["ema_lambda"], alloc.state["ema_lambda"]) and int(alloc.skipped_updates) == 1


def test_state_follows_the_model_to_another_device():
    """Built on the CPU, then the model moves (as lora2 train does: method first, .to(device) after)."""
    model, alloc = _setup(init=0, interval=1)
    _backward(model, 0)
    model.to("meta")  # a stand-in for a GPU: tensors there cannot mix with CPU ones
    for layer in model.lora2_layers().values():
        for name in ("singular_values", "q_up", "p_down"):
            getattr(layer, name).grad = torch.empty_like(getattr(layer, name))
    alloc.step(3)
    assert all(v.device.type == "meta" for v in alloc.state.values())
    assert alloc.scores.device.type == "meta" and alloc.pattern.device.type == "meta"


def test_allocator_does_not_write_into_the_callers_config():
    cfg = LoRA2Config(r=4, k=2, target_rank=2, init_warmup=1, final_warmup=1, beta1=0.9, beta2=0.5)
    frozen = dataclasses.asdict(cfg)
    model = get_lora2_model(make_model("bert"), cfg)
    RankAllocator(model.lora2_layers(), cfg, total_steps=10)
    assert dataclasses.asdict(cfg) == frozen


def test_allocator_state_round_trip():
    model, alloc = _setup()
    _backward(model, 0)
    alloc.update_importance()
    alloc.mask_to_budget(alloc.initial_budget - 3)
    other = RankAllocator(model.lora2_layers(), model.lora2_config, total_steps=40)
    other.load_state_dict(copy.deepcopy(alloc.state_dict()))
    assert torch.equal(other.ranked_scores(), alloc.ranked_scores()) and torch.equal(other.pattern, alloc.pattern)
    with pytest.raises(ValueError, match="wrong shape"):
        other.load_state_dict({k: v[:1] for k, v in alloc.state_dict().items() if v.dim()})


def test_allocator_needs_total_steps_that_fit_warmups():
    model = get_lora2_model(make_model("bert"), LoRA2Config(init_warmup=10, final_warmup=10))
    with pytest.raises(ValueError, match="needs total_steps"):
        RankAllocator(model.lora2_layers(), model.lora2_config)
    with pytest.raises(ValueError, match="total_steps must be larger than init_warmup"):
        RankAllocator(model.lora2_layers(), model.lora2_config, total_steps=15)


# --- regulariser --------------------------------------------------------------------------------


def _orthonormal_layer(n: int, r: int, k: int, cross_orthogonal: bool) -> LoRA2Linear:
    layer = LoRA2Linear.from_linear(nn.Linear(n, n), r=r, k=k, alpha=1.0)
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
    layers = [LoRA2Linear(6, 6, r=4, k=3, alpha=1.0, init="normal", init_std=0.5),
              LoRA2Linear(6, 10, r=4, k=3, alpha=1.0, init="normal", init_std=0.5),
              LoRA2Linear(10, 6, r=4, k=3, alpha=1.0, init="normal", init_std=0.5)]
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
