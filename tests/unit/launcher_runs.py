"""In-process runs of launch/pretrain.py's main for the tests (a fresh interpreter costs ~10 s of imports
on 2 cores): a tiny LLaMA whose runs take a second or two, and what they printed."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
from blockllm_scale.launcher import train as pretrain  # noqa: E402

# Patience 1 with half the parameters frozen: reselections within a few steps.
TINY = ["--model", "tiny", "--batch_size", "2", "--seq_len", "32", "--lr", "3e-3", "--sparsity", "0.5",
        "--patience", "1", "--embeddings", "candidate"]


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """pretrain.main in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        pretrain.main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(stderr: str) -> str:
    """The one ``error:`` line of a refused run (and no traceback)."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
