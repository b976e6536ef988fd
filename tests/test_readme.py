"""README.md stays true: its "any PyTorch model" example runs and does what it says, and .ci/run
installs and tests exactly as its set-up line says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _block_after(heading: str, language: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_the_any_model_example_runs_and_merges():
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(_block_after("## LoRA2Linear in any PyTorch model", "python"), "README.md", "exec"), namespace)
    model, pretrained, layers, allocator = (namespace[k] for k in ("model", "pretrained", "layers", "allocator"))
    assert all(layer.merged for layer in layers.values())
    assert allocator.current_budget() == allocator.target_budget == 2 * 4  # pruned to target_rank per module
    for layer, base in ((model[0], pretrained[0]), (model[2], pretrained[2])):
        assert not torch.equal(layer.weight, base.weight)  # trained: ΔW was folded into the weight
    x = torch.randn(5, 64)
    for layer in layers.values():
        layer.unmerge()
    adapted = model(x)
    for layer in layers.values():
        layer.merge()
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)


def test_ci_runs_the_readmes_set_up_and_test_commands():
    """.ci/run builds a fresh virtual environment as README's first line does, installs with its second
    line's commands in order and ends with its test command."""
    setup = _block_after("## Set-up, main job, tests", "bash").splitlines()
    environment = [c.split("#")[0].strip() for c in setup[0].split("&&")]
    install = [c.split("#")[0].strip() for c in setup[1].split("&&")]
    test_command = setup[3].split("#")[0].strip()
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [line.replace("python -m pip install -q ", "pip install ") for line in ci if line]
    assert environment[0] == "python3 -m venv .venv" and "python3 -m venv .venv-ci" in ci
    assert ci.index("rm -rf .venv-ci") < ci.index("python3 -m venv .venv-ci") < ci.index(". .venv-ci/bin/activate")
    commands = [line for line in ci if line.startswith(("pip install", "python -m pytest"))]
    assert commands[-len(install) - 1:] == [*install, test_command] and ci[-1] == test_command


def test_the_sweep_example_trains_three_adapters_each_to_its_budget():
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(_block_after("## A learning-rate sweep over one base (library)", "python"), "README.md", "exec"),
         namespace)
    model, allocator, best, rates, optimizers = (namespace[k] for k in ("model", "allocator", "best", "rates",
                                                                        "optimizers"))
    assert model[0].rank_mask.shape == (3, 8)
    kept = [int(model[0].rank_mask[i].sum() + model[2].rank_mask[i].sum()) for i in range(3)]
    assert kept == [allocator.target_budget] * 3 == [2 * 4] * 3  # each adapter pruned to its own budget
    assert best.adapters == 1 and torch.equal(best.q_down, model[0].q_down[1])
    assert [o.param_groups[0]["lr"] for o in optimizers.optimizers] == rates  # each adapter its own rate
