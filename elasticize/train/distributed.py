"""The process group a training job runs in (``torch.distributed``): this process's rank and the world size."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "process_group"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[int, int, str]]:
    """``(rank, world size, device)`` of this process; joins the ``torchrun`` job it was started in.

    When ``WORLD_SIZE > 1`` (set by ``torchrun``) and no process group exists yet, one is created
    (NCCL for CUDA, gloo otherwise; a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK``) and destroyed on
    exit. An existing process group (the caller's) is used as it is.

    Raises:
        ValueError, RuntimeError: :func:`torch.distributed.init_process_group` cannot join the
            job (e.g. ``MASTER_ADDR`` unset, a rendezvous that times out).
    """
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size(), device
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1, device
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dev.index is None else dev
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), str(dev)
    finally:
        dist.destroy_process_group()
