"""Where ``accelerate launch`` started this process, read from the environment it sets: what the HF Trainer
adapter (``hf.py``) and the launcher's accelerate backend both need to know. Imports nothing of accelerate."""

from __future__ import annotations

import os
from typing import Mapping


def launched_by_accelerate(env: Mapping[str, str] = os.environ) -> bool:
    """``accelerate launch`` always sets ACCELERATE_MIXED_PRECISION; the plugin flags cover torchrun
    with accelerate's variables set by hand (``ACCELERATE_USE_CPU=true torchrun ...``)."""
    return any(key in env for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def flag(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def launched_with_fsdp(env: Mapping[str, str] = os.environ) -> bool:
    """True under ``accelerate launch`` with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return flag(env.get("ACCELERATE_USE_FSDP"))
