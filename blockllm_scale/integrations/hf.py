"""BlockLLM in the Hugging Face ``Trainer``: one process, DeepSpeed ZeRO-0/1/2/3, or FSDP2.

    from blockllm_scale.integrations.hf import BlockLLMTrainer

    trainer = BlockLLMTrainer(model=model, args=TrainingArguments(..., deepspeed="configs/ds/zero2.json"),
                              train_dataset=data, data_collator=causal_lm_collator,
                              blockllm_settings={"sparsity": 0.9, "patience": 100})
    trainer.train()                                    # later: trainer.train(resume_from_checkpoint=True)

``blockllm_settings`` are :class:`~blockllm_scale.BlockLLMConfig` fields (or a ``"blockllm"`` section in the
DeepSpeed JSON); lr, betas, eps and weight decay come from the ``TrainingArguments``, the LR schedule is the
Trainer's own. Without DeepSpeed or FSDP2 a BlockLLM you built yourself works too:
``BlockLLMTrainer(..., optimizers=(BlockLLM(model.named_parameters(), ...), None))``.

What the subclass adds to ``Trainer``:

* every micro-batch's loss goes to ``record_loss`` (the patience rule needs it), and the logs carry
  ``blockllm/reselections`` and ``blockllm/trained_fraction`` (mean since the last log) next to the loss;
* DeepSpeed (``TrainingArguments(deepspeed=...)``): accelerate fills the config's ``"auto"`` values and calls
  ``deepspeed.initialize`` as usual; for that one call, during ``train()``, a BlockLLM optimizer gets a
  :class:`TrainerEngine` instead (the launcher's ``BlockLLMEngine``: a DeepSpeed engine rebuilt over the selected
  blocks at each block switch, so fp32 masters and Adam states exist for them only, divided by the ranks
  where the stage shards them). Trainer checkpoints are DeepSpeed checkpoints with the selection beside them;
* FSDP2 (``accelerate launch --config_file configs/accelerate/fsdp2.yaml script.py``): the Trainer shards
  the model itself with ``integrations.fsdp2.shard_model`` when it builds BlockLLM (accelerate is told
  nothing of FSDP, so it neither wraps the model nor swaps the optimizer's tensors; the same path runs on
  CPUs, where accelerate would silently fall back to DDP), and checkpoints go through
  ``fsdp2.save_dcp``/``load_dcp``.

Not supported, each refused in one line at construction: plain DDP (several processes without DeepSpeed or
FSDP2: DDP registers its gradient hooks once and cannot follow block switches), ZeRO offload, a DeepSpeed
"scheduler" section, fp16, ``variant="masked"`` and ``step_in_backward`` under DeepSpeed, a model built
under ZeRO-3's ``zero.Init``, ``TrainingArguments(fsdp=...)`` (use the accelerate config) and FSDP's own
activation checkpointing (use ``gradient_checkpointing=True``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from ..config import BlockLLMConfig, ConfigError
from ..optim import BlockLLM
from .accelerate import FSDPOptions, check_fsdp_settings, fsdp_settings_from_env, launched_with_fsdp

SCHEDULER_NAME = "scheduler.pt"  # the Trainer's file name for the LR scheduler's state
_ADAM_FROM_ARGS = {"lr": "learning_rate", "weight_decay": "weight_decay", "eps": "adam_epsilon"}


def causal_lm_collator(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed ``input_ids`` rows; the labels are the inputs (the model shifts them)."""
    input_ids = torch.stack([row["input_ids"] for row in rows])
    return {"input_ids": input_ids, "labels": input_ids}


# ----- DeepSpeed ---------------------------------------------------------------------------------
def check_deepspeed_config(config: dict, args, settings: dict[str, Any]) -> dict[str, Any]:
    """Refuse, in one line, what BlockLLM cannot do under the Trainer's DeepSpeed; drop the sections that
    BlockLLM replaces; return BlockLLM's settings with the config's "blockllm" section merged in.

    ``config`` is the Trainer's own DeepSpeed config (after its "auto" pass), edited in place.
    """
    from .deepspeed import SECTION, blockllm_section

    name = "TrainingArguments(deepspeed=...)"
    section = blockllm_section(config, name) or {}
    config.pop(SECTION, None)
    clash = sorted(k for k in section if k in settings and settings[k] != section[k])
    if clash:
        raise ConfigError(f'{name}: "{SECTION}".{clash[0]} differs from blockllm_settings; set it in one place')
    settings = {**section, **settings}
    zero = config.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        if str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", ""):
            raise ConfigError(f"{name}: zero_optimization.{key} is not supported with BlockLLM: the engine is rebuilt "
                              "over the selected blocks at every switch, and DeepSpeed's offload needs its own CPU "
                              "Adam over a fixed set of parameters (BlockLLM's states are already that small)")
    if "scheduler" in config:
        raise ConfigError(f'{name}: remove the "scheduler" section: it would restart at every block switch; '
                          "the Trainer's own scheduler (lr_scheduler_type, warmup_steps) drives BlockLLM")
    if "optimizer" in config:
        _check_optimizer_section(config.pop("optimizer"), args, name)
    if isinstance(config.get("fp16"), dict) and config["fp16"].get("enabled") is True:
        raise ConfigError(f"{name}: fp16 loss scaling skips overflowing steps that BlockLLM would still count; use bf16")
    blockllm = BlockLLMConfig.from_dict(settings)
    if blockllm.variant == "masked" or blockllm.step_in_backward:
        raise ConfigError("variant='masked' and step_in_backward need BlockLLM to step itself; under DeepSpeed "
                          "ZeRO the engine steps the selected blocks: use variant='approximate'")
    return settings


def _check_optimizer_section(spec: dict, args, name: str) -> None:
    """An AdamW section whose values are "auto" or the TrainingArguments' is what BlockLLM does anyway."""
    if str(spec.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(f'{name}: optimizer.type {spec.get("type")!r}: BlockLLM is AdamW on the selected blocks; '
                          'remove the "optimizer" section')
    expected = {key: getattr(args, attr) for key, attr in _ADAM_FROM_ARGS.items()}
    expected["betas"] = [args.adam_beta1, args.adam_beta2]
    for key, value in (spec.get("params") or {}).items():
        given = list(value) if isinstance(value, (list, tuple)) else value
        if value != "auto" and key in expected and given != expected[key]:
            raise ConfigError(f"{name}: optimizer.params.{key} = {value!r} differs from the TrainingArguments' "
                              f"{expected[key]!r}; BlockLLM takes them from the TrainingArguments")


@contextlib.contextmanager
def without_zero_init(args):
    """Build the model inside this to get whole weights although ``args`` (TrainingArguments) carry a ZeRO-3
    config, under which ``from_pretrained``/``from_config`` would partition them at once (``zero.Init``):
    BlockLLM sizes its blocks from whole weights. DeepSpeed partitions them when training starts."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if getattr(args, "hf_deepspeed_config", None) is not None:
            set_hf_deepspeed_config(args.hf_deepspeed_config)


def _zero_init_partitioned(model) -> bool:
    """True when ZeRO-3's zero.Init partitioned the weights at construction (they are empty now)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _trainer_engine_type():
    from .deepspeed import BlockLLMEngine

    class TrainerEngine(BlockLLMEngine):
        """:class:`BlockLLMEngine` as accelerate's ``DeepSpeedEngineWrapper`` and the Trainer drive it.

        accelerate says which micro-batch ends an accumulation window (``set_gradient_accumulation_boundary``)
        and calls ``step()`` only there; the Trainer has already divided the loss by the accumulation
        steps (``scale_wrt_gas=False``) and hands it to BlockLLM itself (``record_loss``). Before the first
        block is selected there is no DeepSpeed engine yet (step 0 only scores), so these land here.
        """

        def __init__(self, *args, **kwargs):
            self._boundary: bool | None = None
            self._grad_norm = None
            super().__init__(*args, **kwargs)

        def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
            self._boundary = is_boundary
            if self.ds_engine is not None:
                self.ds_engine.set_gradient_accumulation_boundary(is_boundary)

        def is_gradient_accumulation_boundary(self) -> bool:
            if self.ds_engine is None and self._boundary is not None:
                return self._boundary
            return super().is_gradient_accumulation_boundary()

        def backward(self, loss, record_loss: bool = False, scale_wrt_gas: bool = True, **kwargs):
            if self.ds_engine is None:
                return (loss / self._accumulation_steps if scale_wrt_gas else loss).backward()
            return super().backward(loss, record_loss=record_loss, scale_wrt_gas=scale_wrt_gas, **kwargs)

        def _update_selected_blocks(self) -> None:
            super()._update_selected_blocks()
            # read now: a block switch right after this replaces the engine that knows it
            self._grad_norm = self.ds_engine.get_global_grad_norm()

        def get_global_grad_norm(self):
            return self._grad_norm

        def state_dict(self, *args, **kwargs):
            """The model's weights (what ``accelerator.get_state_dict`` saves under ZeRO-0/1/2)."""
            return self.module.state_dict(*args, **kwargs)

    return TrainerEngine


@contextlib.contextmanager
def blockllm_deepspeed_initialize():
    """While it is open, ``deepspeed.initialize(optimizer=<a BlockLLM>, ...)`` returns a TrainerEngine.

    accelerate's ``prepare`` looks ``deepspeed.initialize`` up when it calls it, after it has filled the
    config's "auto" values from the Trainer and the model; every other call goes to DeepSpeed unchanged.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from .deepspeed import check_config

    real = deepspeed.initialize

    def initialize(*args, **kwargs):
        optimizer = kwargs.get("optimizer")
        if args or not isinstance(optimizer, BlockLLM):
            return real(*args, **kwargs)
        unknown = sorted(set(kwargs) - {"model", "optimizer", "config", "config_params", "lr_scheduler",
                                        "model_parameters"})
        if unknown:
            raise ConfigError(f"BlockLLMTrainer under DeepSpeed does not support {unknown[0]} (sequence or tensor "
                              "parallelism): its engine is rebuilt at every block switch")
        config = dict(kwargs.get("config_params") or kwargs.get("config"))
        world = torch.distributed.get_world_size()
        check_config(config, "the Trainer's DeepSpeed config", world_size=world,
                     on_cpu=get_accelerator().device_name() == "cpu",
                     client_optimizer=True, blockllm=True)
        scheduler = kwargs.get("lr_scheduler")
        engine = _trainer_engine_type()(kwargs["model"], optimizer, config, scheduler)
        return engine, optimizer, None, scheduler

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = real


# ----- FSDP2 -------------------------------------------------------------------------------------
def fsdp2_options(args) -> FSDPOptions | None:
    """FSDP2 settings from an ``accelerate launch`` FSDP config (None: no FSDP); one line for what is refused."""
    if args.fsdp:
        raise ConfigError("BlockLLMTrainer does not take TrainingArguments(fsdp=...): launch with accelerate launch "
                          "--config_file configs/accelerate/fsdp2.yaml (FSDP2 with BlockLLM)")
    if not launched_with_fsdp():
        return None
    options = check_fsdp_settings(fsdp_settings_from_env(os.environ))
    if options.activation_checkpointing:
        raise ConfigError("fsdp_activation_checkpointing: true is not supported by BlockLLMTrainer; set "
                          "TrainingArguments(gradient_checkpointing=True) instead")
    return options


@contextlib.contextmanager
def _accelerate_without_fsdp():
    """accelerate reads ACCELERATE_USE_FSDP when it builds its state: hidden, it wraps nothing in FSDP."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


# ----- the Trainer -------------------------------------------------------------------------------
class BlockLLMTrainer(Trainer):
    """``transformers.Trainer`` that trains with BlockLLM (see the module docstring)."""

    def __init__(self, *args, blockllm_settings: dict[str, Any] | None = None, **kwargs):
        self.blockllm_settings = dict(blockllm_settings or {})
        self._fsdp: FSDPOptions | None = None
        self._fractions: list[float] = []
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            self._check_deepspeed()
        elif self._fsdp is not None:
            if self.optimizer is not None:
                raise ConfigError("under FSDP2 leave the optimizer to BlockLLMTrainer (blockllm_settings={...}): "
                                  "BlockLLM is built after the model is sharded")
        elif self.args.world_size > 1:
            raise ConfigError(f"BlockLLMTrainer in {self.args.world_size} processes needs DeepSpeed "
                              "(TrainingArguments(deepspeed=...)) or FSDP2 (accelerate launch --config_file "
                              "configs/accelerate/fsdp2.yaml): plain DDP registers its gradient hooks once and "
                              "cannot follow block switches")

    def _check_deepspeed(self) -> None:
        if self.optimizer is not None:  # deepspeed_init would drop it and build the optimizer anew
            raise ConfigError("under DeepSpeed give BlockLLM's settings as blockllm_settings={...}, not optimizers=: "
                              "the Trainer builds the optimizer itself when DeepSpeed starts")
        config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
        self.blockllm_settings = check_deepspeed_config(config, self.args, self.blockllm_settings)
        if _zero_init_partitioned(self.model):
            raise ConfigError("the model was built under ZeRO-3's zero.Init (TrainingArguments(deepspeed=<stage 3>) "
                              "existed when it was created): BlockLLM sizes its blocks from whole weights; build "
                              "it inside `with blockllm_scale.integrations.hf.without_zero_init(args):` or before "
                              "the TrainingArguments")

    def create_accelerator_and_postprocess(self) -> None:
        self._fsdp = fsdp2_options(self.args)
        with _accelerate_without_fsdp() if self._fsdp is not None else contextlib.nullcontext():
            super().create_accelerator_and_postprocess()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            model = model if model is not None else self.model
            if self._fsdp is not None:
                model = self._shard(model)
            self.optimizer = BlockLLM(model.named_parameters(), lr=args.learning_rate,
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                      weight_decay=args.weight_decay, **self.blockllm_settings)
        return self.optimizer

    def _shard(self, model):
        """FSDP2 over every rank: fp32 sharded weights; bf16 compute when the Trainer or accelerate asks for it."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from .fsdp2 import init_mesh, shard_model

        mesh = init_mesh(self.args.device.type)
        policy = MixedPrecisionPolicy()
        if self.args.bf16 or self.accelerator.mixed_precision == "bf16":
            model.float()  # fp32 sharded masters; the policy casts to bf16 for compute
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = shard_model(model, mesh, policy, self._fsdp.reshard_after_forward,
                            layer_classes=self._fsdp.layer_classes)
        model._is_accelerate_prepared = True  # accelerate.prepare must not wrap it in DDP
        return model

    @property
    def blockllm(self) -> BlockLLM:
        """The BlockLLM under accelerate's optimizer wrapper."""
        optimizer = self.optimizer
        while not isinstance(optimizer, BlockLLM):
            if not hasattr(optimizer, "optimizer"):
                raise TypeError(f"BlockLLMTrainer needs a BlockLLM optimizer, got {type(self.optimizer).__name__}")
            optimizer = optimizer.optimizer
        return optimizer

    def train(self, *args, **kwargs):
        with blockllm_deepspeed_initialize() if self.is_deepspeed_enabled else contextlib.nullcontext():
            return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.accelerator.sync_gradients:  # the last micro-batch of a step: what this step trains
            self._fractions.append(self.blockllm.selected_fraction)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The micro-batch loss as the Trainer reports it (possibly scaled for gradient
        # accumulation: a constant factor, which the patience rule does not see).
        self.blockllm.record_loss(loss)
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.optimizer is not None:
            logs["blockllm/reselections"] = self.blockllm.selection.reselections
            if self._fractions:
                logs["blockllm/trained_fraction"] = round(sum(self._fractions) / len(self._fractions), 4)
            self._fractions = []
        super().log(logs, *args, **kwargs)

    # --- FSDP2 checkpoints (DeepSpeed's go through the engine's save_checkpoint/load_checkpoint) ---
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._fsdp is None or self.optimizer is None:
            return super().save_model(output_dir, _internal_call)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every rank joins the gather; rank 0 writes the whole model as save_pretrained would
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._fsdp is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        from .fsdp2 import save_dcp

        save_dcp(output_dir, self.model, self.blockllm, extra={})
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._fsdp is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from .fsdp2 import load_dcp

        load_dcp(checkpoint, self.model, self.blockllm)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))
