"""``lora2 compare`` end to end on a tiny model: every method through the same loop, tables, JSON,
plots, and a second call that reads finished runs back instead of training again."""

from __future__ import annotations

import json

import pytest

import lora2.compare as compare_module
from lora2.cli import main
from lora2.compare import CompareConfig, compare

PNG = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_tables_json_plots_and_resumes(tiny_bert_dir, tmp_path, monkeypatch):
    cfg = CompareConfig(model=tiny_bert_dir, output_dir=str(tmp_path), tasks=["adjective-polarity", "qa-match"],
                        methods=["full", "adalora", "lora2"], seeds=[0, 1], max_steps=4, batch_size=8,
                        max_train_samples=32, max_eval_samples=16, max_length=24)
    report = compare(cfg, command="pytest", progress=False)

    assert len(report["runs"]) == 2 * 3 * 2
    run = report["runs"][0]
    assert run["config"]["max_steps"] == 4 and run["result"]["steps"] == 4
    assert [step for step, _ in run["curves"]["eval"]] == [0, 2, 4]  # before, middle, end
    by_method = {r["method"]: r["result"]["trainable_parameters"] for r in report["runs"]}
    assert by_method["full"] > by_method["adalora"] > 0 and by_method["lora2"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == json.loads(json.dumps(report["runs"]))

    markdown = (tmp_path / "results.md").read_text()
    assert "## adjective-polarity — sentence-pair regression, pearson" in markdown
    assert "## qa-match — sentence-pair classification, accuracy" in markdown
    assert markdown.count("**best**") == 2  # one per task
    for label in ("Full fine-tuning", "AdaLoRA 12→8 (PEFT)", "LoRA² r=8 k=8 →6"):
        assert markdown.count(f"| {label} |") == 3  # two task tables and the hyper-parameter table
    for png in ("metric_vs_params.png", "training_curves.png", "rank_allocation.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG, png

    def no_training(*args, **kwargs):
        raise AssertionError("finished runs must be read back, not trained again")

    monkeypatch.setattr(compare_module, "train", no_training)
    again = compare(cfg, command="pytest", progress=False)
    assert [r["result"] for r in again["runs"]] == [r["result"] for r in report["runs"]]


def test_compare_rejects_unknown_tasks_and_methods(capsys):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mnli'\]"):
        CompareConfig(tasks=["mnli"])
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['dora'\]; choose from"):
        CompareConfig(methods=["dora"])
    assert main(["compare", "--methods", "dora"]) == 2
