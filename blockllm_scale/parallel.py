"""The collectives BlockLLM needs so that every data-parallel rank makes the same selection, and the ones
the launcher needs (one gather a step for the loss, the time budget and the largest rank's peak memory;
a barrier around checkpoint writes; rank 0's choice of the checkpoint to resume from).

All are no-ops in a single process. They use the default process group, on the device its backend
wants (CUDA for NCCL, CPU for gloo).
"""

from __future__ import annotations

import socket
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def gather_over_ranks(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (the same length on each), in rank order, from one collective: the launcher
    takes the mean loss, whether any rank is out of time, and the largest peaks from it."""
    if data_parallel_world() == 1:
        return [list(values)]
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    gathered = [torch.empty_like(tensor) for _ in range(data_parallel_world())]
    dist.all_gather(gathered, tensor)
    return torch.stack(gathered).tolist()


def barrier() -> None:
    if data_parallel_world() > 1:
        dist.barrier()


def end_with_a_barrier() -> None:
    """Make a barrier the last collective before a process exits.

    gloo's worker thread drops its reference to a finished collective's tensors after ``wait()`` has
    returned to the caller; when the interpreter is already finalizing by then, that thread cannot take
    the GIL to free a Python-owned tensor and the process dies in ``std::terminate`` (SIGABRT, "terminate
    called without an active exception") after all its work is done: seen about once in eight 2-process
    CPU runs whose last collective was an all_gather (torch 2.13, under gdb: ~AsyncAllgatherWork on the
    pt_gloo_runloop thread during Py_FinalizeEx). A barrier holds no Python tensor and returns only after
    the worker has released the collectives before it.
    """
    barrier()


def free_port() -> int:
    """A local port nobody listens on now (a rendezvous for launchers and process groups that pick none)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broadcast_from_rank0(make: Callable[[], T]) -> T:
    """Rank 0's ``make()`` on every rank: work done once (reading and hashing checkpoint files) whose
    answer every rank must share, or they would load different checkpoints. ``make`` must return a
    picklable value and must not raise (the other ranks would wait in the broadcast for ever)."""
    if data_parallel_world() == 1:
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]
