"""BlockLLM inside the Hugging Face Trainer: train, checkpoint, resume; the resumed run continues exactly
like the uninterrupted one, with the selection (and its requires_grad flags) restored from the checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from blockllm_scale.launcher.data import DataConfig, build_datasets
from blockllm_scale.integrations.hf import BlockLLMTrainer, causal_lm_collator
from blockllm_scale.launcher.models import build_model

STEPS, STOP = 8, 4
# Half the parameters frozen and patience 1 force block switches within 8 steps.
SETTINGS = {"sparsity": 0.5, "patience": 1, "embeddings": "candidate"}


class RecordingTrainer(BlockLLMTrainer):
    """Keeps each micro-batch loss as an exact float (the Trainer's logs round them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(loss.item())
        return loss


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


class SnapshotAtBegin(TrainerCallback):
    """What the optimizer looks like when training (re)starts, after the Trainer loaded the checkpoint."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        blockllm = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.selection_step = blockllm.selection.step
        self.selected = list(blockllm.selection.selected)
        trained = {name for name, _ in blockllm.trained_named_parameters()}
        self.flags_match = blockllm.selection.scoring or all(
            p.requires_grad == (n in trained) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def train_set():
    train, _ = build_datasets(DataConfig(seq_len=32))
    return torch.utils.data.Subset(train, range(64))


def make_trainer(out_dir, train_set, callbacks=()):
    torch.manual_seed(0)
    model = build_model("tiny")
    args = TrainingArguments(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="cosine", logging_steps=1, save_steps=100,
                             save_strategy="steps", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    return RecordingTrainer(model=model, args=args, train_dataset=train_set, data_collator=causal_lm_collator,
                            blockllm_settings=SETTINGS, callbacks=list(callbacks))


def test_resume_from_checkpoint_continues_exactly(tmp_path, train_set):
    whole = make_trainer(tmp_path / "whole", train_set)
    whole.train()
    assert len(whole.losses) == STEPS
    assert whole.blockllm.selection.reselections >= 3  # the initial choice and >= 2 switches

    first = make_trainer(tmp_path / "split", train_set, [StopAt(STOP)])
    first.train()
    checkpoint = tmp_path / "split" / f"checkpoint-{STOP}"
    assert checkpoint.is_dir()
    saved_selection = list(first.blockllm.selection.selected)

    snapshot = SnapshotAtBegin()
    second = make_trainer(tmp_path / "split", train_set, [snapshot])
    second.train(resume_from_checkpoint=str(checkpoint))

    # The Trainer really called BlockLLM.load_state_dict: selection and flags are the checkpoint's.
    assert snapshot.selection_step == STOP and snapshot.selected == saved_selection and snapshot.flags_match
    assert first.losses == whole.losses[:STOP]
    assert second.losses == whole.losses[STOP:]
    assert whole.blockllm.selection.reselections == second.blockllm.selection.reselections


def test_deepspeed_config_is_refused_in_one_line(tmp_path):
    """The Trainer would pass BlockLLM to deepspeed.initialize, which cannot follow block switches. Run in a
    child process: a Trainer with a DeepSpeed config leaves accelerate's process-wide state set to DeepSpeed."""
    script = f"""
import os
os.environ["DS_ACCELERATOR"] = "cpu"
from transformers import TrainingArguments
from blockllm_scale.config import ConfigError
from blockllm_scale.integrations.hf import BlockLLMTrainer, causal_lm_collator
from blockllm_scale.launcher.models import build_model
ds = {{"zero_optimization": {{"stage": 2}}, "train_micro_batch_size_per_gpu": "auto",
      "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}}
args = TrainingArguments(output_dir={str(tmp_path)!r}, max_steps=2, report_to=[], use_cpu=True, deepspeed=ds)
try:
    BlockLLMTrainer(model=build_model("tiny"), args=args, data_collator=causal_lm_collator,
                    blockllm_settings={{"sparsity": 0.5}})
except ConfigError as error:
    print("REFUSED:", error)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    refused = [line for line in out.stdout.splitlines() if line.startswith("REFUSED:")]
    assert refused, out.stdout + out.stderr
    assert re.search(r"BlockLLMTrainer does not support .*deepspeed launch/pretrain.py", refused[0])


def test_fsdp_is_refused_in_one_line(tmp_path):
    """Under `accelerate launch` with an FSDP config (ACCELERATE_USE_FSDP) the Trainer would shard the model
    behind BlockLLM's back on GPUs, and on CPUs silently train one unsharded copy per process. Child process:
    accelerate keeps process-wide state."""
    script = f"""
from transformers import TrainingArguments
from blockllm_scale.config import ConfigError
from blockllm_scale.integrations.hf import BlockLLMTrainer, causal_lm_collator
from blockllm_scale.launcher.models import build_model
args = TrainingArguments(output_dir={str(tmp_path)!r}, max_steps=2, report_to=[], use_cpu=True)
try:
    BlockLLMTrainer(model=build_model("tiny"), args=args, data_collator=causal_lm_collator,
                    blockllm_settings={{"sparsity": 0.5}})
except ConfigError as error:
    print("REFUSED:", error)
"""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2], env=env)
    refused = [line for line in out.stdout.splitlines() if line.startswith("REFUSED:")]
    assert refused, out.stdout + out.stderr
    assert re.search(r"does not support FSDP.*configs/accelerate/fsdp2.yaml launch/pretrain.py", refused[0])
