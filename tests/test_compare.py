"""``lora2 compare`` end to end on a tiny model: the learning-rate sweep chosen on validation, every
method through the same loop, the test split reported, tables, JSON, plots, and second calls that
read finished runs back instead of training again."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import require

import lora2.compare as compare_module
from lora2.cli import main
from lora2.compare import SWEEP_FILE, CompareConfig, compare

PNG = b"\x89PNG\r\n\x1a\n"


LORA2_GRID = (5e-3, 5e-2)


@pytest.fixture
def small_grids(monkeypatch):
    """Two learning rates per method keep the sweep short."""
    grids = {"peft": (1e-3, 1e-2), "lora2": LORA2_GRID}
    specs = tuple(dataclasses.replace(m, lr_grid=grids["lora2" if m.method == "lora2" else "peft"])
                  for m in compare_module.METHODS)
    monkeypatch.setattr(compare_module, "METHODS", specs)


@pytest.mark.slow
def test_sweep_then_compare_on_test_with_read_back(tiny_bert_dir, tmp_path, monkeypatch, small_grids):
    cfg = CompareConfig(model=tiny_bert_dir, output_dir=str(tmp_path), tasks=["adjective-polarity", "qa-match"],
                        methods=["lora-r2", "adalora", "lora2"], seeds=[0, 1], max_steps=4, batch_size=8,
                        max_train_samples=32, max_eval_samples=16, max_length=24, jobs=1)
    calls, sweeps = [], []
    real_train, real_sweep = compare_module.train, compare_module.train_sweep
    monkeypatch.setattr(compare_module, "train", lambda tc, **kw: calls.append(tc.output_dir) or real_train(tc, **kw))
    monkeypatch.setattr(compare_module, "train_sweep",
                        lambda tcs, **kw: sweeps.append([tc.learning_rate for tc in tcs]) or real_sweep(tcs, **kw))
    report = compare(cfg, command="pytest", progress=False, sweep=True)

    # the sweep: every grid value on seed 0, the best final validation score chosen
    sweep = json.loads((tmp_path / SWEEP_FILE).read_text())
    for task in cfg.tasks:
        for key in cfg.methods:
            entry = sweep["tasks"][task][key]
            assert entry["chosen"] == max(entry["grid"], key=lambda lr: entry["validation"][f"{lr:g}"])
    # 12 sweep runs (LoRA²'s grid of a task as one sweep over one base, the baselines' one by one); the
    # comparison adds seed 1 only: seed 0 at the chosen lr *is* its sweep run
    assert sweeps == [list(LORA2_GRID)] * 2
    assert len(calls) == 2 * 2 * 2 + 2 * 3 and len(report["runs"]) == 2 * 3 * 2
    for run in report["runs"]:
        assert run["lr"] == sweep["tasks"][run["task"]][run["method"]]["chosen"]
        assert run["result"]["test_metrics"] and run["config"]["test_file"].endswith(f"{run['task']}/test.tsv")
        assert [step for step, _ in run["curves"]["eval"]] == [0, 1, 2, 3, 4]  # before, then 4 points
    by_method = {r["method"]: r["result"]["trainable_parameters"] for r in report["runs"]}
    assert by_method["adalora"] > by_method["lora-r2"] > 0 and by_method["lora2"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == json.loads(json.dumps(report["runs"]))

    markdown = (tmp_path / "results.md").read_text()
    assert "## adjective-polarity — sentence-pair regression, pearson" in markdown
    assert "## qa-match — sentence-pair classification, accuracy" in markdown
    assert markdown.count("**best**") + markdown.count("**tied**") >= 2  # every task marks its top
    assert "## LoRA² minus each method, on test, seed by seed" in markdown
    assert "## Learning-rate sweep" in markdown and markdown.count("**") >= 12
    for label in ("AdaLoRA 8→6 (PEFT)", "LoRA² r=8 k=8 →6", "LoRA r=2 (PEFT)"):
        assert markdown.count(f"| {label} |") >= 3  # two task tables and the hyper-parameter table
    for png in ("metric_vs_params.png", "training_curves.png", "lr_sweep.png", "rank_allocation.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG, png

    def no_training(*args, **kwargs):
        raise AssertionError("finished runs must be read back, not trained again")

    monkeypatch.setattr(compare_module, "train", no_training)
    monkeypatch.setattr(compare_module, "train_sweep", no_training)
    again = compare(cfg, command="pytest", progress=False)  # no --sweep: the choices cached in the folder
    assert [r["result"] for r in again["runs"]] == [r["result"] for r in report["runs"]]


@pytest.mark.slow
def test_runs_in_parallel_processes_give_the_same_comparison(tiny_bert_dir, tmp_path, small_grids):
    """--jobs 2 trains runs in two spawned processes; the same runs, configs and (to float noise from
    the thread count) results as one at a time, and a diverged run loses the sweep instead of crashing it."""
    common = dict(model=tiny_bert_dir, tasks=["adjective-polarity"], methods=["lora-r2", "lora2"], seeds=[0, 1],
                  max_steps=3, batch_size=8, max_train_samples=24, max_eval_samples=16, max_length=24)
    serial = compare(CompareConfig(output_dir=str(tmp_path / "one"), jobs=1, **common), progress=False, sweep=True)
    parallel = compare(CompareConfig(output_dir=str(tmp_path / "two"), jobs=2, **common), progress=False, sweep=True)
    assert [(r["task"], r["method"], r["seed"], r["lr"]) for r in parallel["runs"]] == \
        [(r["task"], r["method"], r["seed"], r["lr"]) for r in serial["runs"]]
    for a, b in zip(parallel["runs"], serial["runs"]):
        assert a["result"]["test_metrics"]["pearson"] == pytest.approx(b["result"]["test_metrics"]["pearson"], abs=1e-4)


def test_a_diverged_run_loses_the_sweep(tiny_bert_dir, tmp_path, monkeypatch, small_grids):
    from lora2.regularizer import OrthogonalRegularizer

    real, members = OrthogonalRegularizer.__call__, []

    def diverge_at_high_lr(self):  # LoRA²'s grid trains as one sweep; its member 1 (lr 0.05) diverges
        members.append(id(self)) if id(self) not in members else None
        return real(self) * (float("nan") if members.index(id(self)) == 1 else 1.0)

    monkeypatch.setattr(OrthogonalRegularizer, "__call__", diverge_at_high_lr)
    cfg = CompareConfig(model=tiny_bert_dir, output_dir=str(tmp_path), tasks=["adjective-polarity"],
                        methods=["lora2"], seeds=[0], max_steps=3, batch_size=8, max_train_samples=24,
                        max_eval_samples=16, max_length=24, jobs=1)
    report = compare(cfg, progress=False, sweep=True)
    entry = report["sweep"]["tasks"]["adjective-polarity"]["lora2"]
    assert entry["validation"]["0.05"] == float("-inf") and entry["chosen"] == 0.005
    assert (tmp_path / "runs" / "adjective-polarity" / "lora2" / "lr0.05" / "seed0" / "diverged.txt").is_file()


def test_the_best_mark_needs_more_than_the_seeds_spread():
    rows = [{"test": 0.80, "test_std": 0.01, "mark": ""}, {"test": 0.70, "test_std": 0.02, "mark": ""}]
    compare_module.mark_best(rows)
    assert [r["mark"] for r in rows] == ["best", ""]
    rows = [{"test": 0.80, "test_std": 0.05, "mark": ""}, {"test": 0.76, "test_std": 0.02, "mark": ""},
            {"test": 0.60, "test_std": 0.01, "mark": ""}]
    compare_module.mark_best(rows)
    assert [r["mark"] for r in rows] == ["tied", "tied", ""]


def test_settings_without_learning_rate_choices_need_a_sweep(tiny_bert_dir, tmp_path, caplog):
    with pytest.raises(ValueError, match="no learning-rate choices for these settings.*lora2 compare --sweep"):
        compare(CompareConfig(model=tiny_bert_dir, output_dir=str(tmp_path), max_steps=3), progress=False)
    assert main(["compare", "--max-steps", "3", "--output-dir", str(tmp_path)]) == 2


def test_the_shipped_sweep_covers_the_cpu_default():
    """`lora2 compare` with its defaults runs on the learning rates lora2 ships, chosen on validation."""
    cfg = CompareConfig()
    record, provenance = compare_module.learning_rates(cfg, sweep=False, progress=False)
    assert "shipped with lora2" in provenance
    for task in cfg.tasks:
        for key in cfg.methods:
            entry = record["tasks"][task][key]
            assert entry["chosen"] == max(entry["grid"], key=lambda lr: entry["validation"][f"{lr:g}"])


def test_compare_rejects_unknown_tasks_and_methods(capsys):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mnli'\]"):
        CompareConfig(tasks=["mnli"])
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['dora'\]; choose from"):
        CompareConfig(methods=["dora"])
    assert main(["compare", "--methods", "dora"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers follow their parent through Linux's prctl")
@pytest.mark.parametrize("stop", ["kill-the-parent", "ctrl-c"])
def test_a_stopped_parallel_comparison_leaves_no_worker_training(tiny_bert_dir, tmp_path, stop):
    """Stopping `lora2 compare --jobs 2` must stop its worker processes: left alone, each would go on
    with the runs already queued to it, racing a resumed comparison for their folders. SIGKILL of
    the parent alone (a crash, the OOM killer) and Ctrl-C (SIGINT to the whole process group). (PEFT LoRA:
    LoRA²'s grid trains as one sweep in the comparison's own process.)"""
    psutil = require("psutil", "pip install psutil")
    out = tmp_path / "cmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora2", "compare", "--model", tiny_bert_dir, "--output-dir", str(out), "--tasks",
         "adjective-polarity", "--methods", "lora-r2", "--seeds", "0", "1", "--sweep", "--max-steps", "2000",
         "--jobs", "2", "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    workers: list = []
    try:
        deadline = time.monotonic() + 120
        while not any('"event": "train"' in log.read_text() for log in out.glob("runs/*/*/*/*/log.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "no run started training"
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children(recursive=True)
        started = sorted(p.parent for p in out.glob("runs/*/*/*/*/log.jsonl"))
        if stop == "kill-the-parent":
            proc.send_signal(signal.SIGKILL)  # the parent gets no chance to clean up
            proc.wait(timeout=10)
        else:
            os.killpg(proc.pid, signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 130, stderr[-2000:]
            assert "run the same command again to resume" in stderr
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers still running after their comparison was killed: {alive}"
        # no queued run began: only the runs the two workers held when the stop came (the second may have
        # been starting its run, a log of its own, while the first one's log was read)
        begun = sorted(p.parent for p in out.glob("runs/*/*/*/*/log.jsonl"))
        assert set(started) <= set(begun) and len(begun) <= 2, begun
    finally:  # whatever happened, nothing of this test trains on
        for process in [proc, *workers]:
            try:
                process.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass


def test_compare_keeps_to_its_own_folders(tiny_bert_dir, tmp_path, caplog):
    """The output-folder policy: a folder of someone's files is refused even with --overwrite, another
    lora2 output without it, before anything trains (a comparison continues in its own folder)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert main(["compare", "--model", tiny_bert_dir, "--output-dir", str(mine), "--overwrite"]) == 2
    assert "holds files lora2 did not write (notes.txt)" in caplog.text
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    caplog.clear()
    assert main(["compare", "--model", tiny_bert_dir, "--output-dir", str(run)]) == 2
    assert "holds another lora2 output" in caplog.text and "--overwrite" in caplog.text
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and sorted(p.name for p in run.iterdir()) == [
        "train_config.json"]
    project = tmp_path / "project"  # lora2 train's runs/ (not a comparison's) in someone's project
    (project / "runs" / "lora2-sst2").mkdir(parents=True)
    (project / "runs" / "lora2-sst2" / "train_config.json").write_text("{}")
    (project / "results.md").write_text("my results")
    caplog.clear()
    assert main(["compare", "--model", tiny_bert_dir, "--output-dir", str(project), "--overwrite"]) == 2
    assert "did not write (results.md, runs)" in caplog.text
    assert (project / "results.md").read_text() == "my results"


def test_qlora2_against_peft_qlora_on_one_4bit_base(wide_bert_dir, tmp_path, small_grids):
    """--load-in-4bit: every run of the comparison on the same NF4 base; the table says so. Methods that
    cannot train there are refused before anything runs."""
    require("bitsandbytes", "pip install bitsandbytes")
    cfg = CompareConfig(model=wide_bert_dir, output_dir=str(tmp_path), tasks=["qa-match"], methods=["lora-r2", "lora2"],
                        seeds=[0], max_steps=2, batch_size=8, max_train_samples=16, max_eval_samples=8, max_length=24,
                        jobs=1, evaluations=1, load_in_4bit=True)
    report = compare(cfg, progress=False, sweep=True)
    assert len(report["runs"]) == 2
    quantised = []
    for run in report["runs"]:
        assert run["config"]["load_in_4bit"] and run["result"]["test_metrics"]
        info = json.loads((tmp_path.joinpath(run["config"]["output_dir"]) / "adapter" / "lora2_method.json").read_text())
        assert info["base_4bit"]["quant_type"] == "nf4" and info["base_4bit"]["double_quant"] is False
        quantised.append(info["base_4bit"]["modules"])
    assert quantised[0] == quantised[1] and len(quantised[0]) == 12  # one base: the same layers in 4 bits
    assert "quantised to 4-bit NF4" in (tmp_path / "results.md").read_text()
    assert "load_in_4bit" in json.loads((tmp_path / SWEEP_FILE).read_text())["settings"]
    assert "load_in_4bit" not in CompareConfig().training_settings()  # the shipped CPU sweep still applies
    with pytest.raises(ValueError, match=r"--load-in-4bit: \['full'\] cannot train on a 4-bit base"):
        CompareConfig(methods=["lora2", "full"], load_in_4bit=True)
