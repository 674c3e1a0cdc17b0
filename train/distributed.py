"""Data-parallel training across processes started by torchrun (gloo on CPU, nccl on GPU).

The loop does not wrap the networks in DistributedDataParallel: methods call a network several
times per step (CycleGAN runs each G twice), run D inside G's loss with D frozen, and alternate
G and D updates, all of which DDP's gradient-bucket reducer handles only with
find_unused_parameters and no static graph. Instead each process computes the gradients of its
shard of the global batch, and average_gradients() all-reduces them before every optimizer step:
the update DDP computes, for every method unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError

__all__ = ["Context", "average_gradients", "broadcast_parameters", "init", "mean_over_processes", "shutdown"]


@dataclass(frozen=True)
class Context:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints progress."""
        return self.rank == 0


def init(device: str) -> tuple[Context, torch.device]:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK and the
    rendezvous variables), if any; return the context and this process's device.

    device: 'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:<n>'; under torchrun a cuda
    device is the LOCAL_RANK-th GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(f"option 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:<n>', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but torch sees no CUDA device")
    if world_size == 1:
        return Context(), torch.device(device)
    context = Context(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(context.local_rank)
        torch_device = torch.device("cuda", context.local_rank)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return context, torch_device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _parameters(modules_or_params) -> list[torch.Tensor]:
    params = []
    for item in modules_or_params:
        params += list(item.parameters()) if isinstance(item, nn.Module) else [item]
    return params


def broadcast_parameters(modules: list[nn.Module]) -> None:
    """Give every process rank 0's parameters and buffers (the same start everywhere)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(params) -> None:
    """All-reduce the gradients of `params` (tensors or modules) to their mean over the processes,
    in one flat buffer per dtype and device. A parameter without a gradient counts as zeros, so
    every process takes part in the same collectives."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in _parameters(params):
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.dtype, p.device), []).append(p)
    for group in buckets.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged scalar over the processes (every process must call this with the
    same keys)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors only
    flat = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return {key: value / dist.get_world_size() for key, value in zip(keys, flat.tolist())}
