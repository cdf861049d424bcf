"""Distributed setup: which rank this process is, its device, and the model wrapper.

Nothing happens at import. `init_distributed` starts a process group only when the process was
launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment): NCCL on GPUs, gloo on
CPU. Tests start their own group (gloo, file:// rendezvous) and call `DistEnv.current`.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stoa_vlp.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def current(device_choice: str = "auto") -> "DistEnv":
        """The environment of this process: the initialised process group if any, else one rank."""
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        else:
            rank, world_size, local_rank = 0, 1, 0
        return DistEnv(rank, world_size, local_rank, choose_device(device_choice, local_rank))


def choose_device(choice: str, local_rank: int) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available (set train.device=cpu or auto)")
    return torch.device("cuda", local_rank)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device_choice: str = "auto", timeout_minutes: int = TrainConfig.dist_timeout_minutes) -> DistEnv:
    """Join the torchrun process group when launched by torchrun; otherwise a single rank. A collective
    that waits longer than `timeout_minutes` for a rank (train.dist_timeout_minutes) ends the run."""
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        local_rank = int(os.environ["LOCAL_RANK"])
        device = choose_device(device_choice, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        log.info("rank %d of %d joined (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    return DistEnv.current(device_choice)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_over_ranks(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The element-wise mean of `tensor` over ranks (every rank passes the same shape), on its device.
    Under NCCL the all-reduce is queued on the device like a kernel: the host does not wait for it."""
    if not env.distributed:
        return tensor
    summed = tensor.to(_comm_device(env), copy=True)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(tensor.device) / env.world_size


def gather_objects(value: object, env: DistEnv) -> list[object]:
    """Every rank's `value`, in rank order (on every rank)."""
    if not env.distributed:
        return [value]
    gathered: list[object] = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap_model(module: nn.Module, strategy: str, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    """DDP or FSDP around `module` (already on env.device); the module itself for one rank.
    `find_unused_parameters` lets DDP cope with parameters that get no gradient (a disabled objective)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"train.distributed must be ddp or fsdp, got {strategy!r}")
    if not env.distributed:
        return module
    if strategy == "ddp":
        ddp = nn.parallel.DistributedDataParallel
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # the model's buffers are constants (the video tower's pixel mean and std), equal on every
        # rank: syncing them before each forward would add a collective to every step. torch 2.14
        # renamed the option and deprecated the old name.
        if "forward_sync_buffers" in inspect.signature(ddp).parameters:
            no_buffer_sync = {"forward_sync_buffers": False}
        else:
            no_buffer_sync = {"broadcast_buffers": False}
        return ddp(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **no_buffer_sync)
    from torch.distributed.fsdp import FullyShardedDataParallel  # runs on CPUs too (gloo), as tested
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from stoa_vlp.model.transformer import ResidualBlock

    # one FSDP unit per transformer block (the root holds the rest), so that only one block's full
    # weights live at a time in the forward and backward passes
    return FullyShardedDataParallel(
        module, auto_wrap_policy=ModuleWrapPolicy({ResidualBlock}), device_id=env.device, use_orig_params=True
    )
