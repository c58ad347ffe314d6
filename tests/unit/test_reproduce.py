"""The paper reproduction (benchmarks/reproduce/) on CPU: ratios come out right from given numbers, the
dry-run plan trains every run and writes every JSON/MD/PNG, a second call reruns nothing, and a
time-budgeted launcher run stops with a checkpoint that --resume auto finishes exactly."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[2]
from blockllm_scale.benchmarks.reproduce import report, run  # noqa: E402

STEMS = ("table3_memory", "table3_ppl", "figure4", "ablations")


def fake_run(root: Path, kind: str, size: str, method: str, records: list[dict], target: int) -> dict:
    """A run directory as run.py leaves it, with the given metrics."""
    run_dir = root / kind / f"{size}-{method}"
    run_dir.mkdir(parents=True)
    spec = {"name": run_dir.name, "kind": kind, "size": size, "method": method, "target_steps": target,
            "label": method, "status": "complete", "flags": [], "command": "python launch/pretrain.py ..."}
    (run_dir / "run.json").write_text(json.dumps(spec))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return report.summarize_run(run_dir)


def steps(n: int, tokens_per_step: int = 100, **fields) -> list[dict]:
    return [{"step": s, "loss": 5.0, "tokens": s * tokens_per_step, "tokens_per_s": 1000.0, **fields}
            for s in range(1, n + 1)]


def test_memory_ratios_are_blockllm_over_galore_from_the_peaks(tmp_path):
    peaks = {"blockllm": 28.27, "galore": 32.26, "adamw": 40.0}
    runs = [fake_run(tmp_path, "memory", "60m", m, steps(3, peak_allocated_gib=p - 1, peak_reserved_gib=p + 1)
                     + [{**steps(4)[-1], "peak_allocated_gib": p, "peak_reserved_gib": p + 2}], 4)
            for m, p in peaks.items()]
    row = report.memory_table(runs)["60m"]
    assert row["blockllm"]["peak_allocated_gib"] == 28.27  # the run's maximum, not its last record
    assert row["ratios"]["blockllm_over_galore_allocated"] == pytest.approx(28.27 / 32.26)
    assert row["ratios"]["blockllm_over_galore_reserved"] == pytest.approx(30.27 / 34.26)
    assert row["ratios"]["galore_over_adamw_allocated"] == pytest.approx(32.26 / 40.0)
    assert [round(report.paper_ratios()[s]["memory_gb"], 2) for s in ("60m", "130m", "350m")] == [0.88, 0.87, 0.87]
    assert [round(report.paper_ratios()[s]["perplexity"], 2) for s in ("60m", "130m", "350m")] == [0.98, 1.0, 1.0]


def test_quality_is_compared_at_the_last_step_every_run_reached(tmp_path):
    def with_evals(n, losses):
        records = steps(n)
        for record, loss in zip(records[9::10], losses):
            record["eval_loss"] = loss
        return records

    blockllm = fake_run(tmp_path, "train", "60m", "blockllm", with_evals(30, [6.0, 5.0, 4.0]), 30)
    galore = fake_run(tmp_path, "train", "60m", "galore", with_evals(25, [6.5, 5.5]), 30)  # stopped by the budget
    table = report.quality_table([blockllm, galore], reference="galore")
    assert (table["compared_at_step"], table["compared_at_tokens"]) == (20, 2000)
    assert table["rows"]["blockllm"]["eval_loss"] == 5.0 and not table["rows"]["galore"]["complete"]
    assert table["blockllm_over_galore_perplexity"] == pytest.approx(math.exp(5.0) / math.exp(5.5))
    assert table["eval_loss_delta_to_galore"]["blockllm"] == pytest.approx(-0.5)


def test_resumed_steps_are_read_once_and_the_defaults_verdict_compares_at_equal_tokens(tmp_path):
    records = steps(3) + [{**steps(3)[1], "loss": 9.0}]  # step 2 logged again after a resume
    fake_run(tmp_path, "train", "60m", "x", records, 3)
    assert [r["loss"] for r in report.read_metrics(tmp_path / "train" / "60m-x")] == [5.0, 9.0, 5.0]
    table = {"compared_at_tokens": 10, "rows": {"blockllm": {"eval_loss": 4.00, "mean_selected_fraction": 0.6},
                                                "blockllm-defaults": {"eval_loss": 3.90, "mean_selected_fraction": 0.5}}}
    verdict = report.defaults_verdict(table)
    assert "3.9000 vs 4.0000 (-0.1000) at 10 tokens" in verdict and "0.500 vs 0.600" in verdict
    del table["rows"]["blockllm-defaults"]
    assert "not measured" in report.defaults_verdict(table)


@pytest.fixture
def tiny_corpus(tmp_path):
    """Pre-tokenized arrays in the shipped tokenizer's id range, as build_corpus.py lays them out."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    np.save(corpus / "train.npy", rng.integers(0, 8192, 40_000).astype(np.uint16))
    np.save(corpus / "eval.npy", rng.integers(0, 8192, 4_000).astype(np.uint16))
    manifest = {"name": "test-corpus", "tokenizer": {"vocab_size": 8192}, "package_versions": {},
                "train": {"tokens": 40_000, "sha256": "-", "by_source": {"x": {"tokens": 40_000}}},
                "eval": {"tokens": 4_000, "documents": 1, "sha256": "-"}}
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    return corpus


def test_cpu_dry_run_writes_every_report_and_reruns_nothing(tmp_path, tiny_corpus, capsys):
    args = ["--plan", "cpu", "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results"),
            "--corpus_dir", str(tiny_corpus), "--tokenizer", "shipped"]
    summary = run.main(["all", *args])
    for stem in STEMS:
        for suffix in ("json", "md", "png"):
            assert (tmp_path / "results" / f"reproduce_{stem}.{suffix}").stat().st_size > 0, (stem, suffix)
    memory = json.loads((tmp_path / "results" / "reproduce_table3_memory.json").read_text())
    peaks = {r["method"]: report.peak_gib(r) for r in memory["runs"]}
    ratios = memory["memory"]["tiny"]["ratios"]
    assert ratios["blockllm_over_galore_allocated"] == pytest.approx(peaks["blockllm"] / peaks["galore"])
    figure4 = json.loads((tmp_path / "results" / "reproduce_figure4.json").read_text())
    assert figure4["quality"]["compared_at_step"] == run.PLANS["cpu"].steps
    assert set(figure4["quality"]["rows"]) == set(run.FIGURE4)
    assert figure4["corpus"]["train_tokens"] == 40_000 and "test-corpus" in figure4["corpus"]["description"]
    assert figure4["invocation"]["command"].startswith("python benchmarks/reproduce/run.py all --plan cpu")
    ablations = (tmp_path / "results" / "reproduce_ablations.md").read_text()
    assert "Defaults vs the paper's rule: eval loss" in ablations and "40,000 train tokens" in ablations
    assert any(line.startswith("memory tiny: BlockLLM/GaLore") for line in summary)

    capsys.readouterr()
    run.main(["figure4", *args])  # everything is complete: nothing trains again
    assert capsys.readouterr().out.count("already complete") == len(run.FIGURE4)


def test_time_budget_stops_with_a_checkpoint_that_resume_finishes(tmp_path, tiny_corpus):
    from blockllm_scale.launcher import train as pretrain

    common = ["--model", "tiny", "--device", "cpu", "--steps", "4", "--batch_size", "2", "--seq_len", "32",
              "--eval_every", "0", "--sparsity", "0.5", "--patience", "1", "--embeddings", "candidate",
              "--dataset", str(tiny_corpus / "train.npy"), "--eval_dataset", str(tiny_corpus / "eval.npy")]
    whole, split = tmp_path / "whole", tmp_path / "split"
    pretrain.main([*common, "--out_dir", str(whole)])
    pretrain.main([*common, "--out_dir", str(split), "--time_budget", "1e-9"])  # spent after the first step
    assert (split / "checkpoints" / "latest").read_text() == "step_1"
    pretrain.main([*common, "--out_dir", str(split), "--resume", "auto"])
    losses = lambda d: [r["loss"] for r in report.read_metrics(d)]  # noqa: E731
    assert losses(split) == losses(whole) and len(losses(whole)) == 4
