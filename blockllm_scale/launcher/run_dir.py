"""A run's folder (``--out_dir``): what makes one, and the rule that two runs never share one.

A folder holds a run when its ``metrics.jsonl`` has a record or its ``checkpoints/`` holds anything. A
fresh run (no ``--resume``) into such a folder would mix two histories: its records appended after the
old ones, its checkpoints beside and over the old run's. So it is refused, before anything is written,
unless ``--overwrite`` asks for the old run to be moved aside (into ``<out_dir>/replaced-<time>/``, never
deleted: delete that folder yourself once you are sure).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..config import ConfigError

# What the launcher writes into a run's folder; --overwrite moves exactly these.
RUN_FILES = ("metrics.jsonl", "metrics.discarded.jsonl", "checkpoints")


def holds_a_run(out_dir: str | Path) -> bool:
    out_dir = Path(out_dir)
    metrics, checkpoints = out_dir / "metrics.jsonl", out_dir / "checkpoints"
    has_records = metrics.is_file() and metrics.stat().st_size > 0
    return has_records or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def claim_out_dir(out_dir: str | Path, resume: str, overwrite: bool, rank: int) -> Path | None:
    """Refuse a fresh run into a folder that holds a run (a ConfigError naming the ways on); with
    ``overwrite``, rank 0 moves the old run aside and returns where to. Call before anything is written
    into ``out_dir``: a refused run leaves it as it was."""
    if resume and overwrite:
        raise ConfigError("--overwrite starts the run over and --resume continues it: choose one")
    if resume or not holds_a_run(out_dir):
        return None
    if not overwrite:
        raise ConfigError(f"--out_dir {out_dir} already holds a run (metrics.jsonl or checkpoints/): continue it "
                          f"with --resume auto, or start over with another --out_dir or with --overwrite (which "
                          f"moves the old run into {Path(out_dir) / 'replaced-<time>'}/)")
    return move_run_aside(Path(out_dir)) if rank == 0 else None


def move_run_aside(out_dir: Path) -> Path:
    """Move the launcher's files of the run in ``out_dir`` into a new ``replaced-<time>/`` inside it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out_dir / f"replaced-{stamp}", 1
    while target.exists():
        target, n = out_dir / f"replaced-{stamp}-{n}", n + 1
    target.mkdir()
    for name in RUN_FILES:
        if (out_dir / name).exists():
            os.replace(out_dir / name, target / name)
    return target
