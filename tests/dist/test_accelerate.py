"""`accelerate launch` with the shipped configs, 2 CPU processes, a few steps of the tiny model: the same
pretrain.py runs, the loss goes down, metrics are written, and the run really had 2 ranks (accelerate's
CPU failures are silent: one process, or plain DDP instead of FSDP)."""

from __future__ import annotations

import json

import yaml

from launch_utils import PRETRAIN, REPO, accelerate_launch, failure_report, metrics

BATCH, SEQ, STEPS = 2, 32, 6
FLAGS = ["--model", "tiny", "--steps", str(STEPS), "--batch_size", str(BATCH), "--seq_len", str(SEQ),
         "--eval_every", "0", "--lr", "3e-3", "--sparsity", "0.5", "--patience", "1", "--embeddings", "candidate"]


def launch(config: str, out_dir, *extra: str):
    result = accelerate_launch(REPO / "configs" / "accelerate" / config, PRETRAIN, *FLAGS, "--out_dir", str(out_dir), *extra)
    assert result.returncode == 0, failure_report(result)
    return result


def check_two_rank_run(result, out_dir, backend_line: str) -> list[dict]:
    assert backend_line in result.stdout and "world 2," in result.stdout, result.stdout
    records = metrics(out_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[0]["tokens"] == BATCH * SEQ * 2  # tokens of both ranks: 2 processes took part
    assert records[-1]["loss"] < records[0]["loss"]
    return records


def test_fsdp2_config(tmp_path):
    result = launch("fsdp2.yaml", tmp_path)
    records = check_two_rank_run(result, tmp_path, "backend AccelerateBackend")
    assert "delegate FSDP2Backend" in result.stdout
    assert any(r["reselected"] for r in records[1:])  # BlockLLM switched blocks under accelerate + FSDP2


def test_deepspeed_zero2_config(tmp_path):
    # Under DeepSpeed something must be trained from step 0 on (its engine needs parameters).
    # (--optimizer adamw takes the same path; one launch costs ~30-60 s here, so it is not repeated.)
    result = launch("deepspeed_zero2.yaml", tmp_path, "--embeddings", "always", "--sparsity", "0.05")
    check_two_rank_run(result, tmp_path, "backend AccelerateBackend")
    assert "delegate DeepSpeedBackend" in result.stdout
    written = json.loads((tmp_path / "accelerate_deepspeed_config.json").read_text())
    assert written["zero_optimization"]["stage"] == 2


def test_a_misspelt_key_inside_fsdp_config_stops_every_process_in_one_line(tmp_path):
    """accelerate passes on only the keys it knows, so the launcher reads the YAML off `accelerate launch`'s
    command line; without that the run trains with the misspelt setting's default."""
    config = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp2.yaml").read_text())
    config["fsdp_config"]["fsdp_reshard_after_foward"] = config["fsdp_config"].pop("fsdp_reshard_after_forward")
    path = tmp_path / "misspelt.yaml"
    path.write_text(yaml.safe_dump(config))
    result = accelerate_launch(path, PRETRAIN, *FLAGS, "--out_dir", str(tmp_path / "run"))
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("pretrain.py: error:")]
    # One line from each process that gets to print it: the first to exit makes torchrun's agent stop the other,
    # sometimes before its line is out (a race seen in the full suite), so one or two lines.
    assert result.returncode != 0 and 1 <= len(errors) <= 2, failure_report(result)
    assert all("fsdp_config.fsdp_reshard_after_foward (did you mean fsdp_reshard_after_forward?)" in e for e in errors)
    assert not (tmp_path / "run").exists()
