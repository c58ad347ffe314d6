"""accelerate configurations for pretrain.py: the shipped YAMLs are valid, and mistakes (in the YAML
or in what `accelerate launch` passes to the processes) are one-line ConfigErrors naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from blockllm_scale.config import ConfigError
from blockllm_scale.integrations.accelerate import (
    AccelerateBackend,
    check_config_file,
    fsdp_settings_from_env,
    launched_by_accelerate,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"
sys.path.insert(0, str(REPO / "launch"))


@pytest.mark.parametrize("name", ["fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_shipped_configs_are_valid(name):
    check_config_file(CONFIGS / name)


@pytest.mark.parametrize("change, names", [
    ({"fsdp_sharding_strategy": "FULL_SHARD"}, "fsdp_sharding_strategy"),
    ({"fsdp_backward_prefetch": "BACKWARD_PRE"}, "fsdp_backward_prefetch"),
    ({"sync_module_states": True}, "fsdp_sync_module_states"),  # accelerate adds the fsdp_ prefix
    ({"fsdp_version": 1}, "fsdp_version"),
    ({"fsdp_version": None}, "fsdp_version"),
    ({"fsdp_auto_wrap_policy": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy"),
    ({"fsdp_reshard_after_forward": "SHARD_GRAD_OP"}, "fsdp_reshard_after_forward"),
    ({"fsdp_offload_params": True}, "fsdp_offload_params"),
])
def test_fsdp_mistakes_are_one_line(tmp_path, change, names):
    config = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())
    for key, value in change.items():
        if value is None:
            config["fsdp_config"].pop(key)
        else:
            config["fsdp_config"][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as error:
        check_config_file(path)
    assert names in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("top, deepspeed, names", [
    ({"mixed_precision": "fp16"}, {}, "mixed_precision"),
    ({}, {"zero3_init_flag": True}, "zero3_init_flag"),
    ({}, {"zero_stage": 4}, "zero_stage"),
])
def test_deepspeed_mistakes_are_one_line(tmp_path, top, deepspeed, names):
    config = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())
    config.update(top)
    config["deepspeed_config"].update(deepspeed)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as error:
        check_config_file(path)
    assert names in str(error.value) and "\n" not in str(error.value)


# What `accelerate launch` puts in the environment for a config without fsdp_version, plus the
# launcher's defaults for the keys it always passes.
FSDP1_ENV = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
             "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_RESHARD_AFTER_FORWARD": "true",
             "FSDP_USE_ORIG_PARAMS": "true", "FSDP_SYNC_MODULE_STATES": "true", "FSDP_FORWARD_PREFETCH": "false",
             "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "false"}


def test_launcher_defaults_are_not_mistaken_for_settings():
    assert fsdp_settings_from_env(FSDP1_ENV) == {"fsdp_version": "1", "fsdp_reshard_after_forward": "true"}
    assert launched_by_accelerate(FSDP1_ENV) and not launched_by_accelerate({"WORLD_SIZE": "2"})


@pytest.mark.parametrize("env, names", [
    (FSDP1_ENV, "fsdp_version"),
    ({**FSDP1_ENV, "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "fsdp_sharding_strategy"),
    ({**FSDP1_ENV, "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision"),
])
def test_environment_mistakes_stop_before_any_process_group(env, names):
    import pretrain

    train = pretrain.TrainConfig()
    with pytest.raises(ConfigError, match=names):
        AccelerateBackend(train, env=env)


def test_pretrain_prints_one_line_under_accelerate(monkeypatch, tmp_path, capsys):
    import pretrain

    for key, value in FSDP1_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--out_dir", str(tmp_path), "--steps", "2"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "fsdp_version" in errors[0]
