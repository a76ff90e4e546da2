"""Data-parallel training of one fold over several processes (`torchrun`, `cv --nproc N`), with
PyTorch's own `torch.distributed` and `DistributedDataParallel`.

torchrun starts the ranks and sets RANK, WORLD_SIZE and LOCAL_RANK; `start` joins them into one
process group (NCCL on GPUs, gloo on CPUs). Each rank trains on its share of every global batch
(`share`); DDP averages the gradients, and the sums the epoch reports are added up over the ranks
(`all_sum`). Validation and prediction rows are split between the ranks and gathered back
(`gather_rows`), so every rank holds the same scores; only rank 0 (`is_main`) writes files.
Without torchrun every function here is the one-process identity.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import KaggleVitError

# How long a rank waits for the others at a collective before it gives up (a rank killed mid-epoch
# makes torchrun stop the rest well before this).
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """Whether this process is one of several ranks started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes the run folder (and every process without torchrun)."""
    return rank() == 0


def start(device: str) -> str:
    """Join torchrun's ranks into one process group (NCCL when training on CUDA, else gloo) and
    return the device this rank trains on: its own GPU (cuda:LOCAL_RANK) when the device is CUDA."""
    if not launched() or active():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local >= torch.cuda.device_count():
            raise KaggleVitError(f"rank {local} has no GPU of its own ({torch.cuda.device_count()} visible); "
                                 f"start at most that many processes per machine")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return device


def stop() -> None:
    """Leave the process group (after every rank has reached this point)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def share(n: int) -> slice:
    """This rank's contiguous share of n items (sizes differ by at most one, lower ranks first)."""
    if not active():
        return slice(0, n)
    base, extra = divmod(n, world())
    r = rank()
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def _collective_device() -> torch.device:
    """Where collective tensors live: NCCL moves only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` added up over the ranks (every rank gets the total), on the values' own device."""
    if not active():
        return values
    moved = values.to(_collective_device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(values.device)


def gather_rows(part: torch.Tensor) -> torch.Tensor:
    """Each rank's `share` of the rows of a tensor, put back together in rank order on every rank."""
    if not active():
        return part
    moved = part.to(_collective_device())
    sizes = [torch.zeros((), dtype=torch.long, device=moved.device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor(len(moved), device=moved.device))
    longest = int(max(s.item() for s in sizes))
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[: len(moved)] = moved
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(part.device)


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (what only rank 0 may decide: a fold's claim, the run's plan)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
