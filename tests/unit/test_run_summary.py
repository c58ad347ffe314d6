"""The end of a run: a checkpoint (so --resume auto continues it or says it is complete), at most
--keep_checkpoints of them, and a summary on the console with the command that resumes it."""

from __future__ import annotations

import shlex
from pathlib import Path

from launcher_runs import REPO, TINY, metrics, run_main


def test_a_default_run_ends_with_a_checkpoint_and_a_summary_and_resume_auto_says_it_is_complete(tmp_path, capsys):
    code, out, err = run_main(capsys, *TINY, "--steps", "4", "--eval_every", "2", "--out_dir", str(tmp_path))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_4"]
    records = metrics(tmp_path)
    summary = out[out.index("[pretrain] steps 1-4"):]
    assert f"{records[-1]['tokens']:,} tokens" in summary and "tokens/s" in summary
    assert f"train loss {records[-1]['loss']:.4f}" in summary
    assert f"eval loss {records[-1]['eval_loss']:.4f}, perplexity {records[-1]['eval_perplexity']:.2f}" in summary
    assert "peak memory" in summary and "reselection(s)" in summary and "of the parameters trained per step" in summary
    assert f"metrics: {tmp_path / 'metrics.jsonl'}" in summary and f"checkpoints: {tmp_path / 'checkpoints'}" in summary
    assert "the run is complete (step 4 of --steps 4)" in summary
    code, out, _ = run_main(capsys, *TINY, "--steps", "4", "--eval_every", "2", "--out_dir", str(tmp_path),
                            "--resume", "auto")
    assert code == 0 and "the run is complete" in out and len(metrics(tmp_path)) == 4


def test_a_stopped_run_prints_the_command_that_resumes_it(tmp_path, capsys):
    flags = [*TINY, "--steps", "5", "--eval_every", "0", "--save_every", "1", "--keep_checkpoints", "2",
             "--out_dir", str(tmp_path)]
    code, out, _ = run_main(capsys, *flags, "--stop_at_step", "3")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2", "step_3"]
    command = shlex.split(out.split("[pretrain] resume: ")[1].splitlines()[0])
    assert command[0] == "python" and Path(command[1]).resolve() == REPO / "launch" / "pretrain.py"
    assert command[-2:] == ["--resume", "auto"]
    code, out, _ = run_main(capsys, *command[2:])
    assert code == 0 and "resuming" in out and "the run is complete (step 5 of --steps 5)" in out
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_4", "step_5"]


def test_the_readme_main_job_shows_block_coordinate_descent(tmp_path, capsys):
    """The README's main job, as printed: its summary shows reselections and about (1 - s) of the parameters
    trained per step, what the project is about."""
    readme = (REPO / "README.md").read_text().splitlines()
    main_job = shlex.split(readme[readme.index("<!-- install-command -->") + 1].split("&&")[1])
    assert main_job[:2] == ["python", "launch/pretrain.py"]
    flags = main_job[2:]
    code, out, _ = run_main(capsys, *flags, "--out_dir", str(tmp_path), "--eval_every", "0")
    assert code == 0
    records = metrics(tmp_path)
    reselections = sum(r["reselected"] for r in records if r["step"] > 1)  # step 1's is the first choice
    fractions = [r["selected_fraction"] for r in records if not r["scoring_step"]]
    sparsity = float(flags[flags.index("--sparsity") + 1])
    assert reselections >= 2 and f"BlockLLM: {reselections} reselection(s)" in out
    assert 0.85 * (1 - sparsity) <= sum(fractions) / len(fractions) <= 1 - sparsity
