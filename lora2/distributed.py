"""Multi-process training on torch.distributed (DDP): what ``lora2 train`` needs to run unchanged
under ``torchrun --nproc_per_node N`` or ``accelerate launch`` (both set RANK / WORLD_SIZE).

How the pieces stay in step across processes:
- data: every rank draws the same shuffled global batch and keeps its 1/N slice (``data.batches``);
- gradients: DDP all-reduces (averages) them, so every rank holds the same gradients;
- allocator: scores are computed from those all-reduced gradients, so every rank computes the same
  scores and masks; DDP also broadcasts buffers (the masks) from rank 0 before each forward, which
  makes rank 0's masks authoritative should float round-off ever differ;
- regulariser: part of every rank's loss and uses only adapter parameters that the forward also
  uses, so DDP sees no unused parameters;
- control: the loss and a stop flag (SIGINT / SIGTERM) are all-reduced each step, so all ranks stop,
  or fail on NaN, at the same step; only rank 0 writes checkpoints, logs and plots.

FSDP is refused: LoRA² adapters are a few MB, so sharding buys nothing, and the allocator needs
whole λ / B₁ / A₂ tensors on every rank. Use DDP (plain ``torchrun`` or ``accelerate launch``
with ``distributed_type: MULTI_GPU``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError

logger = logging.getLogger(__name__)

FSDP_MESSAGE = ("FSDP is not supported by lora2: the adapters are tiny, so sharding them saves nothing, and the rank "
                "allocator needs whole λ / B₁ / A₂ tensors on every rank. Use DDP instead: `torchrun "
                "--nproc_per_node N -m lora2 train ...` or `accelerate launch` with distributed_type MULTI_GPU.")


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def broadcast_object(self, value: object) -> object:
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def refuse_fsdp(model: nn.Module | None = None) -> None:
    """Raise the FSDP message if FSDP is requested (accelerate's env flag) or already applied."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        raise InputError(FSDP_MESSAGE)
    if model is not None:
        for module in model.modules():
            if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule") or any(
                    type(c).__name__ == "FSDPModule" for c in type(module).__mro__):
                raise InputError(FSDP_MESSAGE)


def init_from_env(device_type: str) -> DistributedContext:
    """Join the process group that torchrun / accelerate describe in the environment, if any.

    A process group the user already created (their own DDP or accelerate loop) is used as is.
    """
    refuse_fsdp()
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    logger.info("joined %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


def wrap(model: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """DDP-wrap ``model`` when running in several processes; the model itself otherwise."""
    refuse_fsdp(model)
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
