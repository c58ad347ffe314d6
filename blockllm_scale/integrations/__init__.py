"""Parallelism backends behind one small interface, one module each.

The train loop (``launch/pretrain.py``) only ever talks to a :class:`Backend`:

    model, optimizer, scheduler = backend.prepare(model, optimizer, scheduler)
    loss = backend.forward(model, input_ids)          # mean loss of this rank's micro-batch
    backend.backward(loss, accumulation_steps)       # once per micro-batch
    backend.step()                                   # once per optimizer step
    backend.save(directory, client_state) / client_state = backend.load(directory)

``plain``: one process (CPU or one GPU). ``deepspeed``: DeepSpeed ZeRO-0..3. ``fsdp2``: torch
``fully_shard``. ``accelerate``: whatever plugin ``accelerate launch`` configured.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model, optimizer, scheduler) -> tuple[Any, Any, Any]: ...

    def forward(self, model, input_ids: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor, accumulation_steps: int) -> None: ...

    def step(self) -> None: ...

    def save(self, directory: str, client_state: dict) -> None: ...

    def load(self, directory: str) -> dict: ...
