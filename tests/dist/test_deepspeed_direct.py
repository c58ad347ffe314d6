"""BlockLLM handed straight to ``deepspeed.initialize`` is refused with one line that names
``blockllm_scale.integrations.deepspeed.initialize``, under ZeRO-0/1/2/3; the wrapper still trains.

DeepSpeed runs in one subprocess with world size 1 (CPU, gloo): a process group in the pytest
process would change what later tests see.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import subprocess
import sys

import pytest
import torch

from launch_utils import REPO, cpu_env

from blockllm_scale import BlockLLM
from blockllm_scale.config import ConfigError

WRAPPER = "blockllm_scale.integrations.deepspeed.initialize(model=..., optimizer=..., config=...)"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("direct") / "results.json"
    driver = REPO / "tests" / "dist" / "deepspeed_direct_driver.py"
    result = subprocess.run([sys.executable, str(driver), str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=cpu_env(DS_ACCELERATOR="cpu"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_blockllm_passed_to_deepspeed_initialize_is_refused(results, stage):
    outcome = results[f"direct_zero{stage}"]
    assert outcome["error"] == "ConfigError", outcome  # at initialize, before any step
    message = outcome["message"]
    assert "\n" not in message and "deepspeed.initialize directly" in message
    assert WRAPPER in message


@pytest.mark.parametrize("stage", [1, 3])
def test_the_wrapper_still_trains_and_switches(results, stage):
    outcome = results[f"wrapped_zero{stage}"]
    assert all(math.isfinite(x) for x in outcome["losses"]) and len(outcome["losses"]) == 4
    assert outcome["reselections"] >= 2 and outcome["rebuilds"] >= 2


def test_the_module_is_placed_and_cast_before_the_first_engine(results):
    # On the H200 the Trainer's step 0 ran an fp32 CPU module on CUDA inputs; here the device is the CPU,
    # so the dtype is what this test can see fail.
    outcome = results["placed_bf16_zero2"]
    assert outcome["engine_at_step_0"] is False  # the case this guards: no engine has placed the module yet
    assert outcome["dtypes"] == ["torch.bfloat16"] and outcome["devices"] == [outcome["expected_device"]]
    assert all(math.isfinite(x) for x in outcome["losses"]) and outcome["reselections"] >= 2


def test_param_groups_stay_an_ordinary_list_otherwise():
    model = torch.nn.Linear(4, 4)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.0)
    with pytest.raises(ConfigError, match="integrations.deepspeed.initialize"):
        optimizer.param_groups[:] = list(optimizer.param_groups)
    optimizer.param_groups[0] = optimizer.param_groups[0]  # one group replaced: allowed
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.record_loss(1.0)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert copy.deepcopy(optimizer).param_groups[0]["lr"] == pytest.approx(5e-3)
    assert len(pickle.loads(pickle.dumps(optimizer)).param_groups) == 1
