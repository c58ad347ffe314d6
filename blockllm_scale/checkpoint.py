"""Checkpoint layout shared by every backend: ``<out_dir>/checkpoints/step_<N>/`` plus a ``latest``
file naming the newest complete one. A checkpoint is written under ``step_<N>.partial`` and renamed
when every rank has finished, so an interrupted save never leaves a checkpoint that looks usable."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .parallel import barrier


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(out_dir) / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """``--resume auto`` takes the newest checkpoint of ``out_dir`` (none: start fresh); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume: no checkpoint directory at {resume}")
    return path


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(backend, out_dir: str | Path, step: int, client_state: dict) -> Path:
    """Every rank writes its part into a staging directory that rank 0 publishes when all are done."""
    final = checkpoint_root(out_dir) / f"step_{step}"
    staging = final.with_name(final.name + ".partial")
    if backend.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    backend.save(staging, client_state)
    barrier()
    if backend.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        (final.parent / "latest.tmp").write_text(final.name)
        os.replace(final.parent / "latest.tmp", final.parent / "latest")
    barrier()
    return final
