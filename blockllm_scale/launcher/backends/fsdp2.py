"""``--backend fsdp2`` (torchrun) and ``accelerate launch`` with an FSDP2 config: the train loop's backend over
:mod:`blockllm_scale.integrations.fsdp2` (``shard_model``, ``rebind_optimizer``, ``save_dcp``/``load_dcp``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from ...config import ConfigError
from ...integrations.fsdp2 import (local_device_index, init_mesh, load_dcp, rebind_optimizer, save_dcp, shard_model,
                                   unquantized_states)
from ...optim import BlockLLM
from .plain import PlainBackend


class FSDP2Backend(PlainBackend):
    """``--backend fsdp2`` under torchrun: the train loop's :class:`~blockllm_scale.integrations.Backend`.

    Forward and backward are the plain backend's: every micro-batch is reduce-scattered (no
    no_sync), since during a scoring step unsynced micro-batches would hold every layer's
    unsharded gradient until the last one.

    ``--dtype bf16`` means FSDP2 mixed precision: fp32 sharded master weights and Adam state, bf16
    all-gathered weights and compute, gradients reduced in fp32.
    """

    keeps_master_weights = True  # fp32 sharded parameters; bf16 only for compute (--dtype bf16)
    owns_gradients = True

    def __init__(self, train, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True,
                 layer_classes: Iterable[str] | None = None):
        self.train = train
        self.mesh = mesh or init_mesh()
        self.reshard_after_forward, self.layer_classes = reshard_after_forward, layer_classes
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(self.mesh.device_type, local_device_index(self.mesh) or 0) \
            if self.mesh.device_type == "cuda" else torch.device("cpu")
        self.model = self.optimizer = self.scheduler = None
        self._reported_fp32: set[str] = set()
        self._checks_8bit = False

    def mixed_precision(self) -> MixedPrecisionPolicy:
        if self.train.dtype == "bf16":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def prepare(self, model, optimizer, scheduler):
        blockllm = optimizer if isinstance(optimizer, BlockLLM) else None
        if blockllm is not None and blockllm.config.variant == "masked":
            raise ConfigError("variant=masked is not supported under FSDP2 (its masks need whole gradients); use approximate")
        if blockllm is not None and blockllm.config.states == "bnb_8bit":
            raise ConfigError("states=bnb_8bit does not work on FSDP2's DTensors; use states=torchao_8bit")
        names_before = {id(p): n for n, p in model.named_parameters()}
        if self.train.dtype == "bf16":
            model.float()  # fp32 master weights; the policy casts to bf16 for compute
        model = shard_model(model, self.mesh, self.mixed_precision(), self.reshard_after_forward,
                            layer_classes=self.layer_classes)
        # FSDP2 hands BlockLLM's scorer sharded (DTensor) gradients, already averaged across ranks: it does not
        # average them again (scoring.py).
        rebind_optimizer(optimizer, names_before, model)
        self._checks_8bit = blockllm is not None and blockllm.config.states == "torchao_8bit"
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model, optimizer, scheduler

    def step(self) -> None:
        super().step()
        if self._checks_8bit:
            self._check_8bit_states()

    def _check_8bit_states(self) -> None:
        """Say once, on rank 0, which trained tensors have fp32 instead of 8-bit moments."""
        fallback = set(unquantized_states(self.optimizer)) - self._reported_fp32
        if fallback and self.rank == 0:
            warnings.warn(f"torchao_8bit: {len(fallback)} trained tensor(s) keep fp32 Adam state (local shard "
                          f"< 4096 elements or not a multiple of 256), e.g. {sorted(fallback)[0]}", stacklevel=2)
        self._reported_fp32 |= fallback

    def save(self, directory: str | Path, client_state: dict) -> None:
        save_dcp(directory, self.model, self.optimizer, {"scheduler": self.scheduler.state_dict(), **client_state})

    def load(self, directory: str | Path) -> dict:
        extra = load_dcp(directory, self.model, self.optimizer)
        self.scheduler.load_state_dict(extra.pop("scheduler"))
        return extra
