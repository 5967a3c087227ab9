"""torch.distributed for the trainer: the process group torchrun sets up, the all-reduce of adapter
gradients, and FSDP2 sharding of the frozen base.

    torchrun --nproc_per_node=8 -m engine.cli train recipes/mapcoder_lite_qwen2.5_7b.toml
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m engine.cli train RECIPE   # CPU, gloo

Data parallelism over adapters only. The base is frozen, so there is nothing to synchronise but the LoRA
gradients: after a step's micro-batches, one flat all-reduce (SUM) of every adapter gradient. Each rank's loss
is already divided by the token count of the *global* batch, so the summed gradient is exactly the gradient
of the global token mean (no DDP wrapper, no division by world size, no hooks).

FSDP2 (`fsdp = true`): `fully_shard` each decoder block and the root over the frozen base weights, with the
LoRA parameters passed as `ignored_params`: the base is sharded (all-gathered per block in forward/backward),
the adapters stay whole on every rank and go through the same all-reduce as without FSDP. For bases too big
for one GPU. Written against torch 2.13's `torch.distributed.fsdp.fully_shard`; exercised on CPU/gloo by
tests/train/test_distributed.py, not yet run on CUDA/NCCL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.
    device: "auto" (cuda when available), "cpu" or "cuda"; under torchrun each rank takes cuda:LOCAL_RANK."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}; expected 'auto', 'cpu' or 'cuda'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device='cuda' but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def close(d: DistInfo) -> None:
    if d.on and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: DistInfo) -> None:
    if d.on:
        dist.barrier()


def all_reduce_sum_(tensors: list[torch.Tensor], d: DistInfo) -> None:
    """In-place SUM across ranks of a list of tensors, as one flat fp32 buffer (one collective).
    The rank order of the sum is the backend's; with two ranks a + b is exact and commutative."""
    if not d.on or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def broadcast_(tensors: list[torch.Tensor], d: DistInfo, src: int = 0) -> None:
    """Make every rank hold rank `src`'s values (used once at start for the adapters)."""
    if d.on:
        for t in tensors:
            dist.broadcast(t.data, src)


def shard_base(model: nn.Module, d: DistInfo) -> int:
    """FSDP2: shard the frozen base across ranks, block by block; adapters stay replicated (ignored_params).
    Returns the number of base tensors now held as sharded DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(d.device.type, (d.world,))
    lora = {p for n, p in model.named_parameters() if "lora_" in n}
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=lora)
    fully_shard(model, mesh=mesh, ignored_params=lora)
    from torch.distributed.tensor import DTensor
    return sum(isinstance(p, DTensor) for p in model.parameters())
