"""Process group from the environment, as torchrun or submitit's ``TorchDistributedEnvironment().export()``
set it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

No WORLD_SIZE (or WORLD_SIZE=1) means one process and no process group at all, so a laptop run needs
no rendezvous. NCCL on CUDA, gloo on CPU. submitit overwrites CUDA_VISIBLE_DEVICES with the local
rank, so a process may see a single GPU whatever its LOCAL_RANK: the device is
``cuda:(LOCAL_RANK mod visible devices)``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rag_hpc.errors import ClusterError

DeviceChoice = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    owns_group: bool  # False when someone else (a launcher) initialised the group: they tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ClusterError(
                f"WORLD_SIZE is set but {name} is not: launch with torchrun, or export the variables "
                "with submitit.helpers.TorchDistributedEnvironment().export()"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ClusterError(
            f"environment variable {name}={raw!r} is not an integer: launch with torchrun or submitit, which set it"
        ) from None


def resolve_device(choice: DeviceChoice, local_rank: int = 0) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ClusterError(
            "train.device='cuda' but torch sees no GPU (CPU build of torch, or CUDA_VISIBLE_DEVICES is empty): "
            "run on a node with a GPU (cluster.gpus_per_node), or set train.device=auto or cpu"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: DeviceChoice = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the process group the environment describes; single process without one."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = resolve_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistEnv(rank, world, local, dev, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        dev = resolve_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistEnv(0, 1, 0, dev, None, owns_group=False)
    rank = _env_int("RANK")
    local = _env_int("LOCAL_RANK", rank)
    if not os.environ.get("MASTER_ADDR"):
        raise ClusterError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun or submitit, which set it")
    _env_int("MASTER_PORT")
    dev = resolve_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return DistEnv(rank, world, local, dev, backend, owns_group=True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP around ``model`` when there are several ranks; the model itself otherwise.

    broadcast_buffers=False: the only buffer is the constant position table, and a per-forward
    buffer broadcast would be a collective that validation (run on the bare module, a different
    number of windows per rank) must not be forced to match.
    """
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (a no-op on one process)."""
    if env.distributed:
        # gloo reduces CPU tensors only; NCCL only CUDA ones.
        work = tensor if (env.backend == "nccl") == (tensor.device.type == "cuda") else tensor.to(env.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled in transit only)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=env.device if env.backend == "nccl" else None)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()
