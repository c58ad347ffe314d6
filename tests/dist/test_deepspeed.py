"""BlockLLM inside DeepSpeed ZeRO-0/1/2/3 on 2 CPU processes (gloo), batched into two launches of
deepspeed_driver.py plus the bad-input runs of the launcher: equal to the single-process plain run,
per-rank state that covers only the selected blocks, no engine kept alive across block switches,
activation checkpointing, 8-bit states, exact resume across a switch, one-line configuration errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from launch_utils import (PRETRAIN, REPO, cpu_env, deepspeed_launch, failure_report, metrics, rank_results, torchrun,
                          unlisted_files)

from blockllm_scale.launcher.checkpoint import manifest_problem, step_dirs

from deepspeed_cases import ACCUM_RUNS, BF16_RUNS, FP32_RUNS, RESUMED

WORLD = 2
DRIVER = REPO / "tests" / "dist" / "deepspeed_driver.py"
ENV = {"DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    result = torchrun(DRIVER, str(out), "main", nproc=WORLD, timeout=480, **ENV)
    assert result.returncode == 0, failure_report(result)
    ranks = rank_results(out, "main_", WORLD)
    assert all(r["world_size"] == WORLD for r in ranks)  # a silent 1-process launch fails here
    return out, ranks


@pytest.fixture(scope="module")
def resume_run(main_run):
    out, _ = main_run
    points = {name: resume_point(metrics(out / name)) for name in RESUMED}
    (out / "resume_points.json").write_text(json.dumps(points))
    result = torchrun(DRIVER, str(out), "resume", nproc=WORLD, timeout=300, **ENV)
    assert result.returncode == 0, failure_report(result)
    return points, rank_results(out, "resume_", WORLD)


def resume_point(rows: list[dict]) -> int:
    """The first step after the initial choice at which the selection changed: the checkpoint then
    holds a fresh engine whose kept Adam state has not been handed over yet."""
    return next(r["step"] for r in rows if r["reselected"] and 2 <= r["step"] < len(rows) - 1)


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=0) for x, y in zip(a, b))


@pytest.mark.parametrize("name", FP32_RUNS)
def test_fp32_zero_stages_equal_the_plain_run(main_run, name):
    out, ranks = main_run
    reference = "plain_always" if "always" in FP32_RUNS[name][1][1] else "plain_candidate"
    plain, ds = ranks[0][reference]["losses"], ranks[0][name]["losses"]
    # Relative 1e-6: float32 spacing near a loss of 9 is 9.5e-7; only the reduction order differs.
    assert close(plain, ds, 1e-6), (plain, ds)
    single, zero = metrics(out / reference), metrics(out / name)
    assert [r["reselected"] for r in single] == [r["reselected"] for r in zero]
    assert [r["selected_fraction"] for r in single] == [r["selected_fraction"] for r in zero]
    assert sum(r["reselected"] for r in zero[1:]) >= 2  # two block switches after the first choice
    assert ranks[1][name]["losses"] == ds  # every rank logs the same global loss


@pytest.mark.parametrize("name", ACCUM_RUNS)
def test_gradient_accumulation_equals_the_plain_run(main_run, name):
    _, ranks = main_run
    plain, ds = ranks[0]["plain_accum"]["losses"], ranks[0][name]["losses"]
    assert close(plain, ds, 1e-6), (plain, ds)


@pytest.mark.parametrize("name", BF16_RUNS)
def test_bf16_zero_stages_stay_close_to_the_plain_bf16_run(main_run, name):
    _, ranks = main_run
    reference = "plain_bf16_always" if "always" in BF16_RUNS[name][1][1] else "plain_bf16"
    plain, ds = ranks[0][reference]["losses"], ranks[0][name]["losses"]
    # DeepSpeed keeps fp32 masters and Adam states; the plain bf16 run keeps both in bf16.
    assert close(plain, ds, 1e-3), (plain, ds)


def test_adamw_baseline_under_deepspeed_equals_plain(main_run):
    _, ranks = main_run
    assert close(ranks[0]["plain_adamw"]["losses"], ranks[0]["adamw_zero2"]["losses"], 1e-6)


def _check_state_covers_selection(steps: list[dict]) -> None:
    for s in steps:
        shards = 1 if s["stage"] == 0 else s["world_size"]
        assert s["master_numel"] * shards == s["selected_numel"], s
        assert s["state_numel"] * shards == 2 * s["selected_numel"], s  # exp_avg + exp_avg_sq, measured


@pytest.mark.parametrize("rank", range(WORLD))
@pytest.mark.parametrize("name", ["zero1_fp32", "zero2_fp32", "zero3_fp32", "zero0_fp32"])
def test_per_rank_state_covers_only_the_selected_blocks(main_run, name, rank):
    steps = main_run[1][rank][name]["steps"]
    _check_state_covers_selection(steps)
    assert len({s["rebuilds"] for s in steps}) >= 2  # measured before and after a switch
    # Rebuilt engines continue DeepSpeed's step count (checkpoint tags, logs).
    counts = [s["global_steps"] for s in steps]
    assert counts == list(range(counts[0], counts[0] + len(counts))), counts


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_block_switches_leave_nothing_behind(main_run, stage):
    for rank in main_run[1]:
        run = rank["switching"][stage]
        assert run["rebuilds"] >= 7  # a switch at every step
        # Weakrefs to every replaced engine, ZeRO optimizer, AdamW (and ZeRO-3 parameter offload) are dead.
        assert run["old_tracked"] >= 21 and run["old_alive"] == 0
        _check_state_covers_selection(run["steps"])
        # No weight keeps an old engine's flat buffer alive: the storages stay at the model's size.
        assert max(run["storage_bytes"]) == min(run["storage_bytes"]), run["storage_bytes"]
        assert max(run["storage_bytes"]) <= run["model_bytes"] // (1 if stage in "012" else WORLD) + 4096
        assert run["frozen_untouched"] and run["trained_moved"]


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_activation_checkpointing_trains_the_middle_layer_only(main_run, stage):
    for rank in main_run[1]:
        records = rank["checkpointing"][stage]
        assert len({r["rebuilds"] for r in records}) >= 3  # the later steps run on rebuilt engines
        for r in records:
            assert r["selected_grad_norms"] and all(g > 0 for g in r["selected_grad_norms"].values()), r
            assert r["frozen_with_grad"] == [], r
            # Layer 0 ran once (no recomputation: backward stops above it); layers 1 and 2 are recomputed.
            assert r["forward_calls"] == {"0": 1, "1": 2, "2": 2}, r


def test_initialize_builds_blockllm_from_the_json_sections(main_run):
    run = main_run[1][0]["from_config_section"]
    assert (run["type"], run["sparsity"], run["lr"], run["weight_decay"]) == ("BlockLLM", 0.7, 2e-3, 0.01)
    assert run["rebuilds"] >= 2 and all(math.isfinite(x) for x in run["losses"])


def test_8bit_states_are_checked_at_run_time(main_run):
    out, ranks = main_run
    steps = ranks[0]["bnb_8bit_zero2"]["steps"]
    assert steps and all("torch.uint8" in s["state_dtypes"] for s in steps), steps
    assert all(math.isfinite(x) for x in ranks[0]["bnb_8bit_zero2"]["losses"])


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_manifests_cover_every_file_deepspeed_wrote(main_run, name):
    out, _ = main_run
    checkpoints = step_dirs(out / name / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_3", "step_5"]  # --save_every 3, and the end
    for checkpoint in checkpoints:
        assert (checkpoint / "deepspeed").is_dir() and unlisted_files(checkpoint) == set()
        assert manifest_problem(checkpoint) is None


@pytest.mark.parametrize("name", RESUMED)
def test_resume_across_a_switch_equals_the_uninterrupted_run(main_run, resume_run, name):
    _, main = main_run
    points, resumed = resume_run
    step = points[name]
    assert resumed[0][name]["losses"] == main[0][name]["losses"][step:]


BAD_CONFIGS = {  # name: (config, words the one-line error must contain, extra flags)
    "stage": ({"zero_optimization": {"stage": 4}}, ["zero_optimization.stage", "0, 1, 2 or 3"], []),
    "zero_key": ({"zero_optimization": {"stage": 2, "overlap_com": True}}, ["zero_optimization.overlap_com"], []),
    "optimizer": ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, ['"optimizer" section'], []),
    "scheduler": ({"scheduler": {"type": "WarmupLR"}}, ['"scheduler" section'], []),
    "fp16_cpu": ({"fp16": {"enabled": True}}, ["fp16", "CPU"], []),
    "blockllm_key": ({"blockllm": {"sparsityy": 0.5}}, ["sparsityy"], []),
    "blockllm_flag": ({"blockllm": {"sparsity": 0.5}}, ["--sparsity 0.3", "blockllm.sparsity"], ["--sparsity", "0.3"]),
    "batch_flag": ({"train_micro_batch_size_per_gpu": 4}, ["--batch_size", "train_micro_batch_size_per_gpu"], []),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """The single-process cases through the launcher's main, all in one subprocess (each launcher
    process pays ~10 s of imports); the world-size case through the deepspeed launcher, 2 processes."""
    out = tmp_path_factory.mktemp("bad")
    cases = {}
    for name, (config, _, flags) in BAD_CONFIGS.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps({"train_batch_size": "auto", **config}))
        cases[name] = ["--ds_config", str(path), "--out_dir", str(out / name), "--batch_size", "2", *flags]
    (out / "cases.json").write_text(json.dumps(cases))
    runner = subprocess.Popen([sys.executable, str(REPO / "tests" / "dist" / "launcher_cases.py"), str(out / "cases.json"),
                               str(out / "results.json")], cwd=REPO, env=cpu_env(**ENV), stderr=subprocess.PIPE, text=True)
    # train_batch_size 3 on 2 processes: the world size does not divide it.
    (out / "world.json").write_text(json.dumps({"train_batch_size": 3, "zero_optimization": {"stage": 1}}))
    world = deepspeed_launch(PRETRAIN, "--ds_config", str(out / "world.json"), "--out_dir", str(out / "world"),
                             nproc=WORLD, timeout=300, **ENV)
    _, runner_stderr = runner.communicate(timeout=300)
    assert runner.returncode == 0, runner_stderr[-3000:]
    results = {name: (r["code"], r["stderr"]) for name, r in json.loads((out / "results.json").read_text()).items()}
    results["world"] = (world.returncode, world.stderr)
    return results


@pytest.mark.parametrize("name", [*BAD_CONFIGS, "world"])
def test_bad_input_is_one_clear_line(bad_runs, name):
    code, stderr = bad_runs[name]
    words = BAD_CONFIGS[name][1] if name in BAD_CONFIGS else ["train_batch_size 3", "world size 2"]
    errors = [line for line in stderr.splitlines() if line.startswith("pretrain.py: error:")]
    assert code != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert errors and all(all(w in line for w in words) for line in errors[:1]), stderr[-3000:]
    assert len(set(errors)) == 1  # one line (the same from every rank)
