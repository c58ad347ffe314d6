"""CI (.ci/run) runs the README's two marked commands as printed: the whole install line (its main job
included) and the test line; the README tells a CPU-only user how to get the pinned torch's CPU build."""

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
    assert commands == [readme_command("install-command"), readme_command("test-command")]
    assert "&& python launch/pretrain.py" in commands[0] and "-c constraints-cpu.txt" in commands[0]


def test_the_readme_says_how_to_get_the_pinned_torch_as_a_cpu_build():
    pins = dict(line.split("==") for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    expected = f"pip install torch=={pins['torch']} --index-url https://download.pytorch.org/whl/cpu"
    assert expected in (REPO / "README.md").read_text()
