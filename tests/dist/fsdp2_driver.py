"""Run under ``torchrun --nproc_per_node 2``: every FSDP2 configuration test_fsdp2.py checks, in one
launch (a launch costs ~20 s of imports on 2 cores). Writes ``<out>/rank<r>.json`` per rank.

Rank 0 first trains the single-process reference (before the process group exists, so BlockLLM's
collectives are no-ops), then both ranks run the FSDP2 configurations through the real train loop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
from blockllm_scale.launcher import train as pretrain  # noqa: E402
from blockllm_scale import BlockLLM  # noqa: E402
from blockllm_scale.launcher.backends.fsdp2 import FSDP2Backend  # noqa: E402

# Half the parameters frozen, patience 1 (a reselection every other step, whatever the losses):
# the initial choice plus several switches in 10 steps.
COMMON = ["--model", "tiny", "--seq_len", "32", "--eval_every", "0", "--lr", "3e-3", "--sparsity", "0.5",
          "--patience", "1", "--embeddings", "candidate"]
PER_RANK_BATCH = 2


class CheckedFSDP2Backend(FSDP2Backend):
    """Records, at every optimizer step, which shards hold gradients and how much Adam state exists."""

    log: list[dict] = []

    def step(self) -> None:
        optimizer = self.optimizer
        record = {}
        if isinstance(optimizer, BlockLLM):
            record["reselections_before"] = optimizer.selection.reselections
            trained = {name for name, _ in optimizer.trained_named_parameters()}
            params = dict(self.model.named_parameters())
            with_grad = {n for n, p in params.items() if p.grad is not None}
            record.update(
                grads_only_on_trained=with_grad == trained,
                grads_are_dtensors=all(type(params[n].grad).__name__ == "DTensor" for n in with_grad),
                trained_numel=sum(params[n].numel() for n in trained),
                trained_local_numel=sum(params[n].to_local().numel() for n in trained),
            )
        super().step()
        if isinstance(optimizer, BlockLLM):
            record.update(state_numel=optimizer.state_numel(), state_dtypes=sorted(optimizer.state_dtypes()),
                          reselections=optimizer.selection.reselections)
        self.log.append(record)


def train(out_dir: Path, *flags: str) -> dict:
    CheckedFSDP2Backend.log = []
    sections = pretrain.parse_args([*COMMON, "--out_dir", str(out_dir), *flags])
    losses = pretrain.train_loop(sections)
    return {"losses": losses, "steps": CheckedFSDP2Backend.log}


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    if rank == 0:
        global_batch = str(PER_RANK_BATCH * int(os.environ["WORLD_SIZE"]))
        results["plain"] = train(out / "plain", "--steps", "10", "--batch_size", global_batch, "--backend", "plain")
    pretrain.make_backend = lambda train_config: CheckedFSDP2Backend(train_config)
    fsdp = ["--backend", "fsdp2", "--batch_size", str(PER_RANK_BATCH)]
    results["fp32"] = train(out / "fp32", *fsdp, "--steps", "10")
    results["first_half"] = train(out / "resumed", *fsdp, "--steps", "10", "--stop_at_step", "5")
    results["resumed"] = train(out / "resumed", *fsdp, "--steps", "10", "--resume", "auto")
    results["saved_every_step"] = train(out / "saved_every_step", *fsdp, "--steps", "10", "--save_every", "1")
    # No scoring step 0 with random selection: the first forward sees one block trainable (the trap).
    bf16 = [*fsdp, "--steps", "4", "--dtype", "bf16", "--strategy", "random", "--patience", "1"]
    results["bf16"] = train(out / "bf16", *bf16)
    # Resumed in bf16: the first forward after loading sees only the saved selection trainable.
    results["bf16_first_half"] = train(out / "bf16_resumed", *bf16, "--stop_at_step", "2")
    results["bf16_resumed"] = train(out / "bf16_resumed", *bf16, "--resume", "auto")
    ao = [*fsdp, "--steps", "3", "--states", "torchao_8bit"]
    results["torchao_8bit"] = train(out / "ao", *ao)
    results["torchao_first_half"] = train(out / "ao_resumed", *ao, "--stop_at_step", "2")
    results["torchao_resumed"] = train(out / "ao_resumed", *ao, "--resume", "auto")
    results["adamw"] = train(out / "adamw", *fsdp, "--steps", "4", "--optimizer", "adamw")
    # s=0.9: the tiny LLaMA's embeddings exceed the budget, so BlockLLM is built with row ranges, which the
    # sharded tensors cannot have: rebind_parameters must return to whole tensors.
    results["s09"] = train(out / "s09", *fsdp, "--steps", "3", "--sparsity", "0.9")
    # --time_budget spent on rank 1 only (its clock runs 1000 s a reading): both ranks must stop after step 1
    # with one checkpoint (a rank stopping alone would hang the other in the next collective), and
    # --resume auto must finish the run exactly.
    real_clock = pretrain.time.monotonic
    if rank == 1:
        readings = iter(range(10**6))
        pretrain.time = type(sys)("fast_clock")
        pretrain.time.monotonic = lambda: real_clock() + 1000.0 * next(readings)
    results["out_of_time"] = train(out / "out_of_time", *fsdp, "--steps", "10", "--time_budget", "500")
    pretrain.time = sys.modules["time"]
    results["out_of_time_resumed"] = train(out / "out_of_time", *fsdp, "--steps", "10", "--resume", "auto")
    results["world_size"] = torch.distributed.get_world_size()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
