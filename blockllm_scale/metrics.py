"""Per-run metrics: one JSON object per line in ``<out_dir>/metrics.jsonl``, written by rank 0, plus the
numbers the progress bar shows. Appends on resume, so one file holds the whole run."""

from __future__ import annotations

import json
import math
import resource
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
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Throughput:
    """Tokens per second over the steps since the last call (synchronising the GPU first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def tokens_per_second(self, tokens: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        rate = tokens / max(now - self.start, 1e-9)
        self.start = now
        return rate
