"""Where a benchmark ran: device, library versions, git commit and the exact command.

Nothing here initialises CUDA: a context in the parent process would take GPU memory from the
configurations it launches. The GPU's name comes from nvidia-smi.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
from .grid import REPO

PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "bitsandbytes", "galore-torch", "torchao", "badam",
            "datasets", "tokenizers", "numpy")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def git_commit() -> str:
    """GIT_COMMIT when set (the GPU machine gets a copy of the working tree whose .git may be a stale one),
    else HEAD (with "+dirty" for local changes)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        head = None
    if head is None or head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def describe(argv: list[str], device: str) -> dict:
    names = [] if device == "cpu" else gpu_names()
    if names:
        where = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else "; ".join(names)
        measured = "torch.cuda.max_memory_allocated / max_memory_reserved of the training process"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        measured = "peak RSS of the training process (not comparable with the prediction)"
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *argv]), "device": where, "gpu": bool(names), "gpu_count": len(names),
            "measured": measured, "host": platform.node(), "versions": versions(), "git_commit": git_commit()}
