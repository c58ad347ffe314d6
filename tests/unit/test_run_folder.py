"""One run per --out_dir (blockllm_scale/run_dir.py and the launcher): a fresh run into a folder that holds
a run is refused in one line touching nothing; --overwrite moves the old run aside, deleting nothing."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_runs import REPO, TINY, metrics, one_error_line, run_main

from blockllm_scale.launcher.checkpoint import save_checkpoint
from blockllm_scale.config import ConfigError
from blockllm_scale.launcher.run_dir import claim_out_dir


class FileBackend:
    rank = 0

    def save(self, directory, client_state: dict) -> None:
        (Path(directory) / "model.pt").write_bytes(b"weights")


def save(out_dir: Path, step: int) -> Path:
    return save_checkpoint(FileBackend(), out_dir, step, {"step": step})


def run_folder_snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("holding", ["metrics", "checkpoints"])
def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_touching_nothing(tmp_path, holding):
    if holding == "metrics":
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    else:
        save(tmp_path, 5)
    before = run_folder_snapshot(tmp_path)
    with pytest.raises(ConfigError) as error:
        claim_out_dir(tmp_path, resume="", overwrite=False, rank=0)
    message = str(error.value)
    assert "\n" not in message and all(words in message for words in ("--resume auto", "--out_dir", "--overwrite"))
    assert run_folder_snapshot(tmp_path) == before
    assert claim_out_dir(tmp_path, resume="auto", overwrite=False, rank=0) is None  # continuing is fine


def test_an_empty_metrics_file_is_no_run_and_resume_with_overwrite_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert claim_out_dir(tmp_path, resume="", overwrite=False, rank=0) is None
    with pytest.raises(ConfigError, match="choose one"):
        claim_out_dir(tmp_path, resume="auto", overwrite=True, rank=0)


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (tmp_path / "metrics.discarded.jsonl").write_text('{"step": 2, "loss": 9.0}\n')
    save(tmp_path, 1)
    (tmp_path / "notes.txt").write_text("mine")
    old = run_folder_snapshot(tmp_path)
    assert claim_out_dir(tmp_path, resume="", overwrite=True, rank=1) is None  # only rank 0 moves
    moved = claim_out_dir(tmp_path, resume="", overwrite=True, rank=0)
    assert moved.parent == tmp_path and moved.name.startswith("replaced-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", moved.name]
    assert run_folder_snapshot(moved) == {k: v for k, v in old.items() if k != "notes.txt"}


def test_the_readme_main_command_run_again_is_refused_in_one_line(tmp_path):
    """The README's first command, its main job part, where runs/default holds a run (as after a first
    run): one line naming the ways on, and the old run untouched."""
    readme = (REPO / "README.md").read_text().splitlines()
    install_line = readme[readme.index("<!-- install-command -->") + 1]
    main_job = shlex.split(install_line.split("&&")[1])
    assert main_job[:2] == ["python", "launch/pretrain.py"]
    old_run = tmp_path / "runs" / "default"
    old_run.mkdir(parents=True)
    (old_run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    result = subprocess.run([sys.executable, str(REPO / main_job[1]), *main_job[2:]], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "runs/default already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert sorted(p.name for p in old_run.iterdir()) == ["metrics.jsonl"]
    assert (old_run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'


def test_overwrite_starts_over_with_the_old_run_moved_aside(tmp_path, capsys):
    assert run_main(capsys, *TINY, "--steps", "3", "--eval_every", "0", "--out_dir", str(tmp_path))[0] == 0
    code, out, _ = run_main(capsys, *TINY, "--steps", "2", "--eval_every", "0", "--out_dir", str(tmp_path),
                            "--overwrite")
    assert code == 0
    moved = next(tmp_path.glob("replaced-*"))
    assert f"is now in {moved}" in out
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2] and [r["step"] for r in metrics(moved)] == [1, 2, 3]
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["latest", "step_3"]
