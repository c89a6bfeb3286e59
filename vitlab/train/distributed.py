"""Multi-process training under `torchrun`: DDP (gloo on CPU, NCCL on GPU) or FSDP.

`torchrun --nproc-per-node N -m vitlab train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; the
engine then splits every global batch evenly over the ranks (and accumulation steps), so
the global batch size and the learning rate mean the same as in one process. Rank 0 alone
writes logs and checkpoints.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r} is not supported by vitlab; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA GPU is available; use device=cpu or device=auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (or the one already initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, resolve_device(device, local), created_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev, created_group=True)


def shutdown(info: DistInfo, completed: bool = True) -> None:
    """Leave the process group this run created.

    Why not just `destroy_process_group()`: the DDP / FSDP wrappers hold the group (and gloo's
    worker threads) through reference cycles; left to the interpreter's exit, their destructors
    can run after Python is torn down and abort the process ("terminate called without an active
    exception") although the run had finished. So the cycles are collected first, and after a
    completed run both ranks meet at a barrier, so neither closes its connections while the other
    still uses them. After a failure there is no barrier: the other rank may be gone, and waiting
    for it would hang."""
    if info.created_group and dist.is_initialized():
        gc.collect()
        if completed:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, info: DistInfo, find_unused: bool = False) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused)


def wrap_fsdp(model: torch.nn.Module, info: DistInfo, mp_dtype=None) -> torch.nn.Module:
    """FSDP2: shard every transformer block (and the remaining root parameters) over ranks;
    each block's parameters are gathered just for its forward/backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for block in getattr(model, "blocks", []) or []:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_model_state(model: torch.nn.Module, fsdp: bool) -> dict:
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optim_state(model, optimizer, fsdp: bool) -> dict:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_sd: dict, optim_sd: dict | None, fsdp: bool) -> None:
    if not fsdp:
        raise RuntimeError("load_full_state is for FSDP")
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
