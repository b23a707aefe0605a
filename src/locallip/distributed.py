"""Data parallelism for the stages: torch.distributed under ``torchrun`` (NCCL on GPUs, gloo on CPU).

One process per GPU (or per CPU worker): ``torchrun --nproc-per-node N --no-python
locallip train ...``. Without torchrun's environment (``WORLD_SIZE`` unset or 1)
everything here is a no-op, so the stages run unchanged in one process.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (on one process: ``[obj]``)."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: List[float]) -> List[float]:
        """Element-wise sum of a list of numbers over the ranks."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()


@contextmanager
def process_group(device_preference: str = "auto") -> Iterator[Group]:
    """The process group torchrun set up in the environment (joined here, left on exit)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Group()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield Group(rank=rank, world=world, local_rank=local_rank)
    finally:
        if created:
            dist.destroy_process_group()


def shard(n: int, group: Group) -> range:
    """The indices 0..n-1 this rank handles (round robin): every rank the same count, up to one."""
    return range(group.rank, n, group.world)


def set_threads(threads: int, group: Group) -> None:
    """``threads`` for the whole job, shared by its processes (0: torch's default)."""
    if threads > 0:
        torch.set_num_threads(max(1, threads // group.world))


def choose_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a stage runs on: "cuda" (an error without one), "cpu", or "auto" (CUDA when present)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
