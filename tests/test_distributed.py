"""Multi-process training on the CPU with gloo: ranks agree exactly, and 2 processes match 1 process
with the same global batch (to float tolerance) — through the Python API in a user's own DDP loop
and through ``lora2 train`` under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file

from lora2 import LoRA2Config, get_lora2_model
from lora2.allocator import RankAllocator
from lora2.train import TrainConfig, train

STEPS = 8
GLOBAL_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_ddp_loop(rank: int, world_size: int, port: int, out: str) -> None:
    """What a user writes: their model, their DDP, their optimiser; lora2's model and allocator."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=101, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = get_lora2_model(transformers.BertForSequenceClassification(cfg), LoRA2Config(
        r=4, k=4, target_rank=2, total_steps=STEPS, init_warmup=1, final_warmup=2, mask_interval=1, beta1=0.9,
        beta2=0.5))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    allocator = RankAllocator(model.lora2_layers(), model.lora2_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(3, 100, (GLOBAL_BATCH, 9), generator=g)
        labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
        mine = slice(rank, None, world_size)  # this rank's share of the global batch
        loss = ddp(input_ids=ids[mine], labels=labels[mine]).loss
        loss.backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad(set_to_none=True)
    torch.save(model.adapter_state_dict(), Path(out) / f"world{world_size}-rank{rank}.pt")
    dist.destroy_process_group()


def test_user_ddp_loop_ranks_agree_and_match_one_process(tmp_path):
    for world_size in (2, 1):
        mp.spawn(_user_ddp_loop, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    rank0, rank1, single = (torch.load(tmp_path / f, weights_only=True)
                            for f in ("world2-rank0.pt", "world2-rank1.pt", "world1-rank0.pt"))
    assert rank0.keys() == rank1.keys() == single.keys()
    masks = [k for k in rank0 if k.endswith("rank_mask")]
    assert any(not rank0[k].all() for k in masks), "the allocator should have pruned something by the end"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        if key.endswith("rank_mask"):
            assert torch.equal(rank0[key], single[key]), f"pruning decision differs from 1 process: {key}"
        else:
            torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


def _train_args(model_dir: str, files: Path, out: Path) -> list[str]:
    return ["train", "--model", model_dir, "--dataset", "none", "--train-file", str(files / "train.tsv"),
            "--validation-file", str(files / "val.tsv"), "--output-dir", str(out), "--max-steps", "6",
            "--batch-size", "8", "--max-length", "24", "--eval-every", "3", "--log-every", "1", "--initial-rank", "4",
            "--inner-width", "4", "--target-rank", "2", "--init-warmup", "1", "--final-warmup", "1",
            "--mask-interval", "1",
            "--no-progress"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def one_process_run(tiny_bert_dir, small_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    subprocess.run([sys.executable, "-m", "lora2", *_train_args(tiny_bert_dir, small_files, out)],
                   check=True, env=ENV, capture_output=True, timeout=300)
    return out


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "{port}"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                   "{port}"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_cli_under_launcher_matches_one_process(launcher, tiny_bert_dir, small_files, one_process_run, tmp_path):
    out = tmp_path / "two"
    command = [part.format(port=_free_port()) for part in LAUNCHERS[launcher]]
    done = subprocess.run([*command, "-m", "lora2", *_train_args(tiny_bert_dir, small_files, out)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(one_process_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # only rank 0 writes: one log line per step, one result
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(1, 7))
    assert json.loads((out / "result.json").read_text())["steps"] == 6


def test_fsdp_is_refused_with_what_to_use(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP is not supported.*Use DDP instead"):
        train(TrainConfig(output_dir=str(tmp_path)), progress=False)


def test_global_batch_must_split_evenly(monkeypatch, tmp_path):
    from lora2 import distributed

    monkeypatch.setattr(distributed, "init_from_env", lambda device_type: distributed.DistributedContext(0, 3, 0))
    monkeypatch.setattr("lora2.train.init_from_env", distributed.init_from_env)
    with pytest.raises(ValueError, match="batch_size 32 must be a multiple of the 3 processes"):
        train(TrainConfig(output_dir=str(tmp_path)), progress=False)
