"""Starting 2-process CPU runs from tests: torchrun or `accelerate launch`, gloo, one thread each.

A failed launch on CPU is often silent (one process, or two that never talk), so every helper
returns the completed process and tests assert the world size the run itself reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blockllm_scale.parallel import free_port

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for CPU workers: the repo importable, one thread per process (2 cores, 2 ranks)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def run(command: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=cpu_env(**env))


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone``: it picks a free rendezvous port itself."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]
    return run(command, timeout=timeout, **env)


def accelerate_launch(config_file: str | Path, script: str | Path, *args: str, timeout: int = 300,
                      **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
               "--main_process_port", str(free_port()), script, *args]
    return run(command, timeout=timeout, **env)


def metrics(out_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def failure_report(result: subprocess.CompletedProcess, lines: int = 30) -> str:
    """For assertion messages: the workers' error lines (the launcher's own traceback hides them)
    and the tail of the output."""
    text = ((result.stdout or "") + (result.stderr or "")).splitlines()
    errors = [line for line in text if "Error" in line and "elastic" not in line][:10]
    return "\n".join(["errors:", *errors, "tail:", *text[-lines:]])


def deepspeed_launch(script: str | Path, *args: str, nproc: int = 2, timeout: int = 300,
                     **env: str) -> subprocess.CompletedProcess:
    """The ``deepspeed`` launcher (``--no_local_rank``: the script reads LOCAL_RANK from the environment).

    Unlike torchrun, it prints no traceback of its own when a worker exits with an error.
    """
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--no_local_rank",
               "--master_port", str(free_port()), script, *args]
    return run(command, timeout=timeout, **env)


def rank_results(out_dir: str | Path, prefix: str, world_size: int) -> list[dict]:
    """The JSON each rank of a driver wrote to ``<out_dir>/<prefix>rank<r>.json``."""
    return [json.loads((Path(out_dir) / f"{prefix}rank{r}.json").read_text()) for r in range(world_size)]


def unlisted_files(checkpoint: str | Path) -> set[str]:
    """Files a backend wrote into a checkpoint that its manifest.json does not list (should be none)."""
    checkpoint = Path(checkpoint)
    listed = set(json.loads((checkpoint / "manifest.json").read_text())["files"])
    written = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    return written - listed - {"manifest.json"}
