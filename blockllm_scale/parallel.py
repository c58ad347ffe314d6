"""The collectives BlockLLM needs so that every data-parallel rank makes the same selection, and the one
the launcher needs to report the largest rank's peak memory.

All are no-ops in a single process. They use the default process group, on the device its backend
wants (CUDA for NCCL, CPU for gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(value: float) -> float:
    """The mean of a Python float across ranks (the loss that drives the patience rule)."""
    world = data_parallel_world()
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.item() / world


def average_grad_over_ranks(grad: torch.Tensor) -> None:
    """Average a local gradient across ranks in place (scoring sees the global-batch gradient)."""
    world = data_parallel_world()
    if world == 1:
        return
    dist.all_reduce(grad)
    grad.div_(world)


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maximum of Python floats across ranks, in one collective (per-GPU peak memory is the
    largest GPU's, not rank 0's)."""
    if data_parallel_world() == 1 or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
