"""FSDP2: fine-tune a base that outgrows one device, with the LoRA² kernels and the allocator unchanged.

It is the frozen base that outgrows a GPU (LLaMA-70B in bf16 is 140 GB), not the adapter (a few MB).
So the base is sharded and the adapter is not:

- ``fully_shard`` wraps every decoder block (the model's ``_no_split_modules``, or the classes the
  user names) and the root. FSDP2 all-gathers a block's weights just before its forward and again
  before its backward, and frees them after each, so a rank holds 1/N of the base plus one block.
  The LoRA² kernels run inside the block and see the gathered (plain) weight.
- The trainable parameters (the LoRA² factors, λ and the task head) are ``ignored_params``: every rank
  holds them whole, as under DDP, and ``sync_gradients`` averages their gradients with one all-reduce
  per optimiser step. The rank allocator therefore scores whole λ / B₁ / A₂ from the averaged
  gradients: the same scores, masks and budget on every rank and as in one process. Sharding λ
  (r = 8: 4 values a rank) and B₁ / A₂ along different axes would leave no rank able to score a value.
- Because the adapter is whole on every rank, rank 0 saves it, its optimiser state and the allocator
  state exactly as one process does: checkpoints are interchangeable between one process, DDP and
  FSDP, and ``--resume`` works across them.

Loading: rank 0 reads the checkpoint into CPU memory, the other ranks build the model on the meta
device (no memory); after sharding, ``set_model_state_dict(..., broadcast_from_rank0=True)`` sends every
rank its shards, one tensor at a time. This is transformers' and accelerate's "CPU-RAM-efficient
loading": no GPU ever holds more than its shard, but rank 0's CPU memory holds the base once.
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
class FSDPOptions:
    """How ``lora2 train --fsdp`` shards the base (launch options: not saved with the run's settings,
    so a run can be resumed with or without FSDP)."""

    wrap: tuple[str, ...] | None = None  # module class names to shard one by one; None: _no_split_modules
    cpu_offload: bool = False  # keep the sharded base in CPU memory between uses (CUDA only)


def options_from_accelerate(options: FSDPOptions | None) -> FSDPOptions:
    """``options``, or what ``accelerate launch`` with an FSDP2 config says (wrap classes, offload)."""
    if options is not None:
        return options
    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return FSDPOptions(wrap=tuple(c.strip() for c in classes.split(",") if c.strip()) or None,
                       cpu_offload=os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that stay whole on every rank (``ignored_params`` of ``fully_shard``)."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


def block_classes(model: nn.Module, wrap: tuple[str, ...] | None) -> tuple[str, ...]:
    """Class names of the modules each sharded on their own: ``wrap``, else the transformers model's
    ``_no_split_modules`` (its decoder / encoder blocks)."""
    present = {type(m).__name__ for m in model.modules()}
    if wrap:
        missing = [c for c in wrap if c not in present]
        if missing:
            raise InputError(f"--fsdp-wrap {', '.join(missing)}: no module of that class in this model. Its block "
                             f"classes include {sorted(c for c in present if 'Layer' in c or 'Block' in c)}.")
        return tuple(wrap)
    names = tuple(c for m in model.modules() for c in (getattr(m, "_no_split_modules", None) or ()))
    found = tuple(sorted({c for c in names if c in present}))  # sorted: the same on every rank
    if not found:
        raise InputError(f"{type(model).__name__} names no _no_split_modules (its blocks); say which module class "
                         "to shard one by one with --fsdp-wrap CLASS (e.g. LlamaDecoderLayer).")
    return found


def meta_copy_of(config, task: str) -> nn.Module:
    """The model ``load_base_model`` would build for ``task`` from ``config``, on the meta device (no memory):
    what ranks other than 0 start from before their shards arrive."""
    import transformers

    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


def shard(model: nn.Module, mesh, options: FSDPOptions, param_dtype: torch.dtype | None = None) -> nn.Module:
    """``fully_shard`` ``model`` (a LoRA² / PEFT-wrapped transformers model) per block and at the root,
    keeping its trainable parameters whole, and give every rank its shards of rank 0's weights.

    On rank 0 ``model`` holds the loaded weights; on the other ranks it may be on the meta device.
    Returns ``model`` (now an ``FSDPModule``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = torch.device(mesh.device_type, torch.cuda.current_device() if mesh.device_type == "cuda" else None)
    if options.cpu_offload and device.type != "cuda":
        raise InputError("--fsdp-cpu-offload keeps the sharded base in CPU memory between GPU uses; this run is "
                         "on the CPU already. Drop --fsdp-cpu-offload.")
    rank = dist.get_rank()
    full_state = model.state_dict() if rank == 0 else {}  # rank 0's whole tensors, broadcast once sharded
    whole = trainable_parameters(model)  # a list: every rank must broadcast them in the same order
    ignored = set(whole)
    # bf16 / fp16 weights are all-gathered in that dtype (half the traffic); gradients exist only for the
    # ignored (whole, fp32) trainable parameters, which sync_gradients reduces in fp32.
    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy(),
                  mesh=mesh, ignored_params=ignored)
    classes = block_classes(model, options.wrap)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in blocks:
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model.to_empty(device="cpu" if options.cpu_offload else device)
        whole = trainable_parameters(model)  # to_empty replaced the meta Parameters with new ones
    # fully_shard moved what it manages to the mesh's device; the whole tensors and the buffers are the
    # caller's to place (rank 0 loaded them on the CPU): on the compute device, where the kernels and
    # the broadcast (NCCL on GPUs) need them. `.data` keeps the Parameter objects.
    with torch.no_grad():
        for p in whole:
            if p.device != device:
                p.data = p.data.to(device)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[name] = buffer.to(device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    # set_model_state_dict skips non-persistent buffers (rotary frequencies, position ids) and the whole
    # (ignored) tensors need rank 0's values too: broadcast them all, once.
    with torch.no_grad():
        for tensor in (*whole, *model.buffers()):
            dist.broadcast(tensor.data, src=0)
    if rank == 0:
        logger.info("FSDP2: %d %s blocks and the root sharded over %d ranks; %d trainable tensors kept whole",
                    len(blocks), "/".join(classes), mesh.size(), len(ignored))
    return model


def sync_gradients(parameters: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of the whole (ignored) parameters across ranks: one all-reduce of one flat
    buffer, as DDP does. Call after the backward of an optimiser step's last micro-batch."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if world_size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its shards of the sharded ones, whole tensors otherwise."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        seen[id(p)] = local.numel() * local.element_size()
    return sum(seen.values())
