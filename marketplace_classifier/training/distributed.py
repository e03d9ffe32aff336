"""One process or many: what training needs to know about its place among torchrun's processes.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) training joins a process
group (nccl on CUDA, gloo on CPU) and wraps the trainable part in DistributedDataParallel.
Alone, the same code runs with a world of one, so both paths share every line of the loop.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

# Rank 0 computes the frozen features while the others wait at a barrier: allow for big data.
FEATURE_WAIT = timedelta(hours=3)


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (filling caches); the others run it after."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Element-wise sum over all processes (the tensor travels on `device`: nccl needs CUDA)."""
        if not self.distributed:
            return values
        values = values.to(device)
        dist.all_reduce(values)
        return values.cpu()

    def gather(self, value) -> list:
        """Every process's `value`, in rank order."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


ALONE = Cluster()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def join(device: torch.device) -> tuple[Cluster, torch.device]:
    """The process group torchrun describes in the environment, and this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Cluster(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=FEATURE_WAIT)
    return Cluster(rank, world_size, local_rank, backend), device


def leave(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()


def per_process_batch(batch_size: int, cluster: Cluster) -> int:
    """`--batch-size` is the global batch: each process takes an equal part of it."""
    if batch_size % cluster.world_size:
        raise ValueError(f"--batch-size {batch_size} does not split evenly over "
                         f"{cluster.world_size} processes; use a multiple of {cluster.world_size}")
    return batch_size // cluster.world_size


def train_order(count: int, seed: int, epoch: int, cluster: Cluster) -> list[int]:
    """This process's shuffled shard of `count` training samples for `epoch`.

    The permutation depends only on seed and epoch, and process r takes every world_size-th
    position from r, so the processes' batches of one step together are exactly the global
    batch a single process would take. The tail that does not split evenly is dropped (at
    most world_size - 1 samples, different ones each epoch), which keeps shards disjoint.
    """
    sampler = DistributedSampler(range(count), num_replicas=cluster.world_size, rank=cluster.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def eval_order(count: int, cluster: Cluster) -> list[int]:
    """Every world_size-th sample from this rank: no padding, so reduced metrics count each once."""
    return list(range(cluster.rank, count, cluster.world_size))


def wrap(module: nn.Module, cluster: Cluster, device: torch.device, sync_buffers: bool) -> nn.Module:
    """DistributedDataParallel around the trainable part when there are several processes.

    Frozen encoders keep their pretrained batch-norm statistics, so their buffers need no
    syncing each step; fine-tuning syncs rank 0's running statistics before every forward.
    """
    if not cluster.distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               forward_sync_buffers=sync_buffers)
