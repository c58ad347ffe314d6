"""What one benchmark configuration is, how the launcher is called for it, and the grids built from the
command line (``--optimizers ... --models ... --backends ...``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .memory_model import BACKENDS

REPO = Path(__file__).resolve().parent.parent
# 8-bit twin of each optimizer for the grid's 8-bit axis (BlockLLM gets --states instead).
EIGHT_BIT = {"adamw": "adamw8bit", "galore": "galore8bit"}


@dataclass(frozen=True)
class RunSpec:
    """One configuration: one launcher process.

    label: the optimizer as tables show it ("blockllm s=0.9 8-bit"); flags: extra launcher flags as
    (name, value) pairs, value "true"/"false" for switches; optional: flags passed only when the
    launcher knows them (dropped with a note otherwise, e.g. a feature not merged yet).
    steps: optimizer steps; warmup: leading steps left out of the tokens/s statistics.
    gpus: processes of a ZeRO / FSDP2 run (torchrun --nproc_per_node), one GPU each on a CUDA machine;
    batch_size is per process. The plain backend runs one process.
    """

    label: str
    optimizer: str
    model: str
    batch_size: int
    backend: str = "plain"
    checkpointing: bool = False
    seq_len: int = 256
    dtype: str = "bf16"
    steps: int = 10
    warmup: int = 3
    flags: tuple[tuple[str, str], ...] = ()
    optional: tuple[tuple[str, str], ...] = ()
    gpus: int = 1

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"{self.label}: need 0 <= warmup < steps, got warmup {self.warmup}, steps {self.steps}")
        if self.gpus < 1 or (self.backend == "plain" and self.gpus != 1):
            raise ValueError(f"{self.label}: gpus must be >= 1, and 1 on the plain backend; got {self.gpus}")

    @property
    def key(self) -> str:
        """Stable identity in the results file: a configuration already there is not run again. One GPU
        adds nothing (the keys of results measured before the GPU count was part of a configuration)."""
        ckpt = "ckpt" if self.checkpointing else "nockpt"
        return (f"{self.label}|{self.model}|{self.backend}|{ckpt}|b{self.batch_size}|seq{self.seq_len}|{self.dtype}"
                f"|steps{self.steps}" + (f"|gpus{self.gpus}" if self.gpus != 1 else ""))

    def settings(self) -> dict:
        """Every launcher setting of this configuration, by flag name (for the memory model)."""
        return {"optimizer": self.optimizer, "model": self.model, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "dtype": self.dtype, "checkpointing": self.checkpointing, "backend": self.backend, "steps": self.steps,
                **dict(self.optional), **dict(self.flags)}

    @property
    def selector(self) -> str:
        """What --only matches: the key, with "|gpus1" spelled out for one GPU (so ``--only gpus1`` works)."""
        return self.key + ("|gpus1" if self.gpus == 1 else "")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "flags": dict(self.flags), "optional": dict(self.optional)}


def launcher_flags() -> dict[str, str]:
    """Every flag launch/pretrain.py accepts -> its type name ("int", "bool", ...)."""
    from blockllm_scale.launcher.cli import CONFIG_SECTIONS

    return {f.name: str(f.type) for cls, skipped in CONFIG_SECTIONS.values()
            for f in dataclasses.fields(cls) if f.name not in skipped}


def one_gpu_key(key: str) -> str:
    """The key of the same configuration on one GPU (the baseline of scaling efficiency)."""
    return re.sub(r"\|gpus\d+$", "", key)


def unavailable_reason(spec: RunSpec, known: dict[str, str], gpus_present: int | None = None) -> str | None:
    """Why this configuration cannot run in this checkout or on this machine (None: it can).
    gpus_present: the GPUs this machine has; None where processes run on the CPU (no limit)."""
    from blockllm_scale.baselines import BASELINES

    if gpus_present is not None and spec.gpus > gpus_present:
        return f"needs {spec.gpus} GPUs; this machine has {gpus_present}"

    if spec.optimizer != "blockllm" and spec.optimizer not in BASELINES:
        return f"no optimizer {spec.optimizer!r} in this checkout"
    unknown = [name for name, _ in spec.flags if name not in known]
    if unknown:
        return f"the launcher has no --{unknown[0]}"
    if spec.backend.startswith("zero"):
        if not (REPO / "blockllm_scale/integrations/deepspeed/engine.py").is_file():
            return "no DeepSpeed backend yet (blockllm_scale/integrations/deepspeed/)"
        if not ds_config(spec.backend).is_file():
            return f"no {ds_config(spec.backend).relative_to(REPO)}"
        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed"
    if spec.backend == "fsdp2" and not (REPO / "blockllm_scale/integrations/fsdp2.py").is_file():
        return "no FSDP2 backend yet (blockllm_scale/integrations/fsdp2.py)"
    return None


def ds_config(backend: str) -> Path:
    return REPO / "configs" / "ds" / f"{backend}.json"


def ds_config_for(spec: RunSpec, out_dir: str) -> Path:
    """configs/ds/<stage>.json with this configuration's batch size and precision, written into the run's
    directory. Its "blockllm" section is left out: the flags set BlockLLM (the launcher refuses a flag that
    contradicts the JSON)."""
    config = json.loads(ds_config(spec.backend).read_text())
    config.pop("blockllm", None)
    config.update(train_micro_batch_size_per_gpu=spec.batch_size, gradient_accumulation_steps=1,
                  train_batch_size=spec.batch_size * spec.gpus)
    config["bf16"] = {**config.get("bf16", {}), "enabled": spec.dtype == "bf16"}
    if "fp16" in config:
        config["fp16"] = {**config["fp16"], "enabled": False}
    path = Path(out_dir) / f"{spec.backend}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def launcher_command(spec: RunSpec, out_dir: str, known: dict[str, str], device: str) -> tuple[list[str], list[str]]:
    """(argv, notes): the launcher process for ``spec``; notes say which optional flags were dropped.
    ZeRO runs get their DeepSpeed JSON written into ``out_dir`` (ds_config_for)."""
    from blockllm_scale.launcher.models import MODEL_SIZES

    script = str(REPO / "launch" / "pretrain.py")
    if spec.backend == "plain":
        argv = [sys.executable, script, "--backend", "plain"] + (["--device", device] if device else [])
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.gpus}", script]
        argv += (["--ds_config", str(ds_config_for(spec, out_dir))] if spec.backend.startswith("zero")
                 else ["--backend", "fsdp2"])
    # Plain bf16 runs measure pure bf16 weights (every result so far, and the memory model's plain bf16): the
    # launcher's --dtype bf16 adds fp32 master copies of what each optimizer trains. DeepSpeed and FSDP2 keep
    # their own masters in bf16.
    dtype = "bf16-pure" if spec.dtype == "bf16" and spec.backend == "plain" else spec.dtype
    values = {"optimizer": spec.optimizer, "model": spec.model, "batch_size": spec.batch_size, "seq_len": spec.seq_len,
              "dtype": dtype, "steps": spec.steps, "activation_checkpointing": str(spec.checkpointing).lower(),
              "dataset": "synthetic", "vocab_size": MODEL_SIZES[spec.model]["vocab_size"], "eval_every": 0,
              "out_dir": out_dir, "keep_checkpoints": 0}  # a measurement: no checkpoint to write (and wait for)
    notes = [f"--{name} dropped: the launcher has no such flag" for name, _ in spec.optional if name not in known]
    if spec.backend.startswith("zero"):
        notes.append(f"configs/ds/{spec.backend}.json with this batch size and precision, without its blockllm section")
    values.update({name: value for name, value in spec.optional if name in known})
    values.update(dict(spec.flags))
    for name, value in values.items():
        if known.get(name) == "bool":
            argv.append(f"--{name}" if str(value).lower() == "true" else f"--no-{name}")
        else:
            argv += [f"--{name}", str(value)]
    return argv, notes


def parse_optimizer(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """"blockllm:sparsity=0.9,states=bnb_8bit" -> ("blockllm", (("sparsity", "0.9"), ("states", "bnb_8bit")))."""
    name, _, rest = text.partition(":")
    flags = []
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_0-9]+", key):
            raise ValueError(f"optimizer spec {text!r}: expected name:flag=value,flag=value")
        flags.append((key, value))
    return name, tuple(flags)


def grid(optimizers, models, backends, checkpointing, eight_bit, batch_sizes, seq_len=256, dtype="bf16",
         steps=10, warmup=3, gpu_counts=(1,)) -> list[RunSpec]:
    """The cross product; the 8-bit axis maps AdamW/GaLore to their 8-bit twins and gives BlockLLM
    8-bit states (torchao under FSDP2, where bitsandbytes cannot go). The plain backend runs on one GPU
    whatever gpu_counts says. Duplicates are dropped."""
    specs: dict[str, RunSpec] = {}
    for text, model, backend, ckpt, low, batch, gpus in itertools.product(optimizers, models, backends, checkpointing,
                                                                           eight_bit, batch_sizes, gpu_counts):
        name, flags = parse_optimizer(text)
        label = text
        if low and name == "blockllm" and "states" not in dict(flags):
            flags += (("states", "torchao_8bit" if backend == "fsdp2" else "bnb_8bit"),)
            label = f"{text} 8-bit"
        elif low and name in EIGHT_BIT:
            name, label = EIGHT_BIT[name], text.replace(name, EIGHT_BIT[name], 1)
        spec = RunSpec(label, name, model, batch, backend, ckpt, seq_len, dtype, steps, warmup, flags,
                       gpus=1 if backend == "plain" else gpus)
        specs.setdefault(spec.key, spec)
    return list(specs.values())


def select(specs: list[RunSpec], only: list[str]) -> list[RunSpec]:
    """Keep specs whose key (with "|gpus1" for one GPU: RunSpec.selector) contains, for every --only, one
    of its comma-separated substrings."""
    def matches(spec: RunSpec) -> bool:
        return all(any(part in spec.selector for part in pattern.split(",")) for pattern in only)

    return [spec for spec in specs if matches(spec)]
