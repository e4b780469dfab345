"""torch.distributed set-up from the launcher's environment, and the few collectives training needs.

Launchers and their variables (read as OpenCLIP reads them, first match wins):
- torchrun / PyTorch elastic: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- SLURM (srun, one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR / MASTER_PORT must be
  exported by the job script (e.g. the first host of $SLURM_JOB_NODELIST);
- MPI: PMI_RANK / PMI_SIZE / MPI_LOCALRANKID, OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK.
A world of one process runs without torch.distributed at all. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CosmosError

_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
_RANK_VARS = ("RANK", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise CosmosError(f"environment variable {name}={value!r} is not an integer") from None
    return default


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """(rank, world size, local rank) from the launcher's variables; a single process when none is set."""
    world = World(_first_int(_RANK_VARS, 0), _first_int(_WORLD_VARS, 1), _first_int(_LOCAL_RANK_VARS, 0))
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise CosmosError(f"launcher variables give rank {world.rank} in a world of {world.world_size}")
    return world


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> World:
    """Join the process group when the environment describes a world of several processes.

    device: cuda processes use their LOCAL_RANK's GPU and NCCL; cpu processes use gloo."""
    world = world_from_env()
    if not world.distributed:
        return world
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), world.local_rank)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.setdefault(name, "127.0.0.1" if name == "MASTER_ADDR" else "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank=world.rank, world_size=world.world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None:
        # torchrun --max-restarts keeps its store across restarts: without a prefix per attempt, a restarted rank
        # can read the address a dead rank of the previous attempt published, and the group never forms
        store = dist.PrefixStore(f"cosmos/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size, timeout=timeout)
    return world


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_cat(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's x (same shape on every rank), concatenated along `dim` in rank order; no gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (returns x)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(value: float, device: torch.device | None = None) -> float:
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def all_reduce_min(value: int, device: torch.device | None = None) -> int:
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when `flag` is true on any rank (every rank gets the same answer, so all stop at the same step)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
