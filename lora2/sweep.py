"""Several LoRA² adapters trained together over one frozen base: the pieces a sweep's loop is built from.

A learning-rate sweep trains N adapters of one model. Over one base in memory they run as one model whose
adapted layers hold N adapters each (``LoRA2Linear(adapters=N)``: every factor stacked, one launch set for
all of them) and whose batches concatenate the adapters' own batches (``AdapterRows`` says which rows are
whose). What stays per adapter is the training state:

- ``stack_adapters``: N one-adapter layers (say, N single runs' initialisations) as one N-adapter layer;
- ``AdapterOptimizers``: an optimiser per adapter, each over its adapter's slices of the stacked
  parameters, so each has its own learning rate, schedule and state, and its ``state_dict`` is exactly the
  one a single run of that adapter would save. The slices are leaf views of the stacked parameters, made
  once; before each step their ``.grad`` is pointed at the matching slice of the stacked gradient (no copy);
- ``AdapterHeads``: a trained module of the model's own (a classifier head: PEFT's ``modules_to_save``) as
  one copy per adapter, each applied to its adapter's rows;
- ``AdapterView``: adapter i of an N-adapter layer as the code that reads a layer's factors by name sees a
  one-adapter layer: ``RankAllocator(..., groups=N)`` over every adapter's views (one importance call for
  all, a budget each), ``OrthogonalRegularizer`` over one adapter's.

Adam's update is element-wise, so an adapter's update depends on its own slice only: adapter i of a sweep
steps exactly as a single run with its learning rate steps (tests/test_sweep.py checks it, kernels and
reference, with gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lora2_kernels.linear import ADAPTER_PARAMETER_NAMES, AdapterRows, LoRA2Linear


@torch.no_grad()
def stack_adapters(layers: Sequence[LoRA2Linear]) -> LoRA2Linear:
    """One LoRA2Linear holding the adapters of ``layers`` (one-adapter layers over the same W and b, same r, k,
    α, dropout), adapter i = layers[i]'s factors and mask; it shares their weight and bias Parameters."""
    first = layers[0]
    if any(layer.adapters != 1 for layer in layers):
        raise ValueError("stack_adapters takes one-adapter layers")
    same = ("in_features", "out_features", "r", "k", "alpha", "dropout_p", "scale_by_kept", "fan_in_fan_out")
    for layer in layers[1:]:
        differ = [name for name in same if getattr(layer, name) != getattr(first, name)]
        if differ or layer.weight is not first.weight:
            raise ValueError(f"stack_adapters: the layers differ in {differ or ['weight']}; the adapters of one layer "
                             "share its base and its shape (r, k, α, dropout)")
    stacked = first.sibling(adapters=len(layers))
    for name in (*ADAPTER_PARAMETER_NAMES, "rank_mask"):
        getattr(stacked, name).copy_(torch.stack([getattr(layer, name) for layer in layers]))
    return stacked


class AdapterHeads(nn.Module):
    """A module trained with the adapters (a classifier head) held once per adapter: copy i takes adapter i's
    rows of the input's first dimension (as ``rows`` splits the batch) and the outputs are concatenated back.
    The copies are separate modules with their own parameters: ``AdapterOptimizers(..., extra=[list(
    heads.heads[i].parameters()) for i ...])`` trains each with its adapter."""

    def __init__(self, heads: Sequence[nn.Module], rows: AdapterRows) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.__dict__["rows"] = rows  # shared with the layers, not a submodule

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        counts = self.rows.rows
        if counts is None or len(counts) != len(self.heads) or sum(counts) != x.shape[0]:
            raise ValueError(f"AdapterHeads: {len(self.heads)} heads and a batch of {x.shape[0]} rows, but the "
                             f"adapters' rows are {counts}: set them for this batch (AdapterRows.set).")
        return torch.cat([head(part, *args, **kwargs) for head, part in zip(self.heads, x.split(counts))])


class AdapterView:
    """Adapter ``index`` of an N-adapter layer, read as a one-adapter LoRA2Linear is: its factors by name, its
    mask (a view of the layer's buffer: writes go to the layer), its sizes.

    With ``slices`` (the leaf views of ``AdapterOptimizers``, whose ``.grad`` it links) the factors are those
    leaves: what the rank allocator reads, gradients included. Without, each access slices the stacked
    parameter anew, differentiably: what a loss term (the orthogonality regulariser) must be built from
    for its gradient to reach the stacked parameters."""

    def __init__(self, layer: LoRA2Linear, index: int, slices: Sequence[torch.Tensor] | None = None) -> None:
        self.layer, self.index = layer, index
        self.in_features, self.out_features, self.r, self.k = layer.in_features, layer.out_features, layer.r, layer.k
        self._slices = dict(zip(ADAPTER_PARAMETER_NAMES, slices)) if slices is not None else None

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in ADAPTER_PARAMETER_NAMES:
            if self._slices is not None:
                return self._slices[name]
            return getattr(self.layer, name)[self.index]
        if name == "rank_mask":
            return self.layer.rank_mask[self.index]
        raise AttributeError(f"AdapterView has no {name!r}")


class AdapterOptimizers:
    """One optimiser per adapter of N-adapter layers, over that adapter's slices of their parameters.

    ``make(i, params)`` builds adapter i's optimiser (its learning rate, its param groups) over ``params``:
    adapter i's slices, layer by layer in ``layers``' order and factor by factor in a LoRA2Linear's
    parameter order, which is the order of a one-adapter model's trainable parameters.
    ``extra[i]`` (optional) are adapter i's parameters of its own (a classifier head), appended to its list."""

    def __init__(self, layers: Sequence[LoRA2Linear], make: Callable[[int, list[torch.Tensor]], torch.optim.Optimizer],
                 extra: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        counts = {layer.adapters for layer in layers}
        if len(counts) != 1 or counts == {1}:
            raise ValueError(f"AdapterOptimizers takes layers of one adapter count above 1, got {sorted(counts)}")
        self.adapters = counts.pop()
        self.layers = list(layers)
        self.stacked = [getattr(layer, name) for layer in layers for name in ADAPTER_PARAMETER_NAMES]
        with torch.no_grad():  # leaf views: the optimisers update the stacked storage in place
            self.slices = [[p[i] for p in self.stacked] for i in range(self.adapters)]
        self.params = [own + list(extra[i] if extra else []) for i, own in enumerate(self.slices)]
        self.optimizers = [make(i, params) for i, params in enumerate(self.params)]

    def views(self, index: int) -> list[AdapterView]:
        """Adapter ``index`` of each layer, over this object's leaf slices (see AdapterView)."""
        names = len(ADAPTER_PARAMETER_NAMES)
        return [AdapterView(layer, index, self.slices[index][j * names:(j + 1) * names])
                for j, layer in enumerate(self.layers)]

    def link_gradients(self) -> None:
        """Point each slice's ``.grad`` at its part of the stacked parameter's gradient (views, no copy)."""
        for index, p in enumerate(self.stacked):
            for i in range(self.adapters):
                self.slices[i][index].grad = None if p.grad is None else p.grad[i]

    def finite(self) -> torch.Tensor:
        """Per adapter, whether every gradient of its parameters is finite (a bool tensor on the device: no host
        sync until the loop reads it). An adapter whose loss diverged is stopped alone: step the others."""
        self.link_gradients()
        flags = [torch.stack([p.grad.isfinite().all() for p in params if p.grad is not None]).all()
                 if any(p.grad is not None for p in params) else torch.ones((), dtype=torch.bool)
                 for params in self.params]
        return torch.stack(flags)

    def step(self, adapters: Sequence[int] | None = None) -> None:
        """Step every adapter's optimiser (or those in ``adapters``: a stopped adapter is left as it is)."""
        self.link_gradients()
        for i in range(self.adapters) if adapters is None else adapters:
            self.optimizers[i].step()

    def zero_grad(self) -> None:
        for p in self.stacked:
            p.grad = None
        for params in self.params:
            for p in params:
                p.grad = None
