"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

``torchrun --standalone --nproc_per_node 2 -m minidiff.cli train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them this is a single process and every helper is a no-op. The backend is nccl on GPUs and gloo on CPU. Only rank 0
writes files; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model`` (which it syncs from rank 0) when there are several processes."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, skip: bool):
        """Accumulate gradients locally (no all-reduce) on all but the last micro-batch of a step."""
        return model.no_sync() if skip and self.enabled else contextlib.nullcontext()

    def mean(self, value: torch.Tensor) -> float:
        """Average of a scalar over the processes."""
        if self.enabled:
            value = value.detach().to(self.device, torch.float64)
            dist.all_reduce(value)
            value = value / self.world_size
        return float(value)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed() -> Distributed:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Distributed(rank=rank, world_size=world_size, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
