"""Data-parallel training over several processes, as ``torchrun`` launches them.

``torchrun --nproc_per_node=N -m SemiSupSegLib.backend train ...`` starts N copies of the
command; each learns its rank from the WORLD_SIZE, RANK and LOCAL_RANK variables torchrun
sets. How the copies share the work (see ``training.train``):

- one process group: NCCL when training on CUDA (rank r uses ``cuda:LOCAL_RANK``), gloo on
  CPUs;
- every network trained by gradient is wrapped in DistributedDataParallel, which averages its
  gradients across ranks in backward, so all ranks keep identical weights (EMA teachers follow
  identical students and need no wrapping);
- every rank draws its own patches: the unlabeled cases are sharded (``shard``), the labeled
  patch stream gets a seed per rank (``rank_seed``); each rank trains ``batch_size`` patches,
  so the effective batch is ``world size x batch_size``;
- only rank 0 writes outputs (run files, checkpoints, events); the other ranks stay silent.

Without torchrun (or with one process) nothing here does anything: no process group.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from SemiSupSegLib.backend.errors import ConfigError

T = TypeVar("T")

#: Test hook: when set to a folder, every rank saves its final method state there as
#: ``rank<r>.pt`` (outside the run folder), so a test can check that the replicas agree.
RANK_STATE_DIR = "SEMISUPSEG_RANK_STATE_DIR"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process: gradients are averaged, data is shared out."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and reports progress."""
        return self.rank == 0


def launched() -> World:
    """The world torchrun announces in WORLD_SIZE, RANK and LOCAL_RANK (one process if unset)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ConfigError(f"bad torchrun environment (WORLD_SIZE/RANK/LOCAL_RANK): {err}") from None
    if size <= 1:
        return World()
    return World(rank, size, local_rank)


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a torchrun launch."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launched().is_main


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the other ranks for the block when launched by torchrun; do nothing otherwise.

    The backend follows the training device: NCCL for CUDA (after selecting
    ``cuda:LOCAL_RANK``), gloo for the CPU. A group someone else initialised is used as is and
    left open.
    """
    world = launched()
    if not world.enabled:
        yield world
        return
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"training on several processes needs CUDA or the CPU, not {device.type!r}; "
            "use --device cuda or --device cpu"
        )
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), world.local_rank)
    finally:
        if owned:
            dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` under torchrun, else ``device``."""
    if world.enabled and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def active() -> bool:
    """A process group is open (torchrun with more than one process)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if active():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: ranks decide together (e.g. to stop at
    the same iteration, so none waits forever for the others' gradients)."""
    if not active():
        return flag
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    value = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def replicate(
    module: nn.Module, device: torch.device, find_unused_parameters: bool = False
) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when a process group is open, else itself.

    DDP broadcasts rank 0's parameters and buffers at construction (and its buffers before
    every forward) and averages gradients in every backward that follows a forward *through
    the wrapper*. ``find_unused_parameters`` is for modules whose forward leaves some
    trainable parameters out of the result (a cost per step: DDP then walks the graph).
    """
    if not active():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def share_buffers(modules: Iterable[nn.Module]) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm statistics), as DDP does before each
    forward: after the last step the ranks' own updates have made them differ."""
    if not active():
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def shard(items: Sequence[T], world: World) -> List[T]:
    """This rank's share ``items[rank::size]``: ranks draw from disjoint cases. With fewer items
    than ranks every rank keeps them all (random patches still differ per rank)."""
    if not world.enabled or len(items) < world.size:
        return list(items)
    return list(items[world.rank :: world.size])


def rank_seed(seed: int, world: World) -> int:
    """A seed of this rank's own: ``seed`` on rank 0 (a single process is unchanged)."""
    return seed + 1_000_003 * world.rank


def dump_rank_state(state: Any, world: World) -> None:
    """Test hook: save this rank's final ``state`` under ``$SEMISUPSEG_RANK_STATE_DIR``."""
    folder = os.environ.get(RANK_STATE_DIR)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(folder) / f"rank{world.rank}.pt")
