"""Checkpoints known to be complete (blockllm_scale/launcher/checkpoint.py), on a stand-in backend that writes files
the way the real ones do (a nested folder included, as DeepSpeed's tag folder and FSDP2's dcp/ are): no
model, no process group, milliseconds each; and one launcher run that meets a truncated checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launcher_runs import TINY, metrics, run_main

from blockllm_scale.launcher.checkpoint import (manifest_problem, prune_checkpoints, resolve_resume, save_checkpoint,
                                       set_aside_later_checkpoints, step_dirs)
from blockllm_scale.config import ConfigError


class FileBackend:
    """Writes what a backend would: a top-level file, a nested folder, per-step contents."""

    rank = 0

    def save(self, directory, client_state: dict) -> None:
        directory = Path(directory)
        (directory / "model.pt").write_bytes(b"weights" * 100 + str(client_state["step"]).encode())
        (directory / "deepspeed").mkdir()
        (directory / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"moments" * 50)


def save(out_dir: Path, step: int) -> Path:
    return save_checkpoint(FileBackend(), out_dir, step, {"step": step})


def test_a_save_lists_every_file_it_wrote_in_its_manifest(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_7" and not (tmp_path / "checkpoints" / "step_7.partial").exists()
    files = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(files) == on_disk == {"model.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert files["model.pt"]["bytes"] == (path / "model.pt").stat().st_size
    assert manifest_problem(path) is None


@pytest.mark.parametrize("damage, names", [
    (lambda p: (p / "model.pt").write_bytes(b"weights"), "model.pt has 7 bytes"),  # truncated
    (lambda p: (p / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(), "missing"),
    (lambda p: (p / "model.pt").write_bytes(b"x" * (p / "model.pt").stat().st_size), "sha256"),  # same size
    (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
])
def test_auto_falls_back_to_the_newest_intact_checkpoint_with_one_warning(tmp_path, damage, names):
    save(tmp_path, 5)
    damage(save(tmp_path, 10))
    checkpoint, warning = resolve_resume("auto", tmp_path)
    assert checkpoint == tmp_path / "checkpoints" / "step_5"
    assert "step_10" in warning and names in warning and "step_5" in warning and "\n" not in warning


def test_auto_without_any_intact_checkpoint_is_one_line_and_without_any_starts_fresh(tmp_path):
    assert resolve_resume("auto", tmp_path) == (None, None)
    (save(tmp_path, 3) / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no intact checkpoint.*step_3.*--overwrite") as error:
        resolve_resume("auto", tmp_path)
    assert "\n" not in str(error.value)


def test_explicit_paths_that_are_no_complete_checkpoint_are_one_line_each(tmp_path):
    good = save(tmp_path / "run", 4)
    (good.parent / "step_9.partial").mkdir()
    (tmp_path / "empty").mkdir()
    truncated = save(tmp_path / "other", 2)
    (truncated / "model.pt").write_bytes(b"w")
    cases = {tmp_path / "nowhere": "no checkpoint directory", tmp_path / "empty": "is empty",
             good.parent: "is a checkpoints folder", tmp_path / "run": "is a run's folder",
             truncated: "model.pt has 1 bytes", good.parent / "step_9.partial": "is empty"}
    for path, names in cases.items():
        with pytest.raises(ConfigError, match=names) as error:
            resolve_resume(str(path), tmp_path)
        assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert resolve_resume(str(good), tmp_path) == (good, None)


def test_keep_checkpoints_deletes_only_this_runs_oldest_step_folders(tmp_path):
    run, neighbour = tmp_path / "run", tmp_path / "neighbour"
    for step in (1, 2, 3, 4):
        save(run, step)
        save(neighbour, step)
    (run / "checkpoints" / "step_0.partial").mkdir()
    (run / "checkpoints" / "notes").mkdir()
    assert prune_checkpoints(run, keep=2) == ["step_1", "step_2"]
    assert [p.name for p in step_dirs(run / "checkpoints")] == ["step_3", "step_4"]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step_3", "step_4", "step_0.partial", "notes", "latest"}
    assert [p.name for p in step_dirs(neighbour / "checkpoints")] == ["step_1", "step_2", "step_3", "step_4"]
    assert prune_checkpoints(run, keep=1) == ["step_3"]
    assert prune_checkpoints(run, keep=0) == []  # the newest is never deleted


def test_checkpoints_past_the_resume_step_are_set_aside_not_deleted(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert set_aside_later_checkpoints(tmp_path, 2) == ["step_4", "step_6"]
    root = tmp_path / "checkpoints"
    assert [p.name for p in step_dirs(root)] == ["step_2"] and (root / "latest").read_text() == "step_2"
    assert manifest_problem(root / "discarded" / "step_6") is None  # moved whole
    save(tmp_path, 4)  # the resumed run reaches step 4 again; a second set-aside keeps both old ones
    assert set_aside_later_checkpoints(tmp_path, 2) == ["step_4"]
    assert sorted(p.name for p in (root / "discarded").iterdir()) == ["step_4", "step_4-1", "step_6"]


def test_a_truncated_newest_checkpoint_is_skipped_with_one_warning(tmp_path, capsys):
    flags = [*TINY, "--steps", "3", "--eval_every", "0", "--out_dir", str(tmp_path)]
    assert run_main(capsys, *flags, "--save_every", "1", "--stop_at_step", "2")[0] == 0
    with (tmp_path / "checkpoints" / "step_2" / "optimizer.pt").open("r+b") as f:
        f.truncate(100)
    code, out, err = run_main(capsys, *flags, "--resume", "auto")
    assert code == 0 and "Traceback" not in err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step_2 (optimizer.pt has 100 bytes" in warnings[0] and "from step_1" in warnings[0]
    assert "resuming" in out and [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
