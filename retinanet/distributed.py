"""Process groups for multi-GPU / multi-node runs.

Two ways in: `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous come
from the environment) or the command itself, which starts one process per
visible GPU on localhost when there is more than one. NCCL on GPUs, gloo on
the CPU. Every helper here is a no-op in a single process.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import BATCH_PER_GPU
from .errors import UserError


@dataclass(frozen=True)
class Place:
    """Where this process sits: global rank, world size, rank on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def from_env() -> Place | None:
    """The place torchrun (or any launcher setting its variables) gave us, if any."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    return Place(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def device_for(place: Place) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", place.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# Long enough for rank 0 to write a large checkpoint to a slow disk while the
# others wait in the next step's all-reduce; short enough that a lost rank ends
# the job within the hour instead of hanging it.
DEFAULT_TIMEOUT_S = 1800.0


def init(place: Place, device: torch.device, init_method: str = "env://", timeout_s: float | None = None) -> None:
    """Join the process group: NCCL for GPU processes, gloo for CPU ones."""
    if place.world <= 1 or is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    dist.init_process_group(
        backend, init_method=init_method, rank=place.rank, world_size=place.world, timeout=timeout, **kwargs
    )


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (a new tensor; the input is left as it was)."""
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if world_size() == 1:
        return items
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def raise_first_error(error: UserError | None) -> None:
    """A collective: each rank passes its error or None; if any rank had one, every
    rank raises the lowest failing rank's, prefixed with that rank. Every rank
    then stops at the same point (none is left waiting in a collective) and
    rank 0, which alone prints, reports it once."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    errors = gather_lists([(rank(), str(error))] if error is not None else [])
    if errors:
        first, message = errors[0]
        raise UserError(f"[rank {first}] {message}")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_batch() -> int:
    """Images per batch when --batch is not given: BATCH_PER_GPU per visible GPU, as many on the CPU."""
    return BATCH_PER_GPU * max(1, torch.cuda.device_count())
