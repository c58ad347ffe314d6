"""accelerate configurations for pretrain.py: the shipped YAMLs are valid, and mistakes (in the YAML
or in what `accelerate launch` passes to the processes) are one-line ConfigErrors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from blockllm_scale.config import ConfigError
from blockllm_scale.launcher.backends import accelerate as integration
from blockllm_scale.launcher.backends.accelerate import (
    AccelerateBackend,
    check_config_file,
    launching_config_file,
)
from blockllm_scale.integrations.accelerate import fsdp_settings_from_env, launched_by_accelerate

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"


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
    from blockllm_scale.launcher import train as pretrain

    train = pretrain.TrainConfig()
    with pytest.raises(ConfigError, match=names):
        AccelerateBackend(train, env=env)


def test_pretrain_prints_one_line_under_accelerate(monkeypatch, tmp_path, capsys):
    from blockllm_scale.launcher import train as pretrain

    for key, value in FSDP1_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--out_dir", str(tmp_path), "--steps", "2"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "fsdp_version" in errors[0]


def write_config(tmp_path, name: str, edit) -> Path:
    config = yaml.safe_load((CONFIGS / name).read_text())
    edit(config)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name, edit, names", [
    ("fsdp2.yaml", lambda c: c["fsdp_config"].__setitem__("fsdp_reshard_after_foward", True),
     "fsdp_config.fsdp_reshard_after_foward (did you mean fsdp_reshard_after_forward?)"),
    ("fsdp2.yaml", lambda c: c["fsdp_config"].__setitem__("activation_checkpointng", True),
     "fsdp_config.activation_checkpointng"),  # accelerate's fsdp_ prefix is optional
    ("fsdp2.yaml", lambda c: c.__setitem__("mixed_precison", "bf16"), "mixed_precison (did you mean mixed_precision?)"),
    ("deepspeed_zero2.yaml", lambda c: c["deepspeed_config"].__setitem__("zero_stag", 3),
     "deepspeed_config.zero_stag (did you mean zero_stage?)"),
    ("deepspeed_zero2.yaml", lambda c: c.__setitem__("num_process", 2), "num_process"),
])
def test_unknown_keys_are_named_in_one_line(tmp_path, name, edit, names):
    with pytest.raises(ConfigError) as error:
        check_config_file(write_config(tmp_path, name, edit))
    assert names in str(error.value) and "\n" not in str(error.value)


def test_the_checker_names_a_misspelt_key_instead_of_saying_ok(tmp_path, capsys):
    path = write_config(tmp_path, "fsdp2.yaml", lambda c: c["fsdp_config"].__setitem__("fsdp_reshard_after_foward", 1))
    with pytest.raises(SystemExit) as exit_info:
        integration.main([str(path)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "ok" not in out
    assert err.count("\n") == 1 and "fsdp_reshard_after_foward" in err


def test_the_known_keys_are_the_ones_the_installed_accelerate_reads():
    """TOP_LEVEL_KEYS / FSDP_KEYS / DEEPSPEED_KEYS against accelerate's own source of them: its config
    dataclass and the argument groups `accelerate launch` copies fsdp_config / deepspeed_config onto."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    groups = {group.title: {action.dest for action in group._group_actions}
              for group in launch_command_parser()._action_groups}
    assert integration.TOP_LEVEL_KEYS == set(ClusterConfig.__dataclass_fields__) | {"fp16", "dynamo_backend"}
    assert integration.FSDP_KEYS == groups["FSDP Arguments"] | {"fsdp_ignored_modules"}
    assert integration.DEEPSPEED_KEYS == groups["DeepSpeed Arguments"]


def test_the_launcher_checks_the_file_accelerate_launch_was_given(tmp_path):
    from blockllm_scale.launcher import train as pretrain

    path = write_config(tmp_path, "fsdp2.yaml", lambda c: c["fsdp_config"].__setitem__("fsdp_reshard_after_foward", 1))
    env = {**FSDP1_ENV, "FSDP_VERSION": "2"}
    with pytest.raises(ConfigError, match="fsdp_reshard_after_foward") as error:
        AccelerateBackend(pretrain.TrainConfig(), env=env, config_file=path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--config_file", "c.yaml", "launch/pretrain.py"], "c.yaml"),
    (["python", "-m", "accelerate.commands.launch", "--config_file=/abs/c.yaml", "pretrain.py"], "/abs/c.yaml"),
    (["python", "/venv/bin/torchrun", "--nproc_per_node", "2", "launch/pretrain.py"], None),  # not accelerate
])
def test_the_config_file_is_read_off_accelerate_launchs_command_line(tmp_path, argv, expected):
    found = launching_config_file(argv, parent_cwd=tmp_path)
    assert found == (None if expected is None else tmp_path / expected)
