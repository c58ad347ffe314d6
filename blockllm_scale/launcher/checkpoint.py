"""Checkpoint layout shared by every backend: ``<out_dir>/checkpoints/step_<N>/``.

Known to be complete: every rank writes its part under ``step_<N>.partial``; when all are done, rank 0
lists every file in it (path, bytes, sha256) in ``manifest.json`` and renames the folder to ``step_<N>``.
The manifest is written from what is on disk, so it covers whatever a backend saves (the plain
backend's ``*.pt``, DeepSpeed's tag folder and ``latest`` file, FSDP2's ``dcp/`` shards and per-rank
files). A checkpoint is loaded only if its files match its manifest: a save cut short (a kill, a full
disk) leaves no ``step_<N>`` or one that fails the check, and so does a file damaged or truncated later.
``--resume auto`` takes the newest intact checkpoint, saying which newer ones it skipped and why.

``latest`` names the newest checkpoint written, for people and scripts (``--resume auto`` goes by the
manifests). Checkpoints are never deleted except by :func:`prune_checkpoints` (``--keep_checkpoints``,
this run's own older ones) and never overwritten: one that would be is moved into ``discarded/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..parallel import barrier, broadcast_from_rank0

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step_(\d+)")
DISCARDED = "discarded"  # checkpoints set aside (past a resume step, or in the way of a save)


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_of(path: Path) -> int | None:
    """N for a folder named ``step_<N>`` (not ``step_<N>.partial``), else None."""
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def step_dirs(root: Path) -> list[Path]:
    """The ``step_<N>`` folders in ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) is not None), key=step_of)


# ----- manifests ------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """List every file under ``directory`` (path, bytes, sha256) in its manifest.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    staging = directory / (MANIFEST + ".tmp")
    staging.write_text(json.dumps({"step": step, "files": entries}, indent=1))
    os.replace(staging, directory / MANIFEST)


def manifest_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint (None: its files match its manifest)."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST}: its save did not finish"
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, entry in files.items():  # sizes first: cheap, and what a cut-short write changes
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size:,} bytes, its manifest says {entry['bytes']:,}"
    for name, entry in files.items():
        if _sha256(directory / name) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


# ----- choosing the checkpoint to resume from --------------------------------------------------------
def resolve_resume(resume: str, out_dir: str | Path) -> tuple[Path | None, str | None]:
    """(checkpoint to load, warning to print) for ``--resume``; a ConfigError for a path that is no
    complete checkpoint. ``auto``: the newest intact checkpoint of ``out_dir`` (None when it has none).

    Rank 0 reads and hashes the files once; every rank gets its answer (or its error)."""
    if not resume:
        return None, None
    choice = broadcast_from_rank0(lambda: _choice_or_error(resume, Path(out_dir)))
    if "error" in choice:
        raise ConfigError(choice["error"])
    return (Path(choice["path"]) if choice["path"] else None), choice["warning"]


def _choice_or_error(resume: str, out_dir: Path) -> dict:
    try:
        path, warning = newest_intact(out_dir) if resume == "auto" else (explicit_checkpoint(Path(resume)), None)
    except ConfigError as error:
        return {"error": str(error)}
    return {"path": str(path) if path else None, "warning": warning}


def newest_intact(out_dir: Path) -> tuple[Path | None, str | None]:
    """``--resume auto``: the newest checkpoint whose files match its manifest, and a warning naming the
    newer ones skipped; (None, None) when there is no checkpoint at all."""
    root = checkpoint_root(out_dir)
    skipped = []
    for candidate in reversed(step_dirs(root)):
        problem = manifest_problem(candidate)
        if problem is None:
            warning = (f"skipped {'; '.join(skipped)}: resuming from {candidate.name} instead" if skipped else None)
            return candidate, warning
        skipped.append(f"{candidate.name} ({problem})")
    if skipped:
        raise ConfigError(f"--resume auto: no intact checkpoint in {root} ({'; '.join(skipped)}); start over with "
                          "--overwrite or another --out_dir")
    return None, None


def explicit_checkpoint(path: Path) -> Path:
    """``--resume PATH``: PATH must be one complete checkpoint; each other case says what it is instead."""
    if not path.is_dir():
        raise ConfigError(f"--resume: no checkpoint directory at {path}")
    if (path / "checkpoints").is_dir():
        raise ConfigError(f"--resume: {path} is a run's folder, not a checkpoint: use --resume auto --out_dir {path}")
    inside = step_dirs(path)
    if inside:
        raise ConfigError(f"--resume: {path} is a checkpoints folder, not a checkpoint: give one of its step_N "
                          f"folders (newest: {inside[-1]}) or use --resume auto")
    if not any(path.iterdir()):
        raise ConfigError(f"--resume: {path} is empty, not a checkpoint")
    problem = manifest_problem(path)
    if problem is not None:
        raise ConfigError(f"--resume: {path} is not a complete checkpoint: {problem}")
    return path


# ----- after a resume, and after each save ------------------------------------------------------------
def _set_aside(path: Path) -> Path:
    """Move ``path`` into ``discarded/`` beside it, under a name not taken yet; never delete it."""
    target_dir = path.parent / DISCARDED
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / path.name, 1
    while target.exists():
        target, n = target_dir / f"{path.name}-{n}", n + 1
    os.replace(path, target)
    return target


def set_aside_later_checkpoints(out_dir: str | Path, step: int) -> list[str]:
    """Move this run's checkpoints past ``step`` (the one resumed from) into ``checkpoints/discarded/``:
    they belong to a history this run no longer continues (or failed their check), and --resume auto or
    --keep_checkpoints must not take them for this run's newest. Returns their names."""
    root = checkpoint_root(out_dir)
    later = [p for p in step_dirs(root) if step_of(p) > step]
    for path in later:
        _set_aside(path)
    if later:
        _point_latest_at_newest(root)
    return [p.name for p in later]


def _point_latest_at_newest(root: Path) -> None:
    remaining = step_dirs(root)
    if remaining:
        (root / "latest.tmp").write_text(remaining[-1].name)
        os.replace(root / "latest.tmp", root / "latest")
    else:
        (root / "latest").unlink(missing_ok=True)


def prune_checkpoints(out_dir: str | Path, keep: int) -> list[str]:
    """Delete this run's oldest ``step_<N>`` folders beyond the newest ``keep`` (``--keep_checkpoints``).
    Only ``step_<N>`` folders directly in ``<out_dir>/checkpoints`` are candidates: never a ``.partial``,
    ``discarded/`` or anything outside this run's folder; the newest is always kept. Returns their names."""
    doomed = step_dirs(checkpoint_root(out_dir))[:-max(keep, 1)]
    for path in doomed:
        shutil.rmtree(path)
    return [p.name for p in doomed]


# ----- saving -----------------------------------------------------------------------------------------
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
    """Every rank writes its part into a staging directory that rank 0 lists in a manifest and publishes
    when all are done."""
    final = checkpoint_root(out_dir) / f"step_{step}"
    staging = final.with_name(final.name + ".partial")
    if backend.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # an earlier save of this step that never finished
        staging.mkdir(parents=True)
    barrier()
    backend.save(staging, client_state)
    barrier()
    if backend.rank == 0:
        write_manifest(staging, step)
        if final.exists():
            _set_aside(final)
        os.replace(staging, final)
        (final.parent / "latest.tmp").write_text(final.name)
        os.replace(final.parent / "latest.tmp", final.parent / "latest")
    barrier()
    return final
