"""benchmarks/trainer_1b.py on CPU with the tiny model (the GPU question it answers is LLaMA-1B, ZeRO-2 and
FSDP2): the runs complete on 2 processes and the JSON + markdown + PNG carry what the report needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_writes_the_report(tmp_path):
    stem = tmp_path / "dry"
    # One backend keeps it short: the FSDP2 path (both backends run in tests/dist/test_hf_trainer_dist.py).
    command = [sys.executable, "benchmarks/trainer_1b.py", "--model", "tiny", "--steps", "3", "--seq_len", "32",
               "--batch", "2", "--nproc", "2", "--warmup_steps", "1", "--eval_rows", "4", "--backends", "fsdp2",
               "--stem", str(stem)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=REPO,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["backend"], r["optimizer"]) for r in data["runs"]] == [("fsdp2", "adamw"), ("fsdp2", "blockllm")]
    for row in data["runs"]:
        assert "error" not in row, (row, Path(row.get("log", "/dev/null")).read_text()[-4000:])
        assert row["world_size"] == 2 and row["tokens_per_s"] > 0 and row["peak_gib_train"] > 0
        assert 0 < row["eval_loss"] < 20
    assert data["runs"][1]["reselections"] >= 1
    env = data["environment"]
    assert env["versions"]["deepspeed"] and env["git_commit"] and "trainer_1b.py" in env["command"]
    assert len(data["corpus"]["sha256"]) == 64
    assert "| fsdp2 | blockllm | 2 |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 0


def test_a_failed_launch_is_reported_by_the_ranks_own_exception():
    from blockllm_scale.benchmarks.trainer_1b import failure

    log = ("[rank1]: Traceback (most recent call last):\n[rank1]: RuntimeError: The server socket has failed to listen\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert failure(log) == "[rank1]: RuntimeError: The server socket has failed to listen"
    assert failure("ValueError: bad --model\n") == "ValueError: bad --model"
    assert failure("killed\n") == "no result"
