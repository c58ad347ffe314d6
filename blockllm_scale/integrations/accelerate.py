"""Where ``accelerate launch`` started this process and with which FSDP settings, read from the environment it
sets: what the HF Trainer adapter (``hf.py``) and the launcher's accelerate backend both need to know. Imports
nothing of accelerate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..config import ConfigError


def launched_by_accelerate(env: Mapping[str, str] = os.environ) -> bool:
    """``accelerate launch`` always sets ACCELERATE_MIXED_PRECISION; the plugin flags cover torchrun
    with accelerate's variables set by hand (``ACCELERATE_USE_CPU=true torchrun ...``)."""
    return any(key in env for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def flag(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def launched_with_fsdp(env: Mapping[str, str] = os.environ) -> bool:
    """True under ``accelerate launch`` with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return flag(env.get("ACCELERATE_USE_FSDP"))


# Keys accelerate documents as FSDP1-only, with what replaces them under FSDP2.
FSDP1_ONLY = {
    "fsdp_sharding_strategy": "use fsdp_reshard_after_forward: true|false",
    "fsdp_backward_prefetch": "FSDP2 prefetches by itself; remove it",
    "fsdp_forward_prefetch": "FSDP2 prefetches by itself; remove it",
    "fsdp_use_orig_params": "FSDP2 always keeps the original parameters; remove it",
    "fsdp_sync_module_states": "remove it (every rank builds the same model from --seed)",
}
# What `accelerate launch` passes to the processes for an FSDP key, and its launcher default: a key
# that differs from its default was set in the config file (or on the command line).
_FSDP_ENV = {
    "fsdp_version": ("FSDP_VERSION", None),
    "fsdp_sharding_strategy": ("FSDP_SHARDING_STRATEGY", "FULL_SHARD"),
    "fsdp_backward_prefetch": ("FSDP_BACKWARD_PREFETCH", None),
    "fsdp_forward_prefetch": ("FSDP_FORWARD_PREFETCH", "false"),
    "fsdp_use_orig_params": ("FSDP_USE_ORIG_PARAMS", "true"),
    "fsdp_sync_module_states": ("FSDP_SYNC_MODULE_STATES", "true"),
    "fsdp_reshard_after_forward": ("FSDP_RESHARD_AFTER_FORWARD", None),
    "fsdp_auto_wrap_policy": ("FSDP_AUTO_WRAP_POLICY", None),
    "fsdp_transformer_layer_cls_to_wrap": ("FSDP_TRANSFORMER_CLS_TO_WRAP", None),
    "fsdp_offload_params": ("FSDP_OFFLOAD_PARAMS", "false"),
    "fsdp_activation_checkpointing": ("FSDP_ACTIVATION_CHECKPOINTING", "false"),
    "fsdp_state_dict_type": ("FSDP_STATE_DICT_TYPE", None),
}


@dataclass
class FSDPOptions:
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    layer_classes: list[str] | None = None  # fsdp_transformer_layer_cls_to_wrap (default: the model's)


def check_fsdp_settings(settings: Mapping[str, object]) -> FSDPOptions:
    """Validate accelerate ``fsdp_config`` keys (``fsdp_`` prefix optional) for our FSDP2 backend."""
    settings = {k if k.startswith("fsdp_") else f"fsdp_{k}": v for k, v in settings.items()}
    version = settings.get("fsdp_version")
    if version is None:
        raise ConfigError("fsdp_config has no fsdp_version (accelerate then means FSDP1): add fsdp_version: 2")
    if str(version) != "2":
        raise ConfigError(f"fsdp_version: {version} is not supported; BlockLLM runs on FSDP2: set fsdp_version: 2")
    for key, hint in FSDP1_ONLY.items():
        if key in settings:
            raise ConfigError(f"{key} is an FSDP1 setting, invalid with fsdp_version: 2; {hint}")
    policy = settings.get("fsdp_auto_wrap_policy")
    if policy is not None and str(policy).upper() != "TRANSFORMER_BASED_WRAP":
        raise ConfigError(f"fsdp_auto_wrap_policy: {policy} is not supported; use TRANSFORMER_BASED_WRAP "
                          "(one FSDP unit per decoder layer, as the fsdp2 backend shards)")
    if flag(settings.get("fsdp_offload_params", False)):
        raise ConfigError("fsdp_offload_params: true (CPU offload) is not supported by the fsdp2 backend")
    state_dict_type = settings.get("fsdp_state_dict_type")
    if state_dict_type is not None and str(state_dict_type).upper() != "SHARDED_STATE_DICT":
        raise ConfigError(f"fsdp_state_dict_type: {state_dict_type} is not supported; checkpoints are sharded "
                          "(torch.distributed.checkpoint): use SHARDED_STATE_DICT")
    reshard = str(settings.get("fsdp_reshard_after_forward", "true")).strip().lower()
    if reshard not in ("true", "false"):
        raise ConfigError(f"fsdp_reshard_after_forward: {reshard} is an FSDP1 value; under fsdp_version: 2 it is true or false")
    classes = settings.get("fsdp_transformer_layer_cls_to_wrap")
    return FSDPOptions(reshard_after_forward=reshard == "true",
                       activation_checkpointing=flag(settings.get("fsdp_activation_checkpointing", False)),
                       layer_classes=[c.strip() for c in str(classes).split(",")] if classes else None)


def fsdp_settings_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The fsdp_config keys that `accelerate launch` passed on with a non-default value."""
    found = {}
    for key, (variable, default) in _FSDP_ENV.items():
        value = env.get(variable)
        if value is not None and (default is None or value.strip().lower() != default.lower()):
            found[key] = value
    return found
