"""Measuring every candidate's gradient norm without holding every gradient.

On a scoring step every candidate parameter is made trainable for one backward pass. A hook that runs
as soon as a parameter's gradient is accumulated records its norm and, for a parameter that is not
being trained, frees the gradient at once. So a scoring step costs one full-depth backward pass, and
its memory peak holds one extra gradient at a time, not a full set. Each norm is one reduction kernel
that accumulates in fp32 (``square_sum``): no fp32 copy of a bf16 gradient is made.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

GradReducer = Callable[[torch.Tensor], None]
RowRanges = list[tuple[int, int]] | None  # per parameter: score each of these ranges of its rows apart


class GradNormScorer:
    """Records ||grad|| per parameter during the backward passes between ``start`` and ``finish``.

    ``reduce_grad`` (optional) averages a gradient across data-parallel ranks in place before its
    norm is taken, so every rank scores the global-batch gradient and makes the same choice.
    Gradients of trained parameters are reduced by the training engine and read in ``finish``.

    Sharded gradients (DTensors, as FSDP2 hands them to the hooks after its reduce-scatter) are
    already averaged across ranks, so ``reduce_grad`` is skipped for them; each rank squares its own
    shard and ``finish`` sums the shards with one all-reduce, so every rank gets identical norms.
    """

    def __init__(self, reduce_grad: GradReducer | None = None):
        self.reduce_grad = reduce_grad
        self._handles: list = []
        self._sq_norms: list[torch.Tensor | None] = []
        self._shard_groups: list[tuple] = []  # per parameter: groups its DTensor grad is sharded over
        self._params: Sequence[torch.Tensor] = ()
        self._keep: Sequence[bool] = ()
        self._row_ranges: Sequence[RowRanges] = ()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, params: Sequence[torch.Tensor], keep: Sequence[bool], row_ranges: Sequence[RowRanges] | None = None) -> None:
        """Hook ``params``; ``keep[i]`` says whether params[i]'s gradient is needed for the update;
        ``row_ranges[i]`` (optional) asks for one norm per range of params[i]'s rows instead of one in all."""
        self.finish()
        self._params, self._keep = list(params), list(keep)
        self._row_ranges = list(row_ranges) if row_ranges is not None else [None] * len(self._params)
        self._sq_norms = [None] * len(self._params)
        self._shard_groups = [()] * len(self._params)
        for index, (param, kept) in enumerate(zip(self._params, self._keep)):
            if not kept:
                self._handles.append(param.register_post_accumulate_grad_hook(self._recorder(index)))

    def _recorder(self, index: int):
        def record_and_free(param: torch.Tensor) -> None:
            if self.reduce_grad is not None and not is_dtensor(param.grad):
                self.reduce_grad(param.grad)
            # Micro-batches of one step add up as squared norms: an approximation of the norm of
            # their sum that needs no gradient kept between them.
            sq = self._local_square_sum(index, param.grad)
            previous = self._sq_norms[index]
            self._sq_norms[index] = sq if previous is None else previous + sq
            param.grad = None

        return record_and_free

    def observe(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Record a kept parameter's gradient now, for callers that free it before ``finish``
        (BlockLLM's step_in_backward steps and frees each gradient inside backward)."""
        for index, candidate in enumerate(self._params):
            if candidate is param:
                sq = self._local_square_sum(index, grad)
                previous = self._sq_norms[index]
                self._sq_norms[index] = sq if previous is None else previous + sq
                return

    def finish(self) -> list[float | list[float]]:
        """Remove the hooks and return each parameter's gradient norm (0.0 where none arrived): a list of
        norms, one per range, for a parameter scored by row ranges."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for index, (param, kept) in enumerate(zip(self._params, self._keep)):
            if kept and param.grad is not None:
                self._sq_norms[index] = self._local_square_sum(index, param.grad)
        self._sum_shards()
        recorded = [sq.reshape(-1) for sq in self._sq_norms if sq is not None]
        # One device-to-host copy for all norms instead of a synchronisation per parameter.
        values = iter(torch.cat([sq.to(recorded[0].device) for sq in recorded]).sqrt().cpu().tolist() if recorded else [])
        norms: list[float | list[float]] = []
        for sq, ranges in zip(self._sq_norms, self._row_ranges):
            if ranges is None:
                norms.append(0.0 if sq is None else next(values))
            else:
                norms.append([0.0] * len(ranges) if sq is None else [next(values) for _ in ranges])
        self._params, self._keep, self._sq_norms, self._shard_groups, self._row_ranges = (), (), [], [], ()
        return norms

    def _local_square_sum(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        if is_dtensor(grad):
            # Process groups of the mesh dimensions the gradient is sharded over (FSDP2: the one
            # data-parallel dimension); replicated dimensions already hold the whole sum.
            mesh = grad.device_mesh
            self._shard_groups[index] = tuple(mesh.get_group(d) for d, p in enumerate(grad.placements) if p.is_shard())
            grad = grad.to_local()
        ranges = self._row_ranges[index]
        if ranges is not None:  # one squared norm per range of rows, from one reduction over the rows
            rows = torch.linalg.vector_norm(grad.detach(), dim=1, dtype=torch.promote_types(grad.dtype, torch.float32)).square()
            return torch.stack([rows[a:b].sum() for a, b in ranges])
        return square_sum(grad.detach())

    def _sum_shards(self) -> None:
        """Add up the per-shard squared norms: one all-reduce per set of shard groups (usually one)."""
        by_groups: dict[tuple, list[int]] = {}
        for index, groups in enumerate(self._shard_groups):
            if groups and self._sq_norms[index] is not None:
                by_groups.setdefault(groups, []).append(index)
        for groups, indices in by_groups.items():
            stacked = torch.stack([self._sq_norms[i] for i in indices])
            for group in groups:
                torch.distributed.all_reduce(stacked, group=group)
            for i, value in zip(indices, stacked):
                self._sq_norms[i] = value


def square_sum(tensor: torch.Tensor) -> torch.Tensor:
    """sum(tensor ** 2) as an fp32 (or wider) scalar, in one kernel that reads the tensor once.

    Why not ``tensor.float().pow(2).sum()``: for a bf16 gradient that makes 8 bytes per element of fp32
    temporaries (1 GiB for LLaMA-7B's LM head, the largest term of its scoring step). Squaring in chunks
    bounded that, but at 7B launched ~50 small kernels per layer, ~0.1 s of host time per scoring step
    in a host-bound run; this reduction makes no copy (0 bytes extra on an H100) and one launch per tensor.
    """
    return torch.linalg.vector_norm(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32)).square()


def is_dtensor(tensor) -> bool:
    return isinstance(tensor, DTensor)
