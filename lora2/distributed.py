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

FSDP (``lora2 train --fsdp``, for a base that outgrows one device) is ``fsdp.py``: the base is
sharded instead of replicated, the adapter stays whole on every rank as here, and everything above
holds for it too.
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


def fsdp_requested(flag: bool) -> bool:
    """--fsdp, or ``accelerate launch`` with an FSDP config (it says so in the environment)."""
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
    if from_accelerate and os.environ.get("FSDP_VERSION", "1") != "2":
        raise InputError("accelerate asks for FSDP version 1; lora2 shards with FSDP2 (fully_shard). Set "
                         "`fsdp_version: 2` in the accelerate config (or `accelerate launch --fsdp_version 2`).")
    if (flag or from_accelerate) and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        raise InputError("FSDP and DeepSpeed were both asked for; lora2 shards with FSDP2 only. Drop DeepSpeed "
                         "from the accelerate config.")
    return flag or from_accelerate


def init_from_env(device_type: str, require_group: bool = False) -> DistributedContext:
    """Join the process group that torchrun / accelerate describe in the environment, if any
    (``require_group``: FSDP, which needs one even for a single process, or fails saying how to launch).

    A process group the user already created (their own DDP or accelerate loop) is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not (require_group and "WORLD_SIZE" in os.environ):
        if require_group:
            raise InputError("--fsdp shards the model across the processes of a launcher, and there is none: run "
                             "`torchrun --nproc_per_node N -m lora2 train --fsdp ...` (N = 1 works too), or "
                             "`accelerate launch` with an FSDP2 config.")
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
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
