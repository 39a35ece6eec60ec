"""The processes that train together: one, or several started by torchrun (torch.distributed), and what they must
agree on. In a single process every method is a no-op, so the training loop reads the same for one process and many.

Several processes share every global batch: each holds the training examples whose position modulo the number of
processes is its rank, and takes from each batch of the shared order the examples it holds. A batch's noise is drawn
whole by every process, each keeping its examples' rows, so an update does not depend on how many processes made it.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .errors import VaekitError


class Part(NamedTuple):
    """The rows of a batch of `size` examples that this process computes (random draws are made for all of them)."""

    rows: torch.Tensor
    size: int


class World:
    """This process's place among those that train together, read from torchrun's environment variables."""

    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")  # where collectives run: the CPU for gloo, this process's GPU for NCCL

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory and speaks (rank 0)."""
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        """Join the other processes (gloo on CPUs, NCCL on GPUs) and return the device this one trains on."""
        if self.size == 1:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise VaekitError(f"several processes train on CPUs or CUDA GPUs, not on {device.type}")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            atexit.register(dist.destroy_process_group)
        self.device = device
        return device

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """The examples of x that this process holds: those at positions rank, rank + size, ..."""
        return x if self.size == 1 else x[self.rank :: self.size]

    def part(self, batch: torch.Tensor) -> tuple[torch.Tensor, Part | None]:
        """This process's examples of a batch of positions: their places in its shard, and their rows in the batch."""
        if self.size == 1:
            return batch, None
        mine = (batch % self.size == self.rank).nonzero().flatten()
        return batch[mine] // self.size, Part(mine, len(batch))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes."""
        if self.size == 1:
            return t
        total = t.detach().to(self.device, copy=True)
        dist.all_reduce(total)
        return total.to(t.device)

    def most(self, value: int) -> int:
        """The largest of every process's value."""
        if self.size == 1:
            return value
        t = torch.tensor(value, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def share(self, obj: Any) -> Any:
        """The main process's obj, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def wait(self) -> None:
        """Return when every process has got here."""
        if self.size > 1:
            dist.barrier()


def binarize(x: torch.Tensor, part: Part | None = None) -> torch.Tensor:
    """A Bernoulli draw of x (values in [0, 1]); for a part, drawn for its whole batch and its rows kept."""
    u = torch.rand_like(x) if part is None else torch.rand(part.size, *x.shape[1:], device=x.device)[part.rows]
    return (u < x).to(x.dtype)
