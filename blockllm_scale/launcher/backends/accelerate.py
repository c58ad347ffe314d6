"""``accelerate launch`` runs the same train loop, flags and metrics as torchrun and deepspeed:

    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/pretrain.py --model 60m ...
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml launch/pretrain.py ...
    python -m blockllm_scale.launcher.backends.accelerate configs/accelerate/my.yaml   # check a config file

accelerate starts the processes and carries the configuration (in ``ACCELERATE_*``/``FSDP_*``
environment variables); the work is delegated to our own backends, so a run is the same whichever
launcher started it. ``fsdp_version: 2`` -> :class:`~blockllm_scale.launcher.backends.fsdp2.FSDP2Backend`;
``distributed_type: DEEPSPEED`` -> ``blockllm_scale.launcher.backends.deepspeed.DeepSpeedBackend`` with a
DeepSpeed config translated from accelerate's ``deepspeed_config`` (or its ``deepspeed_config_file``).

Why not ``accelerator.prepare``: it swaps the optimizer's parameters for DTensors behind BlockLLM's
back, DeepSpeed's ZeRO engines cannot follow a block switch (integration notes), and on a machine
without GPUs accelerate silently turns FSDP into DDP and ignores DeepSpeed.

Config mistakes (FSDP1, an FSDP1-only key under ``fsdp_version: 2``, fp16, a key accelerate does not
know, ...) are one-line :class:`~blockllm_scale.config.ConfigError`s. Unknown keys: accelerate itself
refuses one at the top level (``accelerate launch`` stops with a ValueError naming it) but ignores one
inside ``fsdp_config`` or ``deepspeed_config`` without a word, so a misspelt setting would train with its
default. The checker names them; so does the launcher, which reads the YAML that ``accelerate launch``
was given from that process's command line (its parent, on Linux; see :func:`launching_config_file`).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Mapping

from ...config import ConfigError
from ...integrations.accelerate import check_fsdp_settings, fsdp_settings_from_env, launched_with_fsdp
from ...integrations.accelerate import flag as _flag

# The keys accelerate 1.15 reads from a config file, from its source: the top level is ClusterConfig's
# fields (commands/config/config_args.py; process_config still converts the old fp16 and dynamo_backend);
# inside fsdp_config and deepspeed_config, `accelerate launch` copies each key onto its own argument of the
# same name (commands/launch.py's "FSDP Arguments" and "DeepSpeed Arguments"; fsdp_ignored_modules is read
# by utils/launch.py alone), and any other key goes nowhere. `accelerate config` (commands/config/cluster.py)
# writes only these. tests/unit/test_accelerate_config.py compares the sets with the installed accelerate.
TOP_LEVEL_KEYS = frozenset({
    "compute_environment", "distributed_type", "mixed_precision", "use_cpu", "debug", "num_processes",
    "machine_rank", "num_machines", "gpu_ids", "main_process_ip", "main_process_port", "rdzv_backend",
    "same_network", "main_training_function", "enable_cpu_affinity", "fp8_config", "deepspeed_config",
    "fsdp_config", "parallelism_config", "megatron_lm_config", "mpirun_config", "downcast_bf16", "tpu_name",
    "tpu_zone", "tpu_use_cluster", "tpu_use_sudo", "command_file", "commands", "tpu_vm", "tpu_env",
    "dynamo_config", "fp16", "dynamo_backend"})
FSDP_KEYS = frozenset({
    "fsdp_version", "fsdp_offload_params", "fsdp_min_num_params", "fsdp_sharding_strategy",
    "fsdp_reshard_after_forward", "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_backward_prefetch", "fsdp_state_dict_type", "fsdp_forward_prefetch", "fsdp_use_orig_params",
    "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states", "fsdp_activation_checkpointing",
    "fsdp_activation_checkpointing_offload", "fsdp_ignored_modules"})
DEEPSPEED_KEYS = frozenset({
    "deepspeed_config_file", "zero_stage", "offload_optimizer_device", "offload_param_device",
    "offload_optimizer_nvme_path", "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping",
    "zero3_init_flag", "zero3_save_16bit_model", "deepspeed_hostfile", "deepspeed_exclusion_filter",
    "deepspeed_inclusion_filter", "deepspeed_multinode_launcher", "deepspeed_moe_layer_cls_names"})

_DEEPSPEED_ENV = {
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
}


def check_mixed_precision(mixed_precision: str | None) -> str | None:
    """accelerate's ``mixed_precision`` as a ``--dtype``: "bf16", or None to keep the flag's."""
    value = (mixed_precision or "no").strip().lower()
    if value in ("fp16", "fp8"):
        raise ConfigError(f"mixed_precision: {value} is not supported; use bf16 (or no and --dtype)")
    if value not in ("no", "bf16"):
        raise ConfigError(f"mixed_precision: unknown value {mixed_precision!r}; use no or bf16")
    return "bf16" if value == "bf16" else None


def deepspeed_config(settings: Mapping[str, object]) -> dict:
    """A DeepSpeed JSON config from accelerate's ``deepspeed_config`` keys. Batch sizes and bf16 are
    "auto": the DeepSpeed backend fills them from --batch_size, --grad_accum and --dtype (which
    accelerate's ``mixed_precision: bf16`` has set) and reports a conflicting flag."""
    if _flag(settings.get("zero3_init_flag", False)):
        raise ConfigError("zero3_init_flag: true is not supported (the model is built whole on every rank)")
    stage = str(settings.get("zero_stage", 2))
    if stage not in ("0", "1", "2", "3"):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {stage}")
    zero: dict = {"stage": int(stage)}
    for key, target in (("offload_optimizer_device", "offload_optimizer"), ("offload_param_device", "offload_param")):
        device = str(settings.get(key, "none")).lower()
        if device not in ("none", ""):
            zero[target] = {"device": device}
    accumulation = settings.get("gradient_accumulation_steps")
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto" if accumulation in (None, "", "auto") else int(accumulation),
        "train_batch_size": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
    }
    if settings.get("gradient_clipping") not in (None, "", "none"):
        config["gradient_clipping"] = float(settings["gradient_clipping"])
    return config


def _fsdp_key(key: str) -> str:
    return key if key.startswith("fsdp_") else f"fsdp_{key}"  # accelerate adds the prefix, as here


def check_known_keys(config: Mapping[str, object]) -> None:
    """A ConfigError naming every key accelerate does not know, at the top level and inside
    ``fsdp_config`` / ``deepspeed_config`` (with the nearest known key where one is close)."""
    sections = [("", config.keys(), TOP_LEVEL_KEYS),
                ("fsdp_config", (config.get("fsdp_config") or {}).keys(), FSDP_KEYS),
                ("deepspeed_config", (config.get("deepspeed_config") or {}).keys(), DEEPSPEED_KEYS)]
    unknown = []
    for section, keys, known in sections:
        for key in keys:
            name = _fsdp_key(str(key)) if section == "fsdp_config" else str(key)
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                unknown.append(f"{section + '.' if section else ''}{key}{hint}")
    if unknown:
        raise ConfigError(f"unknown accelerate config key(s): {', '.join(unknown)}")


def load_config_file(path: str | Path) -> dict:
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: an accelerate config is a mapping of keys, got {type(config).__name__}")
    return config


def check_config_file(path: str | Path) -> None:
    """Validate an accelerate YAML config for pretrain.py; raises ConfigError on the first mistake."""
    config = load_config_file(path)
    check_known_keys(config)
    check_mixed_precision(config.get("mixed_precision"))
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        check_fsdp_settings(config.get("fsdp_config") or {})
    elif kind == "DEEPSPEED":
        settings = config.get("deepspeed_config") or {}
        if "deepspeed_config_file" not in settings:
            deepspeed_config(settings)
    elif kind not in ("NO",) and int(config.get("num_processes", 1)) > 1:
        raise ConfigError(f"distributed_type: {kind} is not supported; use FSDP (fsdp_version: 2) or DEEPSPEED")


def launching_config_file(parent_argv: list[str] | None = None, parent_cwd: Path | None = None) -> Path | None:
    """The config file that ``accelerate launch`` read, from its command line, or None where this process
    was not started by ``accelerate launch`` or its command line cannot be read.

    accelerate hands the processes the values of the keys it knows and nothing else, so a misspelt key
    can only be seen in the file. ``accelerate launch`` is the parent of every process it starts (its
    simple launcher starts the script itself; its torchrun agent runs inside it), so its command line is
    ``/proc/<parent>/cmdline`` (Linux). Without ``--config_file`` it reads its default config, when there
    is one, as here."""
    if parent_argv is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            parent_cwd = Path(os.readlink(f"/proc/{os.getppid()}/cwd"))
        except OSError:
            return None
        parent_argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    if not _is_accelerate_launch(parent_argv):
        return None
    for i, arg in enumerate(parent_argv):
        if arg == "--config_file" and i + 1 < len(parent_argv):
            return (parent_cwd or Path.cwd()) / parent_argv[i + 1]
        if arg.startswith("--config_file="):
            return (parent_cwd or Path.cwd()) / arg.split("=", 1)[1]
    from accelerate.commands.config import default_config_file

    return Path(default_config_file) if Path(default_config_file).is_file() else None


def _is_accelerate_launch(argv: list[str]) -> bool:
    """``accelerate launch ...`` or ``python -m accelerate.commands.launch ...``."""
    if "accelerate.commands.launch" in argv:
        return True
    return any(Path(arg).name == "accelerate" and argv[i + 1:i + 2] == ["launch"] for i, arg in enumerate(argv))


class AccelerateBackend:
    """The train loop's backend under ``accelerate launch``: one of ours, picked from accelerate's config.

    ``mixed_precision: bf16`` in the accelerate config means ``--dtype bf16``, and
    ``fsdp_activation_checkpointing: true`` means ``--activation_checkpointing``: both are applied to
    ``train`` here, before the train loop builds the model.
    """

    def __init__(self, train, env: Mapping[str, str] = os.environ, config_file: Path | None = None):
        self._check_keys_of(config_file or launching_config_file())
        self.plugin = "fsdp" if launched_with_fsdp(env) else \
            "deepspeed" if _flag(env.get("ACCELERATE_USE_DEEPSPEED")) else "none"
        dtype = check_mixed_precision(env.get("ACCELERATE_MIXED_PRECISION"))
        if dtype is not None:
            train.dtype = dtype
        self.delegate = {"fsdp": self._fsdp2, "deepspeed": self._deepspeed, "none": self._single}[self.plugin](train, env)
        if self.delegate.rank == 0:
            print(f"[accelerate] plugin {self.plugin}: delegate {type(self.delegate).__name__}, --dtype {train.dtype}",
                  flush=True)

    @staticmethod
    def _check_keys_of(config_file: Path | None) -> None:
        if config_file is None or not config_file.is_file():
            return
        try:
            check_known_keys(load_config_file(config_file))
        except ConfigError as error:
            raise ConfigError(f"{config_file}: {error}") from None

    @staticmethod
    def _fsdp2(train, env):
        from .fsdp2 import FSDP2Backend, init_mesh

        options = check_fsdp_settings(fsdp_settings_from_env(env))
        train.activation_checkpointing = train.activation_checkpointing or options.activation_checkpointing
        mesh = init_mesh("cpu" if _flag(env.get("ACCELERATE_USE_CPU")) else None)
        return FSDP2Backend(train, mesh=mesh, reshard_after_forward=options.reshard_after_forward,
                            layer_classes=options.layer_classes)

    @staticmethod
    def _deepspeed(train, env):
        settings = {key: env[variable] for key, variable in _DEEPSPEED_ENV.items() if variable in env}
        if "deepspeed_config_file" in settings:
            train.ds_config = settings["deepspeed_config_file"]
        else:
            path = Path(train.out_dir) / "accelerate_deepspeed_config.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".rank{env.get('RANK', '0')}.tmp")
            staging.write_text(json.dumps(deepspeed_config(settings), indent=2))
            os.replace(staging, path)  # every rank writes the same bytes; the rename is atomic
            train.ds_config = str(path)
        try:
            from .deepspeed import DeepSpeedBackend
        except ImportError as error:
            raise ConfigError(f"the DeepSpeed backend is not available ({error})") from None
        return DeepSpeedBackend(train)

    @staticmethod
    def _single(train, env):
        if int(env.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("accelerate launch without an FSDP or DeepSpeed plugin starts plain data-parallel "
                              "processes, which BlockLLM's block switches would break: use "
                              "configs/accelerate/fsdp2.yaml or deepspeed_zero2.yaml")
        from .plain import PlainBackend

        return PlainBackend(train.device or ("cpu" if _flag(env.get("ACCELERATE_USE_CPU")) else None))

    # The Backend protocol, each member the delegate's.
    @property
    def rank(self) -> int:
        return self.delegate.rank

    @property
    def world_size(self) -> int:
        return self.delegate.world_size

    @property
    def device(self):
        return self.delegate.device

    @property
    def keeps_master_weights(self) -> bool:
        return self.delegate.keeps_master_weights

    @property
    def owns_gradients(self) -> bool:
        return self.delegate.owns_gradients

    def resolve_settings(self, train, blockllm):
        return self.delegate.resolve_settings(train, blockllm)

    def prepare(self, model, optimizer, scheduler):
        return self.delegate.prepare(model, optimizer, scheduler)

    def forward(self, model, input_ids):
        return self.delegate.forward(model, input_ids)

    def backward(self, loss, accumulation_steps: int) -> None:
        self.delegate.backward(loss, accumulation_steps)

    def step(self) -> None:
        self.delegate.step()

    def save(self, directory, client_state: dict) -> None:
        self.delegate.save(directory, client_state)

    def load(self, directory) -> dict:
        return self.delegate.load(directory)


def main(argv: list[str] | None = None) -> None:
    paths = argv if argv is not None else sys.argv[1:]
    for path in paths:
        try:
            check_config_file(path)
            print(f"{path}: ok")
        except ConfigError as error:
            print(f"{path}: error: {error}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
