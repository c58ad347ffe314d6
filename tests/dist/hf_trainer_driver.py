"""One 2-process run of BlockLLMTrainer under a backend, for tests/dist/test_hf_trainer_dist.py.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 hf_trainer_driver.py OUT zero1|zero2|zero3   (zero3: gradient checkpointing)
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --mixed_precision no hf_trainer_driver.py OUT fsdp2

In one process, three Trainers on the same data: the Trainer's own AdamW (2 steps: its per-rank Adam state),
BlockLLM for STEPS steps with a checkpoint at SAVE, and BlockLLM resumed from that checkpoint. Each rank
writes OUT/<backend>_rank<r>.json: exact losses, per-step state measurements, the logged BlockLLM fields.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from blockllm_scale.launcher.data import DataConfig, build_datasets
from blockllm_scale.parallel import end_with_a_barrier
from blockllm_scale.integrations.hf import BlockLLMTrainer, causal_lm_collator
from blockllm_scale.launcher.models import build_model
from blockllm_scale.states import state_numel

STEPS, SAVE, BATCH, ACCUM = 10, 5, 2, 2
# Half the parameters frozen and patience 1: several block switches within 10 steps.
SETTINGS = {"sparsity": 0.5, "patience": 1, "embeddings": "candidate"}
DS_CONFIG = {  # "auto" everywhere the Trainer fills in a value
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


class Record(TrainerCallback):
    """Per optimizer step: BlockLLM's selection and this rank's optimizer-state elements."""

    def __init__(self):
        self.steps: list[dict] = []
        self.logs: list[dict] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        blockllm = getattr(self, "blockllm", None)
        if blockllm is None:  # the Trainer's AdamW: ZeRO's optimizer wraps a torch AdamW over flat partitions
            base = getattr(inner, "optimizer", inner)
            self.steps.append({"state_numel": state_numel(base)})
            return
        trained = set(blockllm._always) | set(blockllm.selection.selected)
        frozen_grads = [n for n, p in self.model.named_parameters() if not p.requires_grad and p.grad is not None]
        self.steps.append({"step": state.global_step, "reselections": blockllm.selection.reselections,
                           "scoring": blockllm.selection.scoring, "state_numel": blockllm.state_numel(),
                           "selected_numel": sum(blockllm.blocks[b].numel for b in trained),
                           "total_numel": sum(block.numel for block in blockllm.blocks),
                           "frozen_with_grad": frozen_grads})

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def make_args(out_dir: Path, backend: str, max_steps: int, **extra) -> TrainingArguments:
    deepspeed = None
    if backend.startswith("zero"):
        deepspeed = json.loads(json.dumps(DS_CONFIG))
        deepspeed["zero_optimization"]["stage"] = int(backend[-1])
    return TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, learning_rate=3e-3, lr_scheduler_type="cosine",
                             warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=SAVE,
                             report_to=[], seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             deepspeed=deepspeed, use_cpu=True,
                             # ZeRO-3 frees frozen weights after use: recomputing them must still work
                             gradient_checkpointing=backend == "zero3", **extra)


def exact_losses(trainer_class):
    class WithLosses(trainer_class):
        """Keeps each micro-batch loss as an exact float (the Trainer's logs round them)."""

        losses: list[float]

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.__dict__.setdefault("losses", []).append(loss.item())
            return loss

    return WithLosses


def run(out_dir: Path, backend: str, train_set, blockllm: bool, max_steps: int, resume: str | None = None):
    unset_hf_deepspeed_config()  # the previous run's TrainingArguments would make from_config use zero.Init
    torch.manual_seed(0)
    model = build_model("tiny")  # before the TrainingArguments: whole weights (BlockLLM sizes blocks from them)
    record = Record()
    record.model = model
    kwargs = dict(model=model, args=make_args(out_dir, backend, max_steps), train_dataset=train_set,
                  data_collator=causal_lm_collator, callbacks=[record])
    if blockllm:
        trainer = exact_losses(BlockLLMTrainer)(**kwargs, blockllm_settings=SETTINGS)
    else:
        trainer = exact_losses(Trainer)(**kwargs)
    if blockllm:
        original = trainer.create_optimizer

        def create_optimizer(model=None):  # the callback measures the BlockLLM under accelerate's wrappers
            optimizer = original(model)
            record.blockllm = trainer.blockllm
            record.model = trainer.model
            return optimizer

        trainer.create_optimizer = create_optimizer
    trainer.train(resume_from_checkpoint=resume)
    return {"losses": trainer.losses, "steps": record.steps, "logs": record.logs,
            "distributed_type": str(trainer.accelerator.distributed_type)}


def main() -> None:
    out_dir, backend = Path(sys.argv[1]), sys.argv[2]
    if backend.startswith("zero"):
        import deepspeed

        # DeepSpeed would compile its shared-memory all-reduce op (45-120 s) when accelerate joins the
        # process group; gloo needs none.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    train, _ = build_datasets(DataConfig(seq_len=32))
    train_set = torch.utils.data.Subset(train, range(BATCH * ACCUM * 2 * STEPS))
    result = {"backend": backend}
    result["adamw"] = run(out_dir / f"{backend}_adamw", backend, train_set, blockllm=False, max_steps=2)
    result["whole"] = run(out_dir / f"{backend}_whole", backend, train_set, blockllm=True, max_steps=STEPS)
    checkpoint = out_dir / f"{backend}_whole" / f"checkpoint-{SAVE}"
    result["resumed"] = run(out_dir / f"{backend}_resumed", backend, train_set, blockllm=True, max_steps=STEPS,
                            resume=str(checkpoint))
    result["world_size"] = dist.get_world_size()
    rank = dist.get_rank()
    (out_dir / f"{backend}_rank{rank}.json").write_text(json.dumps(result))
    end_with_a_barrier()  # or the Trainer's last all_gather can abort a finished rank at exit (parallel.py)


if __name__ == "__main__":
    main()
