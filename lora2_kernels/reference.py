"""The reference implementation of every op lora2's kernels compute.

It is the oracle of every kernel test and the path taken where no kernel applies (CPU tensors,
dropout > 0, shapes the kernels do not cover). Each function is the formula, written for
clarity rather than speed; all of them work in float64 too (accumulation is at least float32).

Notation (W is out × in; a LoRA² layer has r singular values and inner width k):

    A₁ = q_down  k × in      B₁ = q_up    r × k      λ = singular_values  r
    A₂ = p_down  k × r       B₂ = p_up    out × k    m = rank_mask        r (0 or 1)

    ΔW = s · P · diag(λ ⊙ m) · Q,   P = B₂·A₂ (out × r),   Q = B₁·A₁ (r × in),   s = α / r

The three middle factors fold into one k × k core, C = s · A₂ · diag(λ ⊙ m) · B₁, so
ΔW = B₂ · C · A₁ and the activations only see a rank-k LoRA with down = A₁ and up = B₂·C:

    y = x·Wᵀ + b + (x·A₁ᵀ)·(B₂·C)ᵀ          h = x·A₁ᵀ  (rank-k hidden, float32, saved)

The fused kernels (triton_kernels/lora_linear.py) compute the whole layer, `lora2_forward` below,
and in their backward what `lora_linear_backward`, `up_backward` and `core_backward` write out step by
step: the gradient of ``up`` = B₂·C carried through the tiny (out × k, k × k) products to λ, B₁, A₂ and
B₂. The kernel tests do not use this module: their oracle is the dense float64 formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --- the LoRA² factors -------------------------------------------------------------------------


def core(singular_values: torch.Tensor, rank_mask: torch.Tensor, q_up: torch.Tensor, p_down: torch.Tensor,
         scale: float | torch.Tensor) -> torch.Tensor:
    """C = s · A₂ · diag(λ ⊙ m) · B₁, the k × k core."""
    weighted = singular_values * rank_mask * scale  # r
    return (p_down * weighted) @ q_up  # (k × r)·diag·(r × k)


def delta_weight(q_down: torch.Tensor, q_up: torch.Tensor, singular_values: torch.Tensor, p_down: torch.Tensor,
                 p_up: torch.Tensor, rank_mask: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """ΔW = s · P · diag(λ ⊙ m) · Q, built factor by factor as the paper writes it (out × in)."""
    p = p_up @ p_down  # P: out × r
    q = q_up @ q_down  # Q: r × in
    return scale * (p * (singular_values * rank_mask)) @ q


# --- the fused op: base linear + rank-k LoRA ------------------------------------------------------


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half types, float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def base_weight(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W as out × in; GPT-2's Conv1D stores it transposed (in × out)."""
    return weight.t() if fan_in_fan_out else weight


def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, down: torch.Tensor,
                        up: torch.Tensor, fan_in_fan_out: bool = False,
                        adapter_x: torch.Tensor | None = None, base: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x·Wᵀ + b + (x·downᵀ)·upᵀ in x's dtype, and the hidden h = x·downᵀ in float32 (or float64).

    x: (..., in); weight: out × in (in × out with ``fan_in_fan_out``); down: k × in; up: out × k.
    ``adapter_x``: the adapter's input where it differs from the base's (adapter dropout). ``base``:
    x·Wᵀ + b computed by the caller (a 4-bit W: four_bit.linear_4bit); ``weight`` and ``bias`` unused.
    """
    acc = _accumulation_dtype(x)
    hidden = (x if adapter_x is None else adapter_x).to(acc) @ down.to(acc).t()  # (..., k)
    if base is None:
        base = F.linear(x, base_weight(weight, fan_in_fan_out), bias)
    # y = base + h·upᵀ as one addmm: no out-sized temporary for the LoRA term
    y = torch.addmm(base.reshape(-1, base.shape[-1]).to(acc), hidden.reshape(-1, hidden.shape[-1]), up.to(acc).t())
    return y.to(x.dtype).view(base.shape), hidden


def lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
    hidden: torch.Tensor, fan_in_fan_out: bool = False, needs_weight_grad: bool = False,
    needs_bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of `lora_linear_forward` for every input, from dY and the saved x and h:

        g      = dY·up                 (..., k)   the rank-k gradient, float32
        dX     = dY·W + g·down
        d down = gᵀ·x                  k × in
        d up   = dYᵀ·h                 out × k
        dW     = dYᵀ·x                 (only if W is trained; transposed for Conv1D)
        db     = Σ dY

    Returns (dX, dW or None, db or None, d down, d up); sums run over all leading dimensions.
    """
    acc = _accumulation_dtype(grad_y)
    dy = grad_y.reshape(-1, grad_y.shape[-1]).to(acc)
    xs = x.reshape(-1, x.shape[-1]).to(acc)
    h = hidden.reshape(-1, hidden.shape[-1]).to(acc)
    w = base_weight(weight, fan_in_fan_out).to(acc)
    g = dy @ up.to(acc)
    grad_x = (dy @ w + g @ down.to(acc)).to(x.dtype).reshape(x.shape)
    grad_down = (g.t() @ xs).to(down.dtype)
    grad_up = (dy.t() @ h).to(up.dtype)
    grad_weight = None
    if needs_weight_grad:
        grad_weight = dy.t() @ xs
        grad_weight = (grad_weight.t() if fan_in_fan_out else grad_weight).to(weight.dtype)
    grad_bias = dy.sum(0).to(grad_y.dtype) if needs_bias_grad else None
    return grad_x, grad_weight, grad_bias, grad_down, grad_up


# --- from d(up) back to the LoRA² factors ----------------------------------------------------------


def up_backward(grad_up: torch.Tensor, p_up: torch.Tensor, core_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """up = B₂·C:  dB₂ = d(up)·Cᵀ,  dC = B₂ᵀ·d(up)."""
    return grad_up @ core_.t(), p_up.t() @ grad_up


def core_backward(grad_core: torch.Tensor, singular_values: torch.Tensor, rank_mask: torch.Tensor, q_up: torch.Tensor,
                  p_down: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C = A₂·diag(w)·B₁ with w = s·λ⊙m (all k × k or smaller):

        dλ_i = s·m_i · Σ_ab A₂[a, i]·dC[a, b]·B₁[i, b]
        dB₁  = diag(w)·A₂ᵀ·dC
        dA₂  = dC·B₁ᵀ·diag(w)

    Returns (dλ, dB₁, dA₂). A masked value (m_i = 0) gets no gradient in any of the three.
    """
    weighted = singular_values * rank_mask * scale
    a2t_dc = p_down.t() @ grad_core  # r × k
    grad_lambda = (a2t_dc * q_up).sum(1) * rank_mask * scale
    grad_q_up = weighted[:, None] * a2t_dc
    grad_p_down = (grad_core @ q_up.t()) * weighted
    return grad_lambda, grad_q_up, grad_p_down


def lora2_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q_down: torch.Tensor,
                  q_up: torch.Tensor, singular_values: torch.Tensor, p_down: torch.Tensor, p_up: torch.Tensor,
                  rank_mask: torch.Tensor, scale: float | torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The whole LoRA² layer: fold the core, then the fused base + rank-k LoRA (autograd-able)."""
    up = p_up.to(_accumulation_dtype(p_up)) @ core(singular_values, rank_mask, q_up, p_down, scale)
    return lora_linear_forward(x, weight, bias, q_down, up, fan_in_fan_out)[0]


# --- the rank allocator's importance update ----------------------------------------------------------

STATE_NAMES = ("ema_lambda", "unc_lambda", "ema_q_up", "unc_q_up", "ema_p_down", "unc_p_down")


def new_importance_state(modules: int, r: int, k: int, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zeroed EMAs: (M, r) for λ, (M, r, k) for B₁, (M, k, r) for A₂."""
    shapes = {"lambda": (modules, r), "q_up": (modules, r, k), "p_down": (modules, k, r)}
    return {name: torch.zeros(shapes[name.split("_", 1)[1]], device=device, dtype=dtype) for name in STATE_NAMES}


def importance_update(
    singular_values: list[torch.Tensor], q_up: list[torch.Tensor], p_down: list[torch.Tensor],
    singular_values_grad: list[torch.Tensor | None], q_up_grad: list[torch.Tensor | None],
    p_down_grad: list[torch.Tensor | None], state: dict[str, torch.Tensor], beta1: float, beta2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaLoRA's smoothed sensitivity, on λ, B₁ and A₂ only (the cheap LoRA² score).

    For every element θ with gradient g (a missing gradient counts as zero):

        I = |θ·g|,   Ī ← β₁·Ī + (1 − β₁)·I,   Ū ← β₂·Ū + (1 − β₂)·|I − Ī|,   s = Ī·Ū
        score[m, i] = s(λ_i) + mean_j s(B₁[i, j]) + mean_j s(A₂[j, i])

    If any value, gradient or product θ·g is not finite, the state is left as it is and ``skipped`` is 1.
    Updates ``state`` in place; returns (scores (M, r), skipped (int32 scalar)).
    """
    dtype = state["ema_lambda"].dtype

    def stacked(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.stack([p.detach().to(dtype) for p in params])
        gradients = torch.stack([torch.zeros_like(p, dtype=dtype) if g is None else g.to(dtype)
                                 for p, g in zip(params, grads)])
        return values, gradients

    inputs = {"lambda": stacked(singular_values, singular_values_grad), "q_up": stacked(q_up, q_up_grad),
              "p_down": stacked(p_down, p_down_grad)}
    # θ·g itself must be finite: finite θ and g can overflow (1e30 · 1e30) into an EMA that is inf, then NaN
    finite = all(bool(torch.isfinite(v * g).all()) for v, g in inputs.values())
    if finite:
        for name, (values, gradients) in inputs.items():
            sensitivity = (values * gradients).abs()
            ema, unc = state[f"ema_{name}"], state[f"unc_{name}"]
            ema.mul_(beta1).add_((1 - beta1) * sensitivity)
            unc.mul_(beta2).add_((1 - beta2) * (sensitivity - ema).abs())
    skipped = torch.tensor(0 if finite else 1, dtype=torch.int32, device=state["ema_lambda"].device)
    return importance_scores(state), skipped


def importance_scores(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """score[m, i] = s(λ_i) + mean_j s(B₁[i, j]) + mean_j s(A₂[j, i]) from the EMAs, s = Ī·Ū."""
    return (state["ema_lambda"] * state["unc_lambda"]
            + (state["ema_q_up"] * state["unc_q_up"]).mean(dim=2)
            + (state["ema_p_down"] * state["unc_p_down"]).mean(dim=1))
