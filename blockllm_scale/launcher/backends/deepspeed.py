"""``launch/pretrain.py --ds_config FILE``: the train loop's backend under DeepSpeed ZeRO-0..3.

BlockLLM runs in :class:`~blockllm_scale.integrations.deepspeed.BlockLLMEngine`; the baselines in a plain
DeepSpeed engine. The JSON's settings are adopted into the launcher's flags here, before the model is built.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ...config import BlockLLMConfig, ConfigError
from ...integrations.deepspeed import BlockLLMEngine, init_distributed
from ...integrations.deepspeed.config import (SECTION, blockllm_section, check_batch_sizes, check_config, load_config,
                                              precision_enabled)
from ...integrations.deepspeed.processes import current_device, on_cpu
from ...optim import BlockLLM


class DeepSpeedBackend:
    """``launch/pretrain.py --ds_config FILE``: BlockLLM or a baseline under DeepSpeed ZeRO-0..3.

    Settings: the JSON's batch sizes ("auto" or absent: from --batch_size / --grad_accum and the
    world size), its bf16 switch (--dtype follows it) and its "blockllm" section win over the flags'
    defaults; a flag given a different value is an error naming both (see configs/ds/README.md).
    """

    engine_type = BlockLLMEngine  # what prepare() wraps a BlockLLM in
    keeps_master_weights = True  # ZeRO's bf16 mode keeps fp32 masters of what it trains
    owns_gradients = True

    def __init__(self, train):
        self.config, self.name = load_config(train.ds_config)
        self.section = blockllm_section(self.config, self.name)
        self.config.pop(SECTION, None)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by every launcher; checked before joining
        self._fill_from_flags(train, world_size)
        check_config(self.config, self.name, world_size=world_size, on_cpu=on_cpu(), client_optimizer=True,
                     blockllm=train.optimizer == "blockllm", client_scheduler=True)
        init_distributed()
        self.rank, self.world_size, self.device = dist.get_rank(), dist.get_world_size(), current_device()
        self.engine = self.scheduler = None
        self._blockllm_engine = False

    def _fill_from_flags(self, train, world_size: int) -> None:
        """Replace "auto" (or absent) batch sizes and bf16 switch by the flags' values; check the rest."""
        filled = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum}
        for key, value in filled.items():
            if self.config.get(key, "auto") == "auto":
                self.config[key] = value
        if self.config.get("train_batch_size", "auto") == "auto":
            self.config["train_batch_size"] = (self.config["train_micro_batch_size_per_gpu"]
                                               * self.config["gradient_accumulation_steps"] * world_size)
        # DeepSpeed 0.19.8 clips at 1.0 unless told otherwise; the launcher's other backends never clip.
        self.config.setdefault("gradient_clipping", 0.0)
        if isinstance(self.config.get("bf16"), dict) and self.config["bf16"].get("enabled") == "auto":
            self.config["bf16"] = {**self.config["bf16"], "enabled": train.dtype == "bf16"}
        check_batch_sizes(self.config, self.name, world_size)

    def resolve_settings(self, train, blockllm: BlockLLMConfig):
        """The launcher's TrainConfig and BlockLLMConfig with the JSON's values adopted (called before the
        model and optimizer are built)."""
        flag_dtype = train.dtype
        train = dataclasses.replace(
            train,
            batch_size=_adopt(train, "batch_size", self.config["train_micro_batch_size_per_gpu"],
                              f"train_micro_batch_size_per_gpu in {self.name}"),
            grad_accum=_adopt(train, "grad_accum", self.config["gradient_accumulation_steps"],
                              f"gradient_accumulation_steps in {self.name}"),
            dtype=_adopt(train, "dtype", "bf16" if precision_enabled(self.config, "bf16") else "fp32",
                         f"the bf16 section of {self.name}"))
        if train.dtype != flag_dtype and self.rank == 0:
            print(f"[deepspeed] {self.name} enables bf16: bf16 weights and compute, fp32 master weights and "
                  "Adam states (--dtype bf16)", flush=True)
        if self.section is None or train.optimizer != "blockllm":
            if self.section is not None and self.rank == 0:
                print(f'[deepspeed] --optimizer {train.optimizer}: the "{SECTION}" section of {self.name} '
                      "does not apply", flush=True)
            return train, blockllm
        if "seed" in self.section:
            raise ConfigError(f"{self.name}: {SECTION}.seed: the launcher seeds BlockLLM from --seed")
        return train, dataclasses.replace(blockllm, **{k: _adopt(blockllm, k, v, f"{SECTION}.{k} in {self.name}")
                                                       for k, v in self.section.items()})

    def prepare(self, model, optimizer, scheduler):
        import deepspeed

        self.scheduler = scheduler
        self._blockllm_engine = isinstance(optimizer, BlockLLM)
        if self._blockllm_engine:
            self.engine = self.engine_type(model, optimizer, self.config)
        else:
            config = {"zero_allow_untested_optimizer": True, **self.config}
            self.engine = deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
        return self.engine, optimizer, scheduler

    def forward(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device, non_blocking=True)
        return self.engine(input_ids=input_ids, labels=input_ids).loss

    def backward(self, loss: torch.Tensor, accumulation_steps: int) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps itself; the train loop hands BlockLLM the loss.
        if self._blockllm_engine:
            self.engine.backward(loss, record_loss=False)
        else:
            self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed wants a step() per micro-batch; it only counts here

    def step(self) -> None:
        self.engine.step()
        self.scheduler.step()

    def save(self, directory, client_state: dict) -> None:
        state = {**client_state, "scheduler": self.scheduler.state_dict()}
        self.engine.save_checkpoint(str(directory), tag="deepspeed", client_state=state)

    def load(self, directory) -> dict:
        _, client_state = self.engine.load_checkpoint(str(directory), tag="deepspeed")
        self.scheduler.load_state_dict(client_state.pop("scheduler"))
        return client_state


def _adopt(settings, field: str, chosen, where: str):
    """The JSON's value wins over a flag left at its default; a flag set to something else is an error."""
    given = getattr(settings, field)
    default = {f.name: f.default for f in dataclasses.fields(settings)}[field]
    if given != chosen and given != default:
        raise ConfigError(f"--{field} {given} conflicts with {where} = {chosen!r}: set it in one place")
    return chosen
