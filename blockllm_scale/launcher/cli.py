"""Pre-train a LLaMA with BlockLLM or a baseline optimizer: the launcher's flags (``launch/pretrain.py --help``).

    python launch/pretrain.py                                   # tiny LLaMA, shipped corpus, CPU or 1 GPU
    python launch/pretrain.py --model 60m --steps 10000 --batch_size 64 --grad_accum 2 --dtype bf16
    python launch/pretrain.py --optimizer galore --model 130m   # the baselines take the same flags
    deepspeed launch/pretrain.py --ds_config configs/ds/zero1.json
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/pretrain.py
    python launch/pretrain.py --resume auto                     # continue the newest intact checkpoint of --out_dir

Every flag is a field of one of the config dataclasses: ``TrainConfig`` (below), the launcher's
``data.DataConfig``, of ``blockllm_scale.BlockLLMConfig`` or of a baseline's own settings
(``blockllm_scale.baselines.GaloreConfig``, ``BadamConfig``); ``--help`` lists them with their defaults.
Memory and speed runs need no text: ``--dataset synthetic --vocab_size 32000`` (GaLore's vocabulary).
Metrics go to ``<out_dir>/metrics.jsonl`` (fields: ``blockllm_scale/launcher/metrics.py``), checkpoints to
``<out_dir>/checkpoints/`` (one at the end of every run, the newest --keep_checkpoints kept). One folder holds
one run: a fresh run into a folder that holds one is refused (``--resume auto`` continues it, ``--overwrite``
moves it aside). A summary ends every run, with the command that resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..baselines import BASELINES, BadamConfig, GaloreConfig
from ..config import BlockLLMConfig, ConfigError
from .data import DataConfig
from .models import MODEL_SIZES

BACKENDS = ("auto", "plain", "deepspeed", "fsdp2", "accelerate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-pure": torch.bfloat16}


def _help(text: str):
    return field(metadata={"help": text})


@dataclass
class TrainConfig:
    """How long, how fast and where to train."""

    model: str = field(default="tiny", metadata={"help": f"LLaMA size: {', '.join(MODEL_SIZES)}"})
    optimizer: str = field(default="blockllm", metadata={"help": "blockllm or a baseline: " + ", ".join(BASELINES)})
    steps: int = field(default=40, metadata={"help": "optimizer steps of the LR schedule"})
    stop_at_step: int = field(default=0, metadata={"help": "stop (with a checkpoint) at this step; 0: at --steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (AdamW)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this fraction of --lr"})
    dtype: str = field(default="fp32", metadata={"help": "fp32; bf16: bf16 weights and compute, the optimizer updating "
                       "fp32 copies of what it trains (BlockLLM: of its selected blocks only; DeepSpeed and FSDP2: their "
                       "own mixed precision); bf16-pure: bf16 weights updated in place, where small updates are "
                       "rounded away (plain backend; asked for explicitly)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    checkpoint_scoring_steps: bool = field(default=True, metadata={"help": "recompute activations on BlockLLM's "
                                           "scoring steps only (their full-depth backward is the memory peak "
                                           "without checkpointing); no effect with --activation_checkpointing "
                                           "or other optimizers"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N steps (and at the end); 0: never"})
    eval_batches: int = field(default=8, metadata={"help": "held-out micro-batches per evaluation"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps as well; 0: only at the end (of "
                            "--steps, --stop_at_step or --time_budget)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep this run's newest N checkpoints, deleting its "
                                  "older ones (never the newest, never another folder's); 0: write none, so the run "
                                  "cannot be resumed"})
    time_budget: float = field(default=0.0, metadata={"help": "seconds for this invocation: past them, stop with a "
                                                       "checkpoint (--resume auto continues); 0: no limit"})
    out_dir: str = field(default="runs/default", metadata={"help": "metrics.jsonl and checkpoints/ go here; one "
                         "run per folder: a fresh run into a folder that holds one is refused"})
    resume: str = field(default="", metadata={"help": "'auto': the newest intact checkpoint in --out_dir (none: start "
                        "fresh); or one checkpoint folder (<out_dir>/checkpoints/step_N)"})
    overwrite: bool = field(default=False, metadata={"help": "start over in an --out_dir that holds a run: its "
                            "metrics and checkpoints are moved (not deleted) into <out_dir>/replaced-<time>/"})
    seed: int = field(default=0, metadata={"help": "model init, data order and BlockLLM's random choices"})
    backend: str = field(default="auto", metadata={"help": "plain, deepspeed, fsdp2, accelerate; auto: from the launcher"})
    ds_config: str = field(default="", metadata={"help": "DeepSpeed JSON config (selects the deepspeed backend)"})
    device: str = field(default="", metadata={"help": "plain backend: cpu or cuda; none: cuda if there is one"})
    memory_snapshot: str = field(default="", metadata={"help": "CUDA: record every allocation of rank 0 and write "
                                 "a torch.cuda.memory snapshot (pickle) here at the end; open it at "
                                 "pytorch.org/memory_viz or list what is live at the peak with "
                                 "benchmarks/peak_breakdown.py"})

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stop_at_step", "warmup_steps", "eval_every", "save_every", "time_budget", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.model not in MODEL_SIZES:
            raise ValueError(f"--model must be one of {', '.join(MODEL_SIZES)}; got {self.model!r}")
        if self.optimizer != "blockllm" and self.optimizer not in BASELINES:
            raise ValueError(f"--optimizer must be blockllm or one of {', '.join(BASELINES)}; got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.ds_config and not Path(self.ds_config).is_file():
            raise ValueError(f"--ds_config: no such file {self.ds_config}")
        if self.save_every and not self.keep_checkpoints:
            raise ValueError(f"--save_every {self.save_every} with --keep_checkpoints 0: nothing would be kept")


# BlockLLM's seed is the run's --seed: one seed decides everything.
CONFIG_SECTIONS = {"train": (TrainConfig, ()), "data": (DataConfig, ()), "blockllm": (BlockLLMConfig, ("seed",)),
                   "galore": (GaloreConfig, ()), "badam": (BadamConfig, ())}


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and every flag's default after its help ("" shown as none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text  # BooleanOptionalAction adds its own "(default: ...)"
        return text + (" (default: none)" if action.default in ("", None) else " (default: %(default)s)")


def parse_args(argv: list[str] | None = None) -> dict:
    """One flag per dataclass field; returns {section: dataclass instance}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for section, (cls, skipped) in CONFIG_SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            if f.name in skipped:
                continue
            help_text = f.metadata.get("help", f"{section} setting (see {cls.__name__})")
            if f.type in ("bool", bool):
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            else:
                kind = {"int": int, "float": float}.get(str(f.type), str)
                group.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    args = vars(parser.parse_args(argv))
    sections = {}
    for section, (cls, skipped) in CONFIG_SECTIONS.items():
        values = {f.name: args[f.name] for f in dataclasses.fields(cls) if f.name not in skipped}
        if section == "blockllm":
            values["seed"] = args["seed"]
        try:
            sections[section] = cls(**values)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return sections


def settings_as_flags(settings: dict) -> list[str]:
    """Settings (e.g. ``PAPER_SETTINGS``) as this launcher's flags: ``--name value``; ``--name`` or
    ``--no-name`` for true or false."""
    argv = []
    for name, value in settings.items():
        argv += [f"--{name}" if value else f"--no-{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return argv


def resume_command(sections: dict) -> list[str]:
    """The flags of this run that differ from their defaults, then ``--resume auto``: the command line
    that continues it to --steps, whatever command line (or test) started it."""
    changed = {}
    for section, (cls, skipped) in CONFIG_SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = getattr(sections[section], f.name)
            if f.name in skipped or f.name in ("resume", "overwrite", "stop_at_step") or value == f.default:
                continue
            changed[f.name] = value
    return [*settings_as_flags(changed), "--resume", "auto"]
