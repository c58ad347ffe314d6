"""The backends the launcher's train loop drives, one module each, behind one protocol (:class:`Backend`).

``plain``: one process (CPU or one GPU). ``deepspeed``: DeepSpeed ZeRO-0..3 (``--ds_config``). ``fsdp2``: torch
``fully_shard`` under torchrun. ``accelerate``: whichever of those ``accelerate launch``'s config names.
They build on :mod:`blockllm_scale.integrations`, which a user calls in their own loop; this is the launcher's
side, which takes the launcher's ``TrainConfig``.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch

from ...config import BlockLLMConfig, ConfigError
from ...integrations.accelerate import launched_by_accelerate


class Backend(Protocol):
    """Everything the train loop (``launcher/train.py``) asks of a backend, in the order it asks::

        train, blockllm = backend.resolve_settings(train, blockllm)   # before the model is built
        model, optimizer, scheduler = backend.prepare(model, optimizer, scheduler)
        loss = backend.forward(model, input_ids)          # mean loss of this rank's micro-batch
        backend.backward(loss, accumulation_steps)       # once per micro-batch
        backend.step()                                   # once per optimizer step
        backend.save(directory, client_state) / client_state = backend.load(directory)
    """

    rank: int
    world_size: int
    device: torch.device
    keeps_master_weights: bool  # it keeps fp32 masters of bf16 weights itself (then no --dtype bf16-pure)
    owns_gradients: bool  # it reduces or shards the gradients (then no optimizer that steps inside backward)

    def resolve_settings(self, train, blockllm: BlockLLMConfig) -> tuple[Any, BlockLLMConfig]:
        """The launcher's settings with the backend's own config adopted (a DeepSpeed JSON's batch sizes)."""

    def prepare(self, model, optimizer, scheduler) -> tuple[Any, Any, Any]: ...

    def forward(self, model, input_ids: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor, accumulation_steps: int) -> None: ...

    def step(self) -> None: ...

    def save(self, directory: str, client_state: dict) -> None: ...

    def load(self, directory: str) -> dict: ...


def make_backend(train) -> Backend:
    """The backend ``--backend`` names; ``auto``: from the launcher that started this process."""
    kind = train.backend
    if kind == "auto":
        if train.ds_config:
            kind = "deepspeed"
        elif launched_by_accelerate():  # ACCELERATE_* variables set by `accelerate launch`
            kind = "accelerate"
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("several processes were launched: choose --backend fsdp2, --ds_config or accelerate launch")
        else:
            kind = "plain"
    if kind == "plain":
        from .plain import PlainBackend

        return PlainBackend(train.device or None)
    if kind == "deepspeed":
        from .deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(train)
    if kind == "fsdp2":
        from .fsdp2 import FSDP2Backend

        return FSDP2Backend(train)
    from .accelerate import AccelerateBackend

    return AccelerateBackend(train)
