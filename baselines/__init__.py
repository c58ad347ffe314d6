"""The optimizers BlockLLM is measured against, each a thin builder over its own library.

Every builder has one signature, ``build(model, lr, betas, eps, weight_decay) -> Optimizer``, so the
launcher, data and metrics are the same for all of them (``--optimizer NAME``). Builders with settings
of their own also take ``config=`` (a dataclass the launcher turns into flags; ``BASELINE_SECTIONS``
names the launcher section). The peers (BAdam, torchao's low-bit AdamW, GaLore's per-layer mode) are
optional: a missing package or device is a one-line ``ConfigError`` at build time.

Most optimizers step in ``backend.step()``; ``galore8bit_layerwise`` steps each parameter inside
backward (``in_backward.StepInBackward``: its ``step()`` is a no-op, see there).
"""

from .adamw import build_adamw
from .adamw8bit import build_adamw8bit
from .badam import BadamConfig, build_badam
from .galore import GaloreConfig, build_galore, build_galore8bit, build_galore8bit_layerwise
from .torchao_adamw import build_torchao_adamw4bit, build_torchao_adamw8bit

BASELINES = {
    "adamw": build_adamw,
    "adamw8bit": build_adamw8bit,
    "galore": build_galore,
    "galore8bit": build_galore8bit,
    "galore8bit_layerwise": build_galore8bit_layerwise,
    "torchao_adamw8bit": build_torchao_adamw8bit,
    "torchao_adamw4bit": build_torchao_adamw4bit,
    "badam": build_badam,
}

# Optimizer name -> the launcher config section whose dataclass its builder takes as ``config=``.
BASELINE_SECTIONS = {"galore": "galore", "galore8bit": "galore", "galore8bit_layerwise": "galore", "badam": "badam"}

__all__ = ["BASELINES", "BASELINE_SECTIONS", "BadamConfig", "GaloreConfig"]
