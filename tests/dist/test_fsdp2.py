"""FSDP2 (fully_shard) with BlockLLM on 2 CPU processes (gloo), all configurations in one launch of
fsdp2_driver.py: equal to one process, gradients and Adam state only on the selected block's shards,
bf16 block switches, exact resume from a torch.distributed.checkpoint, 8-bit torchao states, AdamW."""

from __future__ import annotations

import json
import math

import pytest

from launch_utils import REPO, failure_report, metrics, torchrun, unlisted_files

from blockllm_scale.launcher.checkpoint import manifest_problem, step_dirs

WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    result = torchrun(REPO / "tests" / "dist" / "fsdp2_driver.py", str(out), nproc=WORLD, timeout=400)
    assert result.returncode == 0, failure_report(result)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["world_size"] == WORLD for r in ranks)  # a silent 1-process launch fails here
    return out, ranks


def test_two_processes_equal_one_process(runs):
    out, ranks = runs
    plain, fsdp = ranks[0]["plain"]["losses"], ranks[0]["fp32"]["losses"]
    assert len(plain) == len(fsdp) == 10
    # Relative 1e-6: the losses (~9) are float32, whose spacing there is 9.5e-7; only the order
    # of the gradient reduction differs.
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=0) for a, b in zip(plain, fsdp)), (plain, fsdp)
    single, sharded = metrics(out / "plain"), metrics(out / "fp32")
    assert [r["selected_fraction"] for r in single] == [r["selected_fraction"] for r in sharded]
    assert [r["reselected"] for r in single] == [r["reselected"] for r in sharded]
    assert sum(r["reselected"] for r in sharded[1:]) >= 2  # two block switches after the first choice
    assert ranks[1]["fp32"]["losses"] == fsdp  # every rank logs the same global loss


@pytest.mark.parametrize("rank", range(WORLD))
def test_only_the_selected_shards_have_gradients_and_state(runs, rank):
    steps = runs[1][rank]["fp32"]["steps"]
    assert all(s["grads_only_on_trained"] and s["grads_are_dtensors"] for s in steps)
    settled = [s for s in steps if s["reselections_before"] == s["reselections"] and s["trained_numel"]]
    assert settled
    for s in settled:  # exp_avg + exp_avg_sq of this rank's shard of the selected block only
        assert s["trained_local_numel"] * WORLD == s["trained_numel"]
        assert s["state_numel"] == 2 * s["trained_numel"] // WORLD


def test_bf16_mixed_precision_survives_block_switches(runs):
    # Random selection skips the all-trainable scoring step 0, so blocks frozen at FSDP2's lazy
    # init are trained later: without the guard in shard_model this fails with a grad dtype error.
    bf16 = runs[1][0]["bf16"]
    assert bf16["steps"][-1]["reselections"] >= 3 and all(math.isfinite(x) for x in bf16["losses"])
    assert all(s["grads_only_on_trained"] for s in bf16["steps"])
    # The same after a resume, whose first forward sees only the saved selection trainable.
    assert runs[1][0]["bf16_first_half"]["losses"] + runs[1][0]["bf16_resumed"]["losses"] == bf16["losses"]


def test_dcp_resume_equals_uninterrupted_run(runs):
    out, ranks = runs
    for results in ranks:
        assert results["first_half"]["losses"] + results["resumed"]["losses"] == results["fp32"]["losses"]
        # Saving changes nothing: torch's get_optimizer_state_dict steps an optimizer that has no state yet
        # (a block selected just before the save) with lr 0, which would shift Adam's bias correction.
        assert results["saved_every_step"]["losses"] == results["fp32"]["losses"]
    resumed = metrics(out / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert any(r["reselected"] for r in resumed[5:])  # the resumed stretch crossed a switch


def test_checkpoint_manifests_cover_the_sharded_files_and_three_are_kept(runs):
    out, _ = runs
    kept = step_dirs(out / "saved_every_step" / "checkpoints")  # --save_every 1 over 10 steps
    assert [p.name for p in kept] == ["step_8", "step_9", "step_10"]  # --keep_checkpoints' default
    for checkpoint in kept:
        assert any(p.suffix == ".distcp" for p in (checkpoint / "dcp").iterdir())
        assert unlisted_files(checkpoint) == set() and manifest_problem(checkpoint) is None


@pytest.mark.parametrize("rank", range(WORLD))
def test_torchao_8bit_states_on_dtensors(runs, rank):
    results = runs[1][rank]
    settled = [s for s in results["torchao_8bit"]["steps"] if s["state_numel"]]
    # Live DTensor-wrapped 8-bit state; torchao keeps fp32 state for tensors under 4096 elements (norms, which
    # the greedy pass takes to fill the budget), so those may sit beside it.
    assert settled and all("torch.uint8" in s["state_dtypes"] for s in settled)
    assert all(set(s["state_dtypes"]) <= {"torch.uint8", "torch.float32"} for s in settled)
    # The 8-bit state goes through torch.distributed.checkpoint and back exactly.
    assert results["torchao_first_half"]["losses"] + results["torchao_resumed"]["losses"] == \
        results["torchao_8bit"]["losses"]


def test_row_ranges_give_way_to_whole_sharded_tensors(runs):
    s09 = runs[1][0]["s09"]
    assert len(s09["losses"]) == 3 and all(math.isfinite(x) for x in s09["losses"])
    assert all(s["grads_only_on_trained"] and s["grads_are_dtensors"] for s in s09["steps"])


def test_adamw_under_fsdp2(runs):
    losses = runs[1][0]["adamw"]["losses"]
    assert losses[-1] < losses[0] and runs[1][1]["adamw"]["losses"] == losses


def test_a_time_budget_spent_on_one_rank_stops_every_rank_with_a_checkpoint(runs):
    out, ranks = runs
    for results in ranks:
        assert len(results["out_of_time"]["losses"]) == 1
        assert results["out_of_time"]["losses"] + results["out_of_time_resumed"]["losses"] == results["fp32"]["losses"]
    assert (out / "out_of_time" / "checkpoints" / "step_1").is_dir()
