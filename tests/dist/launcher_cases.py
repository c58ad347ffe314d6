"""Run ``launch/pretrain.py``'s ``main`` on several argument lists in ONE process and record, per case,
its exit code and what it wrote to stderr (a traceback included, had anything escaped ``main``).

    python tests/dist/launcher_cases.py CASES.json RESULTS.json      # CASES: {"name": [argv...]}

Each launcher process pays ~10 s of imports on 2 cores; configuration mistakes are found before
anything is built, so one process can try them all.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
from blockllm_scale.launcher import train as pretrain  # noqa: E402


def run_case(argv: list[str]) -> dict:
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr):
        try:
            pretrain.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # what the command line would have shown as a traceback
            traceback.print_exc(file=stderr)
            code = 1
    return {"code": code, "stderr": stderr.getvalue()}


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps({name: run_case(argv) for name, argv in cases.items()}))
