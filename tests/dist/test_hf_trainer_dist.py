"""BlockLLMTrainer on 2 CPU processes (gloo): ZeRO-1, ZeRO-2 and ZeRO-3 through TrainingArguments(deepspeed=...)
(ZeRO-3 with gradient checkpointing), FSDP2 through `accelerate launch --config_file
configs/accelerate/fsdp2.yaml`. One launch per backend runs hf_trainer_driver.py: the Trainer's AdamW,
BlockLLM for 10 steps with a checkpoint at step 5 (right after a block switch), and the run resumed from it.

Each run must show: two ranks, block switches, a falling loss, per-rank Adam state = selected elements x 2 /
world size (the Trainer's AdamW: all elements x 2 / world size under ZeRO; on CPUs accelerate runs the plain
Trainer's FSDP config as DDP, all elements x 2), no gradient on a frozen weight, BlockLLM's fields in the
Trainer's logs, and resumed losses equal to the uninterrupted run's, bit for bit (fp32).
"""

from __future__ import annotations

import pytest

from launch_utils import REPO, accelerate_launch, failure_report, rank_results, torchrun

WORLD = 2
DRIVER = REPO / "tests" / "dist" / "hf_trainer_driver.py"
SAVE, STEPS, ACCUM = 5, 10, 2


def launch(backend: str, out):
    if backend == "fsdp2":
        # The shipped config as is, but fp32 (bit-exact resume); bf16 is the GPU setting.
        return accelerate_launch(REPO / "configs" / "accelerate" / "fsdp2.yaml", "--mixed_precision", "no", DRIVER,
                                 str(out), backend, timeout=300)
    return torchrun(DRIVER, str(out), backend, nproc=WORLD, timeout=300, DS_ACCELERATOR="cpu")


@pytest.fixture(scope="module", params=["zero1", "zero2", "zero3", "fsdp2"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    result = launch(request.param, out)
    assert result.returncode == 0, failure_report(result)
    ranks = rank_results(out, f"{request.param}_", WORLD)
    assert all(r["world_size"] == WORLD for r in ranks)  # a silent 1-process launch fails here
    return ranks


def test_block_switches_and_the_loss_falls(ranks):
    for rank in ranks:
        steps = rank["whole"]["steps"]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        assert steps[-1]["reselections"] >= 3  # the first choice and >= 2 switches
        losses = rank["whole"]["losses"]
        assert sum(losses[-2 * ACCUM:]) < sum(losses[:2 * ACCUM])
        assert not any(s["frozen_with_grad"] for s in steps)


def test_adam_state_per_rank_covers_the_selected_blocks_divided_by_the_ranks(ranks):
    for rank in ranks:
        steps = rank["whole"]["steps"]
        # after a step that changed nothing, every selected block has stepped once: all its state exists
        settled = [s for prev, s in zip(steps, steps[1:]) if s["reselections"] == prev["reselections"]]
        assert settled
        for s in settled:
            assert s["state_numel"] == 2 * s["selected_numel"] // WORLD, s
        adamw = rank["adamw"]["steps"][-1]["state_numel"]
        total = settled[0]["total_numel"]
        assert settled[0]["selected_numel"] <= total / 2
        sharded = rank["backend"] != "fsdp2"  # accelerate runs the plain Trainer's FSDP config as DDP on CPUs
        assert adamw == (2 * total // WORLD if sharded else 2 * total)


def test_the_trainer_logs_reselections_and_the_trained_fraction(ranks):
    logged = [log for log in ranks[0]["whole"]["logs"] if "loss" in log]
    assert len(logged) == STEPS
    assert logged[-1]["blockllm/reselections"] == ranks[0]["whole"]["steps"][-1]["reselections"]
    assert all(0 < log["blockllm/trained_fraction"] <= 0.5 for log in logged[1:])  # step 1 only scores


def test_resume_from_a_checkpoint_taken_after_a_switch_continues_exactly(ranks):
    for rank in ranks:
        whole, resumed = rank["whole"], rank["resumed"]
        at_save = whole["steps"][SAVE - 1]
        assert at_save["reselections"] > whole["steps"][SAVE - 2]["reselections"]  # switched at the saved step
        assert resumed["losses"] == whole["losses"][SAVE * ACCUM:]
        assert resumed["steps"] == whole["steps"][SAVE:]
