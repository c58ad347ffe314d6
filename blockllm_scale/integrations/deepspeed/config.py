"""DeepSpeed JSON configs for BlockLLM: loading, and one clear line for each mistake DeepSpeed would reject
deep inside ``initialize`` or get silently wrong (configs/ds/README.md describes the JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ...config import BlockLLMConfig, ConfigError
from ...states import ADAM_KEYS

SECTION = "blockllm"  # BlockLLM's settings inside a DeepSpeed JSON
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def load_config(config) -> tuple[dict, str]:
    """A shallow copy of a DeepSpeed config (path or dict) and a name for error messages."""
    if isinstance(config, (str, os.PathLike)):
        try:
            return json.loads(Path(config).read_text()), Path(config).name
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a path or a dict, got {type(config).__name__}")
    return dict(config), "DeepSpeed config"


def check_config(config: dict, name: str, *, world_size: int, on_cpu: bool, client_optimizer: bool,
                 blockllm: bool, client_scheduler: bool = False) -> None:
    """One clear line for what DeepSpeed would reject deep inside, or get silently wrong."""
    _check_zero_section(config.get("zero_optimization", {}), name)
    if client_optimizer and "optimizer" in config:
        raise ConfigError(f'{name}: remove the "optimizer" section: the optimizer is passed in '
                          "(BlockLLM or --optimizer), and DeepSpeed would build a second one")
    if "scheduler" in config and (blockllm or client_scheduler):
        why = "the launcher schedules the LR itself" if client_scheduler else \
            "it would restart at every block switch; pass a torch scheduler over BlockLLM as lr_scheduler"
        raise ConfigError(f'{name}: remove the "scheduler" section: {why}')
    for key in ("fp16", "bf16", "bfloat16"):
        enabled = config[key].get("enabled", False) if isinstance(config.get(key), dict) else False
        if not isinstance(enabled, bool):
            raise ConfigError(f"{name}: {key}.enabled must be true or false; got {enabled!r}")
    fp16, bf16 = precision_enabled(config, "fp16"), precision_enabled(config, "bf16")
    if fp16 and bf16:
        raise ConfigError(f"{name}: fp16 and bf16 are both enabled; choose one")
    if fp16 and on_cpu:
        raise ConfigError(f'{name}: fp16 does not run on CPU; use "bf16" or fp32')
    if fp16 and blockllm:
        raise ConfigError(f"{name}: fp16 loss scaling skips overflowing steps that BlockLLM would still count; "
                          'use "bf16"')
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if client_optimizer and offload.get("device", "none") != "none" and config.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(f"{name}: zero_optimization.offload_optimizer wants DeepSpeed's CPU Adam, but the optimizer "
                          'is passed in; add "zero_force_ds_cpu_optimizer": false to offload it anyway (slow)')
    check_batch_sizes(config, name, world_size)


def _check_zero_section(zero: Any, name: str) -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    if not isinstance(zero, dict):
        raise ConfigError(f"{name}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{name}: zero_optimization.stage must be 0, 1, 2 or 3; got {stage!r}")
    try:  # DeepSpeed's own schema, checked now instead of deep inside initialize
        DeepSpeedZeroConfig(**zero)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{name}: zero_optimization.{where}: {first['msg']} (got {first.get('input')!r})") from None


def precision_enabled(config: dict, key: str) -> bool:
    sections = [config.get(key)] + ([config.get("bfloat16")] if key == "bf16" else [])  # DeepSpeed's old name
    return any(isinstance(s, dict) and s.get("enabled") is True for s in sections)


def check_batch_sizes(config: dict, name: str, world_size: int) -> None:
    """DeepSpeed's rule train_batch_size = micro batch x accumulation x world size, one line per way to break it."""
    values = {key: config.get(key) for key in BATCH_KEYS}
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            hint = ' ("auto" is filled in by launch/pretrain.py only)' if value == "auto" else ""
            raise ConfigError(f"{name}: {key} must be a positive integer{hint}; got {value!r}")
    micro, accum, total = values.values()
    if total is None:
        if micro is None:
            raise ConfigError(f"{name}: give train_batch_size or train_micro_batch_size_per_gpu")
        return
    if total % world_size:
        raise ConfigError(f"{name}: train_batch_size {total} is not divisible by the world size {world_size}")
    per_rank = total // world_size
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if value is not None and per_rank % value:
            raise ConfigError(f"{name}: train_batch_size {total} / world size {world_size} = {per_rank} "
                              f"is not a multiple of {key} {value}")
    if micro is not None and accum is not None and micro * accum != per_rank:
        raise ConfigError(f"{name}: train_batch_size {total} is not train_micro_batch_size_per_gpu {micro} x "
                          f"gradient_accumulation_steps {accum} x world size {world_size}")


def blockllm_section(config: dict, name: str) -> dict | None:
    """The "blockllm" section, checked (an unknown or misspelt key is an error naming it)."""
    section = config.get(SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f'{name}: "{SECTION}" must be an object, got {section!r}')
    try:
        BlockLLMConfig.from_dict(section)
    except ConfigError as error:
        raise ConfigError(f"{name}: {SECTION}: {error}") from None
    return section


def accumulation_steps(config: dict) -> int:
    if "gradient_accumulation_steps" in config:
        return config["gradient_accumulation_steps"]
    micro, total = config.get("train_micro_batch_size_per_gpu"), config.get("train_batch_size")
    return total // (micro * dist.get_world_size()) if micro and total else 1


def adam_settings(spec: dict | None, name: str) -> dict:
    """lr, betas, eps and weight_decay from a DeepSpeed "optimizer" section (Adam/AdamW) for BlockLLM."""
    spec = spec or {"type": "AdamW", "params": {}}
    if str(spec.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(f'{name}: optimizer.type must be "AdamW" with a "{SECTION}" section; '
                          f'got {spec.get("type")!r}')
    params = dict(spec.get("params", {}))
    unknown = sorted(set(params) - set(ADAM_KEYS) - {"adam_w_mode", "torch_adam", "fused"})
    if unknown:
        raise ConfigError(f"{name}: optimizer.params.{unknown[0]} is not an AdamW setting BlockLLM takes")
    if params.get("adam_w_mode") is False:
        raise ConfigError(f"{name}: BlockLLM's update is AdamW (decoupled weight decay); drop adam_w_mode: false")
    return {k: params[k] for k in ADAM_KEYS if k in params}
