"""BlockLLM inside the Hugging Face Trainer: train, checkpoint, resume; the resumed run continues exactly
like the uninterrupted one, with the selection (and its requires_grad flags) restored from the checkpoint."""

from __future__ import annotations

import json
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


REFUSALS = f"""
import json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
from transformers import TrainingArguments
from blockllm_scale.config import ConfigError
from blockllm_scale.integrations.hf import BlockLLMTrainer, causal_lm_collator
from blockllm_scale.launcher.models import build_model
model = build_model("tiny")
for case in json.loads(sys.argv[1]):
    ds = case.pop("deepspeed", None)
    args = TrainingArguments(output_dir=sys.argv[2], max_steps=2, report_to=[], use_cpu=True, deepspeed=ds)
    try:
        BlockLLMTrainer(model=model, args=args, data_collator=causal_lm_collator, blockllm_settings=case)
        print("ACCEPTED")
    except ConfigError as error:
        print("REFUSED:", error)
"""


def refusals(tmp_path, cases: list[dict], **env: str) -> list[str]:
    """What BlockLLMTrainer says to each case, in a child process: accelerate keeps process-wide state."""
    out = subprocess.run([sys.executable, "-c", REFUSALS, json.dumps(cases), str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[2], env={**os.environ, **env})
    lines = [line for line in out.stdout.splitlines() if line.startswith(("REFUSED:", "ACCEPTED"))]
    assert len(lines) == len(cases), out.stdout + out.stderr
    return lines


def test_what_stays_unsupported_under_deepspeed_is_refused_in_one_line(tmp_path):
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto"}
    cases = [
        {"deepspeed": {**zero, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}},
        {"deepspeed": {**zero, "zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}},
        {"deepspeed": {**zero, "zero_optimization": {"stage": 2}}, "variant": "masked"},
        {"deepspeed": {**zero, "zero_optimization": {"stage": 2},
                       "optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}},
        {"deepspeed": {**zero, "zero_optimization": {"stage": 2}, "blockllm": {"sparsity": 0.8}}, "sparsity": 0.5},
        # accepted: an AdamW section of "auto" values is what BlockLLM does anyway
        {"deepspeed": {**zero, "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {
            "lr": "auto", "weight_decay": "auto"}}}, "sparsity": 0.5},
    ]
    said = refusals(tmp_path, cases)
    assert "zero_optimization.offload_optimizer is not supported" in said[0]
    assert 'remove the "scheduler" section' in said[1]
    assert "variant='masked'" in said[2]
    assert "optimizer.params.lr = 0.5 differs from the TrainingArguments' 5e-05" in said[3]
    assert '"blockllm".sparsity differs from blockllm_settings' in said[4]
    assert said[5] == "ACCEPTED"


def test_fsdp_activation_checkpointing_is_refused_in_one_line(tmp_path):
    """Under `accelerate launch` with an FSDP2 config BlockLLMTrainer shards the model itself; FSDP's own
    activation checkpointing is not applied then, so asking for it is an error naming the replacement."""
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    said = refusals(tmp_path, [{"sparsity": 0.5}], **env)
    assert re.search(r"fsdp_activation_checkpointing: true is not supported .*gradient_checkpointing=True", said[0])


def test_the_finetuning_example_runs_on_a_jsonl_file(tmp_path):
    """launch/finetune_trainer.py as the README shows it, on a local JSONL file, a few CPU steps."""
    corpus = (Path(__file__).resolve().parents[2] / "blockllm_scale" / "assets" / "shakespeare.txt").read_text()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": corpus[i:i + 2000]}) + "\n" for i in range(0, 60_000, 2000)))
    command = [sys.executable, "launch/finetune_trainer.py", "--data", str(data), "--output_dir", str(tmp_path / "out"),
               "--max_steps", "4", "--seq_len", "32", "--per_device_train_batch_size", "2", "--sparsity", "0.5",
               "--patience", "1", "--logging_steps", "1", "--save_steps", "2", "--disable_tqdm", "true"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    logged = [line for line in out.stdout.splitlines() if "blockllm/reselections" in line]
    assert len(logged) == 4
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "checkpoint-4").is_dir()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
