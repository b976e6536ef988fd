"""Per-rank memory of an FSDP2-sharded LoRA² model: the LLaMA-1.1B shape in bf16, N = 1 and 2 ranks, on CPU.

    python -m benchmarks.fsdp_memory            # launches torchrun for N = 1 and 2, prints a table

Each rank builds the model on the meta device, adds LoRA² adapters, shards it as ``lora2 train --fsdp``
does (``fully_shard`` per decoder block and the root, the adapter kept whole), materialises its shards
and writes them once (so the pages are really resident), then reports the parameter bytes it holds and
how much its resident memory grew. Measured, not modelled; no weights are read, so it takes seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


def _rank_main(out: str) -> None:
    import psutil
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lora2 import LoRA2Config, get_lora2_model
    from lora2.fsdp import local_parameter_bytes

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_1B, torch_dtype=torch.bfloat16))
        base.to(torch.bfloat16)
        model = get_lora2_model(base, LoRA2Config(r=8, k=8, target_rank=6, total_steps=100))
    whole = set(model.trainable_parameters())
    mesh = init_device_mesh("cpu", (world,))
    for block in base.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=whole)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    process = psutil.Process()
    before = process.memory_info().rss
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).zero_()  # touch every page
    grown = process.memory_info().rss - before
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    Path(out, f"world{world}-rank{rank}.json").write_text(json.dumps(
        {"world": world, "rank": rank, "local_bytes": local_parameter_bytes(model), "base_bytes": frozen,
         "adapter_bytes": adapter, "rss_growth": grown}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                            "--master_port", str(_free_port()), "-m", "benchmarks.fsdp_memory", "--rank-main", out],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows += [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"world{world}-*.json"))]
    gib = 2 ** 30
    print("| ranks | rank | base params held (GiB) | share of the base | adapter (MiB, whole) | RSS growth (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        held = r["local_bytes"] - r["adapter_bytes"]
        print(f"| {r['world']} | {r['rank']} | {held / gib:.3f} | {held / r['base_bytes']:.3f} | "
              f"{r['adapter_bytes'] / 2 ** 20:.1f} | {r['rss_growth'] / gib:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-main":
        _rank_main(sys.argv[2])
    else:
        main()
