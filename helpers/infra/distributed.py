"""Data-parallel encoding with torchrun (torch.distributed): several processes, GPUs or machines share one encode.

    torchrun --nproc_per_node N -m helpers predict CONFIG --output-dir DIR

Every process (rank) takes every N-th of an encode's fixed batches (`World.share`) and writes them into the shared
embedding cache; the ranks meet at a barrier; rank 0 alone scores, ensembles and writes the outputs. The batches are
the same as in one process, so the numbers are too. A rank that fails ends the run (torchrun stops the others), and
a rerun encodes only what no rank finished. Without torchrun's environment this is one process, and nothing here
does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from ..config import ConfigError

if TYPE_CHECKING:  # torch is imported where a process group is used: one process (a run's own) needs none of it
    import torch

# a rank waits at a barrier while the others finish their share of an encode: hours, for a large set
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank on this machine: which GPU it uses

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's part of `items`: every size-th, from its rank on (interleaved, so the parts take alike)."""
        return items[self.rank::self.size]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, value):
        """Rank 0's `value` on every rank (what each rank would compute alone can differ: another run may write
        into a shared cache between two ranks' looks)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: its own GPU when the run is on CUDA."""
        if self.size > 1 and device.type == "cuda":
            import torch

            return torch.device("cuda", self.local_rank)
        return device


ONE_PROCESS = World()


def init_world(device: torch.device) -> World:
    """The process group that torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR),
    on NCCL for GPUs and gloo for CPUs; one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ONE_PROCESS
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"torchrun started a process for GPU {local_rank}, but this machine has "
                                  f"{torch.cuda.device_count()}: give --nproc_per_node (or --nproc) at most that")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def leave_process_group() -> None:
    """Leave the process group, if one was joined (torch warns about one left open)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
