"""Per-run metrics: one JSON object per step in ``<out_dir>/metrics.jsonl``, written by rank 0, and the
summary the launcher prints at the end of a run.

Every field of a record describes that record's step (the ``step``-th optimizer step, counted from 1):

| field | meaning |
|---|---|
| `step` | this step's number, 1 for the first optimizer step |
| `loss` | training loss of this step: mean over its micro-batches and over ranks |
| `lr` | learning rate this step's update used (the schedule's value for this step) |
| `tokens` | tokens trained on, all ranks together, up to and including this step |
| `tokens_per_s` | this step's tokens over its seconds: forward, backward and update (evaluations and checkpoints are not counted) |
| `peak_allocated_gib`, `peak_reserved_gib` | CUDA: the run's peak memory up to and including this step, on the fullest GPU (`torch.cuda.max_memory_*`) |
| `peak_rss_gib` | CPU: the process's peak resident memory up to and including this step, the largest over ranks |
| `lowest_trained_layer` | the lowest decoder layer this step trained (-1: an input embedding; null: none), which sets how deep backward went |
| `selected_fraction` | BlockLLM: the share of the model's parameters this step updated |
| `scoring_step` | BlockLLM: this step was a scoring step (every candidate took a gradient so that its norm could be measured: a full-depth backward) |
| `reselected` | BlockLLM: this step's optimizer step chose a new selection (the outcome of a scoring step, or a random draw); the next step trains it |
| `eval_loss`, `eval_perplexity` | held-out loss after this step's update (and its exp), on the steps that evaluate (`--eval_every`, and the last) |

A resumed run continues the same file. Records past the step it resumes from (written by the interrupted run
after its checkpoint) are moved to ``metrics.discarded.jsonl`` beside it, so ``metrics.jsonl`` stays one
history: each step once, in order.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

import torch


def peak_memory_gib(device: torch.device) -> dict:
    """Peak allocated/reserved accelerator memory since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.discarded_path = self.path.with_name("metrics.discarded.jsonl")
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def set_aside_after(self, step: int) -> list[int]:
        """Keep the records of steps 1..``step`` (the step a run resumes from) and move the later ones,
        and any line a kill cut short, to metrics.discarded.jsonl. Returns the steps set aside (-1: a
        line that is not a record)."""
        if not self.enabled or not self.path.is_file():
            return []
        kept, later = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            line_step = _step_of(line)
            (kept if line_step is not None and line_step <= step else later).append((line_step, line))
        if later:
            with self.discarded_path.open("a") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for _, line in later)
            staging = self.path.with_suffix(".jsonl.tmp")
            staging.write_text("".join(line for _, line in kept))
            os.replace(staging, self.path)  # the history is never half rewritten
        return [-1 if line_step is None else line_step for line_step, _ in later]


def step_range(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Throughput:
    """Tokens per second of one step: from :meth:`start` (before its first forward) to
    :meth:`tokens_per_second` (after its update), synchronising the GPU at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started = time.perf_counter()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.started = self._now()

    def tokens_per_second(self, tokens: int) -> float:
        return tokens / max(self._now() - self.started, 1e-9)


class RunSummary:
    """What the launcher prints at the end of a run, from the records this invocation wrote."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        """Steps, tokens, losses, speed, memory and BlockLLM's selections of this invocation."""
        if not self.records:
            return []
        first, last = self.records[0], self.records[-1]
        # Every step has the same tokens, so tokens over time is the harmonic mean of the steps' rates.
        rate = len(self.records) / sum(1 / max(r["tokens_per_s"], 1e-9) for r in self.records)
        lines = [f"{step_range(first['step'], last['step'])} ({len(self.records)} in this invocation), "
                 f"{last['tokens']:,} tokens in all, {rate:,.0f} tokens/s",
                 f"train loss {last['loss']:.4f} (step {last['step']})" + self._eval_part(),
                 self._memory_line()]
        if "selected_fraction" in last:
            fraction = statistics.fmean(r["selected_fraction"] for r in self.records)
            # Step 1's selection is the first choice, not a reselection.
            reselections = sum(bool(r.get("reselected")) for r in self.records if r["step"] > 1)
            lines.append(f"BlockLLM: {reselections} reselection(s), {fraction:.3f} of the parameters trained per "
                         "step on average")
        return lines

    def _eval_part(self) -> str:
        evaluated = [r for r in self.records if "eval_loss" in r]
        if not evaluated:
            return "; no evaluation (--eval_every 0)"
        r = evaluated[-1]
        return f"; eval loss {r['eval_loss']:.4f}, perplexity {r['eval_perplexity']:.2f} (step {r['step']})"

    def _memory_line(self) -> str:
        peak = lambda field: max(r.get(field, 0.0) for r in self.records)  # noqa: E731
        if "peak_allocated_gib" in self.records[-1]:
            return (f"peak memory {peak('peak_allocated_gib'):.2f} GiB allocated, "
                    f"{peak('peak_reserved_gib'):.2f} GiB reserved (the fullest GPU)")
        return f"peak memory {peak('peak_rss_gib'):.2f} GiB resident (the largest process)"
