"""The launcher end to end in fresh processes: an interrupted-and-resumed run equals the uninterrupted
one exactly, and configuration mistakes are one line with no traceback."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
from blockllm_scale.launcher import train as pretrain  # noqa: E402
# Small enough for 2 CPU cores; patience 2 with half the parameters frozen forces reselections.
COMMON = ["--model", "tiny", "--steps", "12", "--batch_size", "4", "--seq_len", "64", "--eval_every", "0",
          "--sparsity", "0.5", "--patience", "2", "--embeddings", "candidate", "--lr", "3e-3"]


def run_pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_pretrain(*COMMON, "--out_dir", str(whole)).returncode == 0
    first = run_pretrain(*COMMON, "--out_dir", str(split), "--stop_at_step", "5")
    assert first.returncode == 0, first.stderr
    assert (split / "checkpoints" / "latest").read_text() == "step_5"
    # A run killed after its checkpoint has written records past it, the last one cut short.
    killed_run_lines = [json.dumps(r) + "\n" for r in metrics(whole)[5:7]] + ['{"step": 8, "lo']
    with (split / "metrics.jsonl").open("a") as f:
        f.writelines(killed_run_lines)
    second = run_pretrain(*COMMON, "--out_dir", str(split), "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "set aside 3 record(s) past step 5" in second.stdout

    uninterrupted, resumed = metrics(whole), metrics(split)
    assert [r["step"] for r in resumed] == list(range(1, 13))  # one clean history
    assert (split / "metrics.discarded.jsonl").read_text() == "".join(killed_run_lines) + "\n"
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
    # The resumed stretch really crossed a block switch, or this test would prove little.
    assert any(r["reselected"] for r in uninterrupted[5:])
    # Each record says how deep its step's backward went: the tiny LLaMA has 2 layers (-1: the embeddings).
    assert {r["lowest_trained_layer"] for r in uninterrupted} <= {-1, 0, 1, None}
    assert [r["lowest_trained_layer"] for r in resumed] == [r["lowest_trained_layer"] for r in uninterrupted]


@pytest.mark.parametrize("flags, names", [
    (["--sparsity", "1.0"], "sparsity"),
    (["--patience", "0"], "patience"),
    (["--model", "13b"], "--model"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--resume", "/nonexistent/ckpt"], "--resume"),
    (["--granularity", "row"], "granularity"),
    (["--step_in_backward", "--grad_accum", "2"], "--grad_accum 1"),
    (["--device", "cpu", "--memory_snapshot", "snap.pickle"], "--memory_snapshot"),
])
def test_configuration_mistakes_are_one_line(flags, names, tmp_path, capsys):
    # In-process: main() is what the command line runs, and a fresh interpreter per case costs ~10 s.
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--out_dir", str(tmp_path), "--steps", "2", *flags])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and names in error_lines[0], stderr


@pytest.fixture(scope="module")
def help_run():
    return run_pretrain("--help")


def test_help_shows_every_flags_default(help_run):
    assert help_run.returncode == 0
    # One block per flag: from its "  --name" line to the next.
    blocks = re.split(r"\n  (?=--)", "\n" + help_run.stdout.split("\ntrain:\n", 1)[1])[1:]
    flags = [f.name for section, (cls, skipped) in pretrain.CONFIG_SECTIONS.items()
             for f in pretrain.dataclasses.fields(cls) if f.name not in skipped]
    assert [b.split()[0].split(",")[0] for b in blocks] == [f"--{name}" for name in flags]
    assert all(" ".join(b.split()).count("(default: ") == 1 for b in blocks), blocks
    text = " ".join(help_run.stdout.split())
    assert "--keep_checkpoints KEEP_CHECKPOINTS" in text and "(default: runs/default)" in text


def test_the_launcher_starts_without_the_import_warnings(help_run):
    """torchao's failed optional kernels and torch's Enum notice, logged at import: filtered by the launcher."""
    assert "Failed to load" not in help_run.stderr and "register_constant" not in help_run.stderr, help_run.stderr


def test_backward_depth_is_the_lowest_layer_that_takes_a_gradient():
    """What each metrics record's lowest_trained_layer says for optimizers other than BlockLLM: the lowest
    layer whose parameters require a gradient now (BAdam's active layer), -1 when an input embedding does."""
    import torch

    from blockllm_scale import BlockLLM
    from blockllm_scale.launcher.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    assert pretrain.backward_depth(model, None) == -1  # a whole-model optimizer
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.layers.1."))
    assert pretrain.backward_depth(model, None) == 1  # one layer active, as BAdam trains
    for param in model.parameters():
        param.requires_grad_(True)
    blockllm = BlockLLM(model.named_parameters(), sparsity=0.5, embeddings="never", granularity="layer")
    # BlockLLM's step 0 scores with every candidate trainable; the depth it reports is its trained set's.
    assert pretrain.backward_depth(model, blockllm) == blockllm.lowest_trained_layer
