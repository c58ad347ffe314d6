"""BlockLLM in the Hugging Face ``Trainer``.

    from blockllm_scale.integrations.hf import BlockLLMTrainer

    trainer = BlockLLMTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                              data_collator=causal_lm_collator,
                              blockllm_settings={"sparsity": 0.9, "patience": 100})
    trainer.train()                                    # later: trainer.train(resume_from_checkpoint=True)

``blockllm_settings`` are :class:`~blockllm_scale.BlockLLMConfig` fields; lr, betas, eps and weight
decay come from the ``TrainingArguments``, the LR schedule is the Trainer's own. A BlockLLM you built
yourself works too: ``BlockLLMTrainer(..., optimizers=(BlockLLM(model.named_parameters(), ...), None))``.

What the subclass adds to ``Trainer``: it hands every micro-batch's loss to ``record_loss`` (the
patience rule needs it; the Trainer calls ``optimizer.step()`` without a loss). Checkpoints need
nothing extra: the Trainer saves ``optimizer.state_dict()``, which carries the selection, and on
resume calls ``load_state_dict``, which re-applies it (requires_grad flags included) before training
continues.

A DeepSpeed config in the ``TrainingArguments`` is refused at construction: the Trainer would hand BlockLLM
to ``deepspeed.initialize``, whose ZeRO optimizer cannot follow block switches. Train under DeepSpeed with
``deepspeed launch/pretrain.py --ds_config ...`` (or ``blockllm_scale.integrations.deepspeed.initialize`` in
your own loop). FSDP (``TrainingArguments(fsdp=...)`` or an ``accelerate launch`` FSDP config) is refused too:
accelerate swaps the parameters in the optimizer's groups for sharded ones, which leaves BlockLLM's inner
AdamW on the old tensors until something calls ``rebind_parameters()``, and its FSDP checkpoints go through
torch's ``get_optimizer_state_dict``, which steps an optimizer without state (see ``fsdp2.save_dcp``) and
was never tried on BlockLLM. Train under FSDP2 with ``accelerate launch --config_file
configs/accelerate/fsdp2.yaml launch/pretrain.py`` (its backend rebinds and checkpoints exactly) or
``blockllm_scale.integrations.fsdp2`` in your own loop.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..config import ConfigError
from ..optim import BlockLLM
from .accelerate import launched_with_fsdp


def causal_lm_collator(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed ``input_ids`` rows; the labels are the inputs (the model shifts them)."""
    input_ids = torch.stack([row["input_ids"] for row in rows])
    return {"input_ids": input_ids, "labels": input_ids}


class BlockLLMTrainer(Trainer):
    """``transformers.Trainer`` that trains with BlockLLM (see the module docstring)."""

    def __init__(self, *args, blockllm_settings: dict[str, Any] | None = None, **kwargs):
        self.blockllm_settings = dict(blockllm_settings or {})
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ConfigError("BlockLLMTrainer does not support TrainingArguments(deepspeed=...): DeepSpeed's ZeRO "
                              "optimizer cannot follow block switches; use deepspeed launch/pretrain.py --ds_config "
                              "(or blockllm_scale.integrations.deepspeed.initialize in your own loop)")
        # launched_with_fsdp: `accelerate launch` with an FSDP config (on CPUs the Trainer then silently trains
        # without FSDP, one unsharded model per process).
        if self.is_fsdp_enabled or self.args.fsdp or launched_with_fsdp():
            raise ConfigError("BlockLLMTrainer does not support FSDP: accelerate would swap the parameters BlockLLM "
                              "holds for sharded ones behind its back; use accelerate launch "
                              "--config_file configs/accelerate/fsdp2.yaml launch/pretrain.py "
                              "(or blockllm_scale.integrations.fsdp2 in your own loop)")

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            model = model if model is not None else self.model
            self.optimizer = BlockLLM(model.named_parameters(), lr=args.learning_rate,
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                      weight_decay=args.weight_decay, **self.blockllm_settings)
        return self.optimizer

    @property
    def blockllm(self) -> BlockLLM:
        """The BlockLLM under accelerate's optimizer wrapper."""
        optimizer = self.optimizer
        while not isinstance(optimizer, BlockLLM):
            if not hasattr(optimizer, "optimizer"):
                raise TypeError(f"BlockLLMTrainer needs a BlockLLM optimizer, got {type(self.optimizer).__name__}")
            optimizer = optimizer.optimizer
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The micro-batch loss as the Trainer reports it (possibly scaled for gradient
        # accumulation: a constant factor, which the patience rule does not see).
        self.blockllm.record_loss(loss)
        return loss
