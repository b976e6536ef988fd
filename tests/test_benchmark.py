"""`python -m benchmarks.throughput` stays runnable: every section and every peer measures on tiny
shapes and the tables render with their ratios. No timing is asserted: speed is shown by running
the benchmark, not by unit tests."""

from __future__ import annotations

import pytest

import json

import torch

from benchmarks import throughput


def test_every_layer_peer_measures_and_the_table_has_ratios():
    device = torch.device("cpu")
    results = [throughput.measure_layer("tiny", 16, 24, 20, peer, "eager", device) for peer in throughput.LAYER_PEERS]
    by_peer = {r.peer: r for r in results}
    for gpu_only in ("lora2-triton", "lora2-split"):
        assert by_peer[gpu_only].note == "needs a GPU" and by_peer[gpu_only].forward_ms is None
    for peer in ("floor", "peft-lora", "lora2-reference", "peft-lora-4bit", "lora2-4bit"):
        assert by_peer[peer].note is None and by_peer[peer].forward_ms > 0 and by_peer[peer].forward_backward_ms > 0
    rows = {line.split("|")[4].strip(): line.split("|") for line in throughput.layer_table(results).splitlines()[2:]}
    assert rows["floor"][8].strip() == "1.00" and rows["peft-lora"][9].strip() == "1.00"
    assert rows["peft-lora-4bit"][9].strip() == "1.00"  # 4-bit peers are compared with PEFT on the same 4-bit base
    assert rows["lora2-4bit"][9].strip() not in ("—", "1.00")
    assert rows["floor"][10].strip() == "wall clock"


def test_every_step_method_measures_and_the_table_has_ratios():
    shape = throughput.ModelShape("cpu-small", batch=2, length=16, causal_lm=False)
    device = torch.device("cpu")
    results = [throughput.measure_step(shape, m, "eager", device, steps=2, warmup_steps=1)
               for m in throughput.STEP_METHODS]
    by_method = {r.method: r for r in results}
    assert by_method["lora2"].note.startswith("needs a GPU")
    for method in ("floor", "full", "peft-lora", "peft-adalora", "lora2-reference"):
        assert by_method[method].note is None and by_method[method].ms_per_step > 0, method
    assert by_method["floor"].trainable_parameters == 0
    assert by_method["full"].trainable_parameters > by_method["peft-lora"].trainable_parameters > 0
    assert by_method["lora2-reference"].allocator_ms is not None and by_method["peft-adalora"].allocator_ms is not None
    assert by_method["lora2-reference"].regularizer_ms is not None and by_method["peft-lora"].allocator_ms is None
    table = throughput.step_table(results)
    assert "| cpu-small | eager | floor | " in table and "| 1.00 |" in table


def test_allocator_section_compares_the_compiled_op_with_the_reference():
    result = throughput.measure_allocator(torch.device("cpu"), modules=12, r=4, k=2)
    assert result.compiled_ms > 0 and result.reference_ms > 0 and result.allocator_step_ms > 0
    assert result.score_difference is not None and result.score_difference < 1e-6  # the two compute the same
    assert "12 × 4 × 2" in throughput.allocator_table(result, [])


def test_main_writes_markdown_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "CPU_LAYER_SHAPES", [("tiny", 8, 16, 12)])
    monkeypatch.setitem(throughput.MODEL_SHAPES, "cpu-small", throughput.ModelShape("cpu-small", 2, 8, False))
    assert throughput.main(["--sections", "layers", "steps", "--modes", "eager", "--steps", "1", "--warmup", "0",
                            "--methods", "floor", "lora2-reference", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert {r["peer"] for r in report["layers"]} == set(throughput.LAYER_PEERS)
    assert [r["method"] for r in report["steps"]] == ["floor", "lora2-reference"]
    markdown = (tmp_path / "results.md").read_text()
    assert "## Layers" in markdown and "## Training steps" in markdown and "need a GPU" in markdown


@pytest.mark.slow
def test_work_and_model_sections_print_the_counts_and_the_labelled_model(tmp_path):
    """The device-work counts (counted under the interpreter in a subprocess on a CPU) and the cost model,
    labelled as a model, with no measured ratio on a CPU."""
    assert throughput.main(["--sections", "work", "model", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    work = report["work"]["peers"]
    assert all(row["lora2"] <= row["floor"] + 2 for row in report["work"]["regimes"].values())
    assert work["frozen nn.Linear"] == 2 and work["LoRA² kernels, bf16"] <= 5
    assert work["LoRA² model of N projections: b (per projection)"] <= 4
    assert work["LoRA² kernels, bf16"] < work["PEFT LoRA r=8 (bf16 autocast)"]
    markdown = (tmp_path / "results.md").read_text()
    assert "Model, not measured" in markdown and "— (needs a GPU)" in markdown
    rows = {r["shape"]: r for r in report["model"]}
    assert rows["llama-1.1b q/o"]["floor_us"] > 0 and rows["llama-1.1b q/o"]["lora2_us"] > rows["llama-1.1b q/o"]["floor_us"]


@pytest.mark.slow
def test_smoke_mode_runs_every_section_and_each_table_has_its_peers(tmp_path):
    """``--smoke``: every section on tiny shapes in one run (what CI runs of the benchmark). The layer rows
    cover dropout 0 and 0.1 for LoRA² and PEFT alike, the host section times lora2 beside the frozen layer
    and PEFT in the same run."""
    assert throughput.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(r["peer"], r["dropout"]) for r in report["layers"]} >= {("peft-lora", 0.1), ("lora2-reference", 0.1),
                                                                      ("peft-lora", 0.0), ("floor", 0.0)}
    assert not any(r["peer"] == "floor" and r["dropout"] for r in report["layers"])
    host = report["host"]
    assert host["frozen nn.Linear"]["ratio"] == 1.0 and all(r["us"] > 0 for r in host.values())
    assert any(name.startswith("PEFT") for name in host) and len(report["steps"]) == len(throughput.STEP_METHODS)
    markdown = (tmp_path / "results.md").read_text()
    for section in ("## Device work", "## Host time", "## Layers", "## Training steps", "## Cost model", "## Allocator"):
        assert section in markdown, section
