"""The only module that reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE).

Launch with ``torchrun --nproc-per-node N -m diffmis train CONFIG`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "is_main_process", "barrier", "all_reduce_sum", "all_reduce_max_float",
           "all_gather_objects",
           "average_gradients", "broadcast_module", "sync_buffers", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a copy; ``t`` itself is unchanged). Identity in a single process."""
    out = t.clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max_float(value: float, device: torch.device) -> float:
    """The largest ``value`` over ranks (e.g. elapsed seconds, so that every rank takes the same decision).
    ``value`` itself in a single process."""
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """List of ``obj`` from every rank (rank order). ``[obj]`` in a single process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Mean of the gradients over ranks with one flattened all-reduce (DDP's arithmetic, done by hand because a
    method's phases may run one network several times per iteration)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's weights and buffers to every rank (identical starting points)."""
    if dist.is_initialized():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank, after each optimizer step."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
