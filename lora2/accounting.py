"""Parameter accounting: what an adapter costs, per module and in total.

Two counts matter. *Trainable* is what the optimiser holds (all r singular values, pruned or not).
*Budget* is what the paper reports: after pruning, a dropped λ_i also kills row i of B₁ and column
i of A₂, so a module with ``kept`` values costs k·(in + out) + kept·(2k + 1).

The importance-scoring column shows the paper's saving: LoRA² scores λ, B₁ and A₂ (r + 2rk
elements per module), AdaLoRA scores λ, P and Q (r·(1 + in + out)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .model import LoRA2Model


@dataclass(frozen=True)
class ModuleCost:
    name: str
    in_features: int
    out_features: int
    r: int
    k: int
    kept: int
    trainable: int
    budget: int
    scored_elements: int
    adalora_scored_elements: int


@dataclass(frozen=True)
class ParameterReport:
    modules: list[ModuleCost]
    saved_module_parameters: int
    base_parameters: int

    @property
    def adapter_trainable(self) -> int:
        return sum(m.trainable for m in self.modules)

    @property
    def trainable(self) -> int:
        return self.adapter_trainable + self.saved_module_parameters

    @property
    def budget(self) -> int:
        return sum(m.budget for m in self.modules)

    @property
    def scored_elements(self) -> int:
        return sum(m.scored_elements for m in self.modules)

    @property
    def adalora_scored_elements(self) -> int:
        return sum(m.adalora_scored_elements for m in self.modules)

    @property
    def scoring_saving(self) -> float:
        """Fraction of AdaLoRA's importance-score work that LoRA² skips."""
        return 1.0 - self.scored_elements / max(self.adalora_scored_elements, 1)

    def to_dict(self) -> dict:
        return {
            "modules": [asdict(m) for m in self.modules],
            "adapter_trainable": self.adapter_trainable,
            "saved_module_parameters": self.saved_module_parameters,
            "trainable": self.trainable,
            "budget": self.budget,
            "base_parameters": self.base_parameters,
            "trainable_percent": 100.0 * self.trainable / max(self.base_parameters, 1),
            "scored_elements": self.scored_elements,
            "adalora_scored_elements": self.adalora_scored_elements,
            "scoring_saving": self.scoring_saving,
        }

    def format_table(self) -> str:
        header = f"{'module':<48} {'in':>6} {'out':>6} {'kept/r':>7} {'trainable':>10} {'budget':>9}"
        lines = [header, "-" * len(header)]
        for m in self.modules:
            lines.append(f"{m.name[-48:]:<48} {m.in_features:>6} {m.out_features:>6} "
                         f"{f'{m.kept}/{m.r}':>7} {m.trainable:>10,} {m.budget:>9,}")
        lines.append("-" * len(header))
        lines += [
            f"adapter trainable parameters : {self.adapter_trainable:,}",
            f"saved modules (heads)        : {self.saved_module_parameters:,}",
            f"trainable in total           : {self.trainable:,} "
            f"({100.0 * self.trainable / max(self.base_parameters, 1):.3f} % of {self.base_parameters:,})",
            f"budget after pruning (paper) : {self.budget:,}",
            f"importance scoring           : {self.scored_elements:,} elements vs AdaLoRA's "
            f"{self.adalora_scored_elements:,} ({100 * self.scoring_saving:.2f} % saved)",
        ]
        return "\n".join(lines)


def parameter_report(model: LoRA2Model) -> ParameterReport:
    modules = []
    for name, layer in model.lora2_layers().items():
        kept = int(layer.rank_mask.sum().item())
        modules.append(ModuleCost(
            name=name, in_features=layer.in_features, out_features=layer.out_features, r=layer.r, k=layer.k,
            kept=kept, trainable=layer.adapter_parameter_count(), budget=layer.adapter_parameter_count(kept),
            scored_elements=layer.r * (1 + 2 * layer.k),
            adalora_scored_elements=layer.r * (1 + layer.in_features + layer.out_features),
        ))
    saved = sum(p.numel() for n in model.modules_to_save for p in model.base_model.get_submodule(n).parameters())
    adapter_ids = {id(p) for layer in model.lora2_layers().values()
                   for p in (layer.q_down, layer.q_up, layer.singular_values, layer.p_down, layer.p_up)}
    base = sum(p.numel() for p in model.base_model.parameters() if id(p) not in adapter_ids)
    return ParameterReport(modules=modules, saved_module_parameters=saved, base_parameters=base)
