"""Tensor-parallel process groups: gloo for step inputs, and the group the layers reduce over.

Each engine owns its groups (no `torch.distributed` global state), so several engines, or a handler plugin
with its own default group, can live in one process. On CPU both groups are one gloo group; on CUDA the
layers reduce over NCCL while step inputs still travel over gloo, since the workers wait for the next step
there for as long as the engine is idle.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

# Workers wait for the next step inside a broadcast, so a collective may block for as long as the engine is
# idle. A peer that dies closes its connection, which fails the collective at once whatever this timeout is.
COLLECTIVE_TIMEOUT = datetime.timedelta(days=365)
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class TPGroup:
    """This process's rank among `size` tensor-parallel ranks; rank 0 is the engine, which schedules and samples."""

    rank: int = 0
    size: int = 1
    cpu_group: Optional[dist.ProcessGroup] = None
    device_group: Optional[dist.ProcessGroup] = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.size > 1:
            self.device_group.allreduce([tensor]).wait()
        return tensor

    def gather_last_dim(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """Every rank's `tensor` joined along the last dimension, in rank order, on rank 0; None elsewhere."""
        if self.size == 1:
            return tensor
        options = dist.GatherOptions()
        options.rootRank = 0
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == 0 else []
        self.device_group.gather([parts] if parts else [], [tensor], options).wait()
        return torch.cat(parts, dim=-1) if parts else None

    def min(self, value: int) -> int:
        """The smallest of every rank's `value`, on every rank."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.cpu_group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU `tensor` copied into every rank's `tensor` (same shape and dtype everywhere)."""
        self.cpu_group.broadcast(tensor, 0).wait()
        return tensor


def create_store(size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free loopback port (`store.port`); the workers connect to it."""
    return dist.TCPStore(
        "127.0.0.1", 0, size, is_master=True, timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False
    )


def connect_store(port: int, size: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)


def join_group(store: dist.Store, rank: int, size: int, device: torch.device) -> TPGroup:
    """Build this rank's groups; blocks until all `size` ranks have called it with the same store."""
    cpu_group = dist.ProcessGroupGloo(dist.PrefixStore("cpu", store), rank, size, COLLECTIVE_TIMEOUT)
    device_group = cpu_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device_group = dist.ProcessGroupNCCL(dist.PrefixStore("device", store), rank, size)
    return TPGroup(rank, size, cpu_group, device_group)


def check_devices(device: str, size: int) -> None:
    """ValueError unless `size` ranks starting at `device` each find a device of their own (CPU ranks share)."""
    base = torch.device(device)
    if base.type != "cuda":
        return
    needed, visible = (base.index or 0) + size, torch.cuda.device_count()
    if needed > visible:
        raise ValueError(f"tensor_parallel_size {size} on {device} needs {needed} visible CUDA devices, found {visible}")


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r runs on the r-th device after the configured one (`cuda` counts from cuda:0); CPU ranks share the CPU."""
    base = torch.device(device)
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)
