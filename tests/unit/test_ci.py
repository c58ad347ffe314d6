"""CI (.ci/run) runs the README's marked commands as printed: the CPU build of PyTorch at the pinned
version, the whole install line (its main job included), the test line."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_command(marker: str) -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    return lines[lines.index(f"<!-- {marker} -->") + 1]


def test_ci_runs_the_readme_commands_whole_main_job_included():
    result = subprocess.run(["bash", str(REPO / ".ci" / "run"), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    assert commands == [readme_command("cpu-torch-command"), readme_command("install-command"),
                        readme_command("test-command")]
    assert commands[1].endswith("&& python launch/pretrain.py") and "-c constraints-cpu.txt" in commands[1]


def test_the_cpu_torch_line_installs_the_pinned_torch_from_the_cpu_index():
    pins = dict(line.split("==") for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert readme_command("cpu-torch-command") == (f"pip install torch=={pins['torch']} "
                                                   "--index-url https://download.pytorch.org/whl/cpu")
