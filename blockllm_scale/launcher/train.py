"""The launcher's train loop: one loop for every backend and optimizer (``launch/pretrain.py`` is its entry).

``main(argv)`` parses the flags (``cli.py``), picks a backend (``backends/``), builds the model (``models.py``),
data (``data.py``) and optimizer (BlockLLM or one of ``blockllm_scale.baselines``), then trains, evaluates,
logs (``metrics.py``) and checkpoints (``checkpoint.py``) into one run folder (``run_dir.py``).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..baselines import BASELINE_SECTIONS, BASELINES
from ..baselines.master_weights import Fp32MasterWeights
from ..config import BlockLLMConfig, ConfigError
from ..integrations.accelerate import launched_by_accelerate
from ..optim import BlockLLM
from ..parallel import end_with_a_barrier, gather_over_ranks, mean_over_ranks
from ..selection import lowest_trained_layer
from .backends import make_backend
from .checkpoint import (prune_checkpoints, resolve_resume, restore_rng_states, rng_states, save_checkpoint,
                         set_aside_later_checkpoints)
from .cli import CONFIG_SECTIONS, DTYPES, TrainConfig, parse_args, resume_command  # noqa: F401  (tests use them here)
from .data import build_datasets, load_tokenizer, make_batches, model_vocab_size, require_rows
from .metrics import MetricsLog, RunSummary, Throughput, peak_memory_gib, perplexity, step_range
from .models import build_model
from .run_dir import claim_out_dir

# The thin entry script beside the package in a checkout: the resume command names it.
ENTRY_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"


def build_optimizer(train: TrainConfig, blockllm: BlockLLMConfig, model: torch.nn.Module, sections: dict | None = None,
                    fp32_masters: bool = False):
    """BlockLLM or a baseline; ``sections`` (from parse_args) supplies a baseline's own settings.

    ``fp32_masters``: the optimizer updates fp32 copies of the bf16 weights it trains (``--dtype bf16`` on the
    plain backend; DeepSpeed and FSDP2 keep their own). ``--dtype bf16-pure`` updates the weights in place.
    """
    adam = dict(lr=train.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=train.weight_decay)
    if train.optimizer == "blockllm":
        settings = dataclasses.asdict(blockllm)
        if train.dtype == "bf16-pure":
            settings["weight_update"] = "round_to_nearest"
        return BlockLLM(model.named_parameters(), **adam, **settings)
    section = BASELINE_SECTIONS.get(train.optimizer)
    settings = {"config": sections[section]} if section and sections else {}
    optimizer = BASELINES[train.optimizer](model, **adam, **settings)
    if fp32_masters and train.dtype == "bf16":
        if getattr(optimizer, "steps_in_backward", False) or train.optimizer == "badam":
            raise ConfigError(f"--optimizer {train.optimizer} with --dtype bf16: it keeps no fp32 master weights here; "
                              "use --dtype bf16-pure (and compare it with runs in the same precision)")
        optimizer = Fp32MasterWeights(optimizer)
    return optimizer


def check_steps_in_backward(optimizer, train: TrainConfig, backend) -> None:
    """An optimizer that steps inside backward (``steps_in_backward``: its ``step()`` is a no-op, see
    baselines/in_backward.py) needs each gradient exactly once, on one process that owns it."""
    if not getattr(optimizer, "steps_in_backward", False):
        return
    if train.grad_accum > 1:
        raise ConfigError(f"--optimizer {train.optimizer} steps inside backward: it cannot accumulate gradients (use --grad_accum 1)")
    if backend.owns_gradients:  # FSDP2, DeepSpeed
        raise ConfigError(f"--optimizer {train.optimizer} steps inside backward: it runs on the plain backend only")


def checkpoint_this_step(model, optimizer, train: TrainConfig) -> None:
    """Turn HF activation checkpointing on or off for the coming step (call before its first forward).

    Why: on BlockLLM's scoring steps every candidate is trainable, so backward runs through the whole
    model with full-depth activations, the run's memory peak when checkpointing is off (a sparse step
    stops below its lowest trained layer). Recomputing activations on those rare steps only removes
    that peak for one extra forward per scoring step. ``model`` is what the backend's prepare()
    returned: the HF model itself (plain; FSDP2 shards it in place; accelerate delegates to those) or
    a DeepSpeed engine holding it in ``.module``. HF checkpoints only in train mode (the loop's).
    """
    wanted = train.activation_checkpointing or (
        train.checkpoint_scoring_steps and isinstance(optimizer, BlockLLM) and optimizer.scoring_step)
    hf_model = model if isinstance(model, PreTrainedModel) else model.module
    # HF's is_gradient_checkpointing, without the deprecation warning transformers 5 attaches to it.
    if any(getattr(m, "gradient_checkpointing", False) for m in hf_model.modules()) != wanted:
        set_activation_checkpointing(hf_model, wanted)


def set_activation_checkpointing(hf_model, on: bool) -> None:
    """HF activation checkpointing on or off, non-reentrant: with reentrant checkpointing and frozen
    inputs no gradient reaches the selected layers (integration notes)."""
    # transformers 5.2x renamed gradient_* to activation_checkpointing_* (the old names warn at every call).
    renamed = hasattr(hf_model, "activation_checkpointing_enable")
    if on:
        if renamed:
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Enabling also makes the embedding output require grad (reentrant checkpointing needs that), so
        # backward would run through every frozen layer below the selected ones.
        hf_model.disable_input_require_grads()
    elif renamed:
        hf_model.activation_checkpointing_disable()
    else:
        hf_model.gradient_checkpointing_disable()


def cosine_schedule(optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay from --lr to --min_lr_ratio * --lr at --steps."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(backend, model, eval_set, train: TrainConfig) -> float:
    model.eval()
    batches = make_batches(eval_set, train.batch_size, seed=0, rank=backend.rank, world_size=backend.world_size)
    losses = [backend.forward(model, next(batches)).float().item() for _ in range(train.eval_batches)]
    model.train()
    return mean_over_ranks(sum(losses) / len(losses))


def train_loop(sections: dict) -> list[float]:
    """Run training; returns the per-step losses of this run (the tests compare them)."""
    started = time.monotonic()  # --time_budget counts from here
    train, data, blockllm_cfg = sections["train"], sections["data"], sections["blockllm"]
    resume_argv = resume_command(sections)  # before a backend adopts settings from its launcher into `train`
    claim_run_folder(train)  # before anything (the backend included) writes into --out_dir
    backend = make_backend(train)
    # --ds_config: the JSON's batch sizes, bf16 and "blockllm" section; the other backends adopt nothing
    train, blockllm_cfg = backend.resolve_settings(train, blockllm_cfg)
    if train.memory_snapshot and backend.device.type != "cuda":
        raise ConfigError(f"--memory_snapshot records CUDA allocations; this run is on {backend.device.type}")
    recording = bool(train.memory_snapshot) and backend.rank == 0
    if recording:  # from before the model exists, so replaying the trace from zero gives every live tensor
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    torch.manual_seed(train.seed)
    tokenizer = load_tokenizer(data.tokenizer)
    train_set, eval_set = build_datasets(data)
    if train.eval_every:  # found now, not at the first evaluation
        require_rows(eval_set, train.batch_size * backend.world_size, f"the held-out part of --dataset {data.dataset}")
    with torch.device(backend.device):  # initialise in place: a 7B never passes through host memory
        model = build_model(train.model, vocab_size=model_vocab_size(data, tokenizer), dtype=DTYPES[train.dtype])
    if train.activation_checkpointing:  # before the backend wraps the model (DeepSpeed, FSDP2)
        set_activation_checkpointing(model, True)
    model.to(backend.device)
    if train.dtype == "bf16-pure" and backend.keeps_master_weights:
        raise ConfigError(f"--dtype bf16-pure is for the plain backend; {type(backend).__name__} keeps fp32 master "
                          "weights in bf16 (use --dtype bf16)")
    optimizer = build_optimizer(train, blockllm_cfg, model, sections, fp32_masters=not backend.keeps_master_weights)
    check_steps_in_backward(optimizer, train, backend)
    blockllm = optimizer if isinstance(optimizer, BlockLLM) else None
    scheduler = cosine_schedule(optimizer, train)
    model, optimizer, scheduler = backend.prepare(model, optimizer, scheduler)

    start_step, tokens_seen = 0, 0
    checkpoint, skipped = resolve_resume(train.resume, train.out_dir)
    if checkpoint is not None:
        client_state = backend.load(checkpoint)
        start_step, tokens_seen = client_state["step"], client_state["tokens_seen"]
        restore_rng_states(client_state["rng"])
    stop = min(train.stop_at_step or train.steps, train.steps)
    log = MetricsLog(train.out_dir, enabled=backend.rank == 0)
    if backend.rank == 0:
        if skipped:
            print(f"[pretrain] warning: --resume auto {skipped}", file=sys.stderr, flush=True)
        where = f"resuming {checkpoint} at step {start_step}" if checkpoint else "starting fresh"
        print(f"[pretrain] {train.optimizer} on LLaMA-{train.model} ({sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()):,} params), "
              f"backend {type(backend).__name__}, world {backend.world_size}, {where}; metrics: {log.path}", flush=True)
        if train.resume:
            continue_history(log, train.out_dir, start_step)
    if start_step >= stop:
        if backend.rank == 0:
            print(f"[pretrain] nothing to train: {checkpoint} is at step {start_step}, "
                  + (f"the end of --steps {train.steps}: the run is complete" if start_step >= train.steps
                     else f"and --stop_at_step is {train.stop_at_step}"), flush=True)
        return []

    batches = make_batches(train_set, train.batch_size, seed=train.seed, rank=backend.rank,
                           world_size=backend.world_size, start_step=start_step * train.grad_accum)
    tokens_per_step = train.batch_size * data.seq_len * train.grad_accum * backend.world_size
    throughput = Throughput(backend.device)
    progress = _progress_bar(start_step, stop, enabled=backend.rank == 0)
    losses, summary, saved = [], RunSummary(), None
    model.train()  # HF checkpoints (checkpoint_this_step) only in train mode
    for step in range(start_step, stop):
        throughput.start()
        reselections_before = blockllm.selection.reselections if blockllm else 0
        depth = backward_depth(model, blockllm)  # this step's, before step() may switch blocks
        selection = this_steps_selection(blockllm)  # likewise
        checkpoint_this_step(model, optimizer, train)
        micro_losses = []
        for _ in range(train.grad_accum):
            loss = backend.forward(model, next(batches))
            if blockllm is not None:
                blockllm.record_loss(loss)
            backend.backward(loss, train.grad_accum)
            micro_losses.append(loss.detach().float().item())
        lr = float(scheduler.get_last_lr()[0])  # a tensor for optimizers that keep it in one (torchao)
        # Read before the step too: DeepSpeed resets the peak counters when our backend rebuilds its engine at
        # a block switch (its see_memory_usage), which would hide the backward peak of the step that switches.
        peak_before_step = peak_memory_gib(backend.device)
        backend.step()
        tokens_seen += tokens_per_step
        done = step + 1
        peaks = {k: max(v, peak_before_step[k]) for k, v in peak_memory_gib(backend.device).items()}
        # One collective a step: every rank's loss, whether its clock passed --time_budget (read before this
        # step's evaluation, so a long one is counted at the next step), and its peaks.
        clock = float(bool(train.time_budget) and time.monotonic() - started > train.time_budget)
        ranks = gather_over_ranks([sum(micro_losses) / len(micro_losses), clock, *peaks.values()])
        step_loss = sum(r[0] for r in ranks) / len(ranks)
        # Every rank must agree to stop, or the checkpoint's barriers would hang.
        out_of_time = done < stop and any(r[1] for r in ranks)
        peaks = dict(zip(peaks, (max(r[2 + i] for r in ranks) for i in range(len(peaks)))))  # the fullest GPU's
        losses.append(step_loss)
        record = {"step": done, "loss": step_loss, "lr": lr, "tokens": tokens_seen,
                  "tokens_per_s": throughput.tokens_per_second(tokens_per_step), **peaks, "lowest_trained_layer": depth}
        if blockllm is not None:
            record.update(**selection, reselected=blockllm.selection.reselections != reselections_before)
        if train.eval_every and (done % train.eval_every == 0 or done == stop):
            record["eval_loss"] = evaluate(backend, model, eval_set, train)
            record["eval_perplexity"] = perplexity(record["eval_loss"])
        log.write(record)
        summary.add(record)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if checkpoint_due(train, done, stop, out_of_time):
            saved = save_and_prune(backend, train, done, {"step": done, "tokens_seen": tokens_seen, "rng": rng_states()})
        if out_of_time:
            if backend.rank == 0:
                print(f"[pretrain] --time_budget {train.time_budget:g}s spent: stopped at step {done} of {stop} with a "
                      "checkpoint; --resume auto continues", flush=True)
            break
    progress.close()
    end_with_a_barrier()  # the step's all_gather may be the last collective otherwise (parallel.py says why)
    if backend.rank == 0:
        print_summary(summary, train, log, saved, resume_argv, launched=backend.world_size > 1 or launched_by_accelerate())
    if recording:
        Path(train.memory_snapshot).parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(train.memory_snapshot)
        torch.cuda.memory._record_memory_history(enabled=None)
        print(f"[pretrain] memory snapshot: {train.memory_snapshot}", flush=True)
    return losses


def claim_run_folder(train: TrainConfig) -> None:
    """One run per --out_dir (run_dir.py): a fresh run into a folder that holds one is
    refused in one line; with --overwrite the old run is moved aside first."""
    moved = claim_out_dir(train.out_dir, train.resume, train.overwrite, rank=int(os.environ.get("RANK", "0")))
    if moved is not None:
        print(f"[pretrain] --overwrite: the run that was in {train.out_dir} is now in {moved}", flush=True)


def continue_history(log: MetricsLog, out_dir: str, step: int) -> None:
    """After resuming at ``step`` (0: --resume auto found no checkpoint), set aside what the interrupted
    run wrote past it: its later metrics records and checkpoints (rank 0)."""
    records = log.set_aside_after(step)
    if records:
        steps = [s for s in records if s >= 0]
        which = step_range(min(steps), max(steps)) if steps else "unreadable lines"
        print(f"[pretrain] set aside {len(records)} record(s) past step {step} ({which}, written after the checkpoint "
              f"resumed from) in {log.discarded_path}", flush=True)
    later = set_aside_later_checkpoints(out_dir, step)
    if later:
        print(f"[pretrain] set aside checkpoint(s) past step {step} into {Path(out_dir) / 'checkpoints' / 'discarded'}: "
              f"{', '.join(later)}", flush=True)


def this_steps_selection(blockllm: BlockLLM | None) -> dict:
    """The BlockLLM metrics fields that describe the coming step, read before its forward: step() may
    switch blocks (or make the next step a scoring step) at its end."""
    if blockllm is None:
        return {}
    return {"selected_fraction": blockllm.selected_fraction, "scoring_step": blockllm.scoring_step}


def checkpoint_due(train: TrainConfig, done: int, stop: int, out_of_time: bool) -> bool:
    """Every --save_every steps, at this invocation's last step (so --resume auto continues or says the run
    is complete) and when --time_budget stops it; never with --keep_checkpoints 0."""
    if not train.keep_checkpoints:
        return False
    return done == stop or out_of_time or bool(train.save_every and done % train.save_every == 0)


def save_and_prune(backend, train: TrainConfig, step: int, client_state: dict) -> Path:
    saved = save_checkpoint(backend, train.out_dir, step, client_state)
    if backend.rank == 0:
        prune_checkpoints(train.out_dir, train.keep_checkpoints)
    return saved


def print_summary(summary: RunSummary, train: TrainConfig, log: MetricsLog, saved: Path | None,
                  resume_argv: list[str], launched: bool) -> None:
    """The end of every run (rank 0): what it did, where its files are, and how to continue it."""
    for line in summary.lines():
        print(f"[pretrain] {line}")
    print(f"[pretrain] metrics: {log.path}; checkpoints: "
          f"{saved.parent if saved else 'none written (--keep_checkpoints 0)'}" + (f" (newest {saved.name})" if saved else ""))
    last = summary.records[-1]["step"] if summary.records else None
    if last == train.steps:
        print(f"[pretrain] the run is complete (step {last} of --steps {train.steps})", flush=True)
    elif saved is not None:
        script = os.path.relpath(ENTRY_SCRIPT)
        script = script if not script.startswith("..") else str(ENTRY_SCRIPT)
        launcher = "<the same launcher as this run> " if launched else "python "
        print(f"[pretrain] resume: {launcher}{shlex.join([script, *resume_argv])}", flush=True)
    else:
        print("[pretrain] this run cannot be resumed: it wrote no checkpoint (--keep_checkpoints 0)", flush=True)


def backward_depth(model: torch.nn.Module, blockllm: BlockLLM | None) -> int | None:
    """The lowest decoder layer this step trains (-1: an input embedding), which sets how deep backward
    goes and so most of a step's time: BlockLLM's selected blocks (its scoring steps go to the bottom), else
    the parameters that take a gradient now (BAdam's active layer; -1 for whole-model optimizers)."""
    if blockllm is not None:
        return blockllm.lowest_trained_layer
    return lowest_trained_layer([name for name, p in model.named_parameters() if p.requires_grad])


def _progress_bar(start: int, stop: int, enabled: bool):
    from tqdm.auto import tqdm

    # An explicit disable= overrides tqdm's own TQDM_DISABLE variable, so honour it here.
    disable = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=stop, initial=start, disable=disable, unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> None:
    # torch, transformers and deepspeed leave ~0.5M long-lived objects; every full collection Python's gc
    # runs would walk them all (0.1-0.5 s: a straggler step every so often). Frozen, they are skipped. Only
    # what exists now is frozen: models, engines and optimizers built later (engines are rebuilt at block
    # switches) stay collectable.
    gc.freeze()
    try:
        train_loop(parse_args(argv))
    except ConfigError as error:  # configuration mistakes: one line, no traceback
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        gc.unfreeze()  # for callers in the same process (the tests)


if __name__ == "__main__":
    main()
