"""The one interface between BlockLLM and the backends that run it (DeepSpeed, FSDP2, the HF Trainer).

BlockLLM is an ordinary ``torch.optim.Optimizer``: a backend that only moves, shards or wraps its
parameters (FSDP2, accelerate, the Trainer) needs nothing beyond torch's optimizer API and these public
members of :class:`~blockllm_scale.BlockLLM`:

- ``trained_named_parameters()``: the (name, tensor) pairs this step trains.
- ``scoring_step``: the coming backward measures every candidate's gradient norm.
- ``observe_gradient(param, grad)``: on a scoring step, a trained parameter's gradient as the backend
  holds it (DeepSpeed keeps them in its own partitions and clears them in its step).
- ``adam_optimizers()``: the optimizers that hold the live Adam state of the trained blocks.
- ``rebind_parameters()``: call once a wrapper replaced the tensors in ``param_groups`` (FSDP2, accelerate).
- ``hand_over_update(owner)``: for a backend that must own the Adam update itself (DeepSpeed's ZeRO):
  from then on BlockLLM only selects, and tells the :class:`UpdateOwner` after every block switch.

Gradient and loss averaging across data-parallel ranks is BlockLLM's own (``parallel.py``, on the default
process group); gradients that arrive sharded (FSDP2's DTensors) are already averaged and are not reduced
again. Nothing here imports a backend: the core (config, selection, scoring, states, optim) needs torch
alone, and every backend imports the core, never the reverse.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .config import ConfigError

DIRECT_INITIALIZE = ("BlockLLM was passed to deepspeed.initialize directly; DeepSpeed's optimizers cannot follow "
                     "block switches: use blockllm_scale.integrations.deepspeed.initialize(model=..., optimizer=..., "
                     "config=...) with the same arguments")


class UpdateOwner(Protocol):
    """A backend that steps the Adam update of BlockLLM's trained blocks itself (see ``hand_over_update``)."""

    def live_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer the backend steps now (``adam_optimizers()`` and ``state_numel()`` measure it)."""

    def selection_changed(self) -> None:
        """Called after every block switch: rebuild over ``trained_named_parameters()``."""


class GuardedParamGroups(list):
    """BlockLLM's ``param_groups``: a list that makes ``deepspeed.initialize(optimizer=BlockLLM(...))`` an error.

    That call trains the wrong tensors or crashes deep inside DeepSpeed (ZeRO-1/2 swap the groups'
    params for flat fp32 partitions, ZeRO-3 empties them, ZeRO-0 steps BlockLLM unchanged; none
    follows a block switch). Under every stage it first rewrites the client optimizer's groups
    wholesale (``optimizer.param_groups[:] = ...`` in ``DeepSpeedEngine._configure_optimizer``,
    0.19.8), which nothing else does to an optimizer (torch, accelerate, transformers): refusing
    that assignment is the error, inside ``deepspeed.initialize``, at no cost per step. Appending a
    group, replacing one by index and editing a group in place (LR schedulers, FSDP2's rebind) pass.
    """

    def __setitem__(self, index, value):
        if isinstance(index, slice):
            raise ConfigError(DIRECT_INITIALIZE)
        super().__setitem__(index, value)
