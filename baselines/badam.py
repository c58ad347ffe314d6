"""BAdam's ``BlockOptimizer`` (Luo et al., 2024; package ``badam``, an optional peer): block coordinate
descent over decoder layers, one layer trainable at a time, switched every ``switch_block_every`` steps
in ``switch_mode`` order. Embeddings and the LM head stay frozen (BAdam's defaults). BAdam keeps an fp32
master copy, fp32 gradients and fp32 Adam moments of the active layer; it expects bf16 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blockllm_scale.config import ConfigError

SWITCH_MODES = ("descending", "ascending", "random", "fixed")


@dataclass
class BadamConfig:
    switch_block_every: int = field(default=50, metadata={"help": "BAdam: steps between switches to the next layer"})
    switch_mode: str = field(default="descending", metadata={"help": f"BAdam: layer order, {', '.join(SWITCH_MODES)}"})

    def __post_init__(self) -> None:
        if isinstance(self.switch_block_every, bool) or not isinstance(self.switch_block_every, int) \
                or self.switch_block_every < 1:
            raise ConfigError(f"--switch_block_every must be an integer >= 1, got {self.switch_block_every!r}")
        if self.switch_mode not in SWITCH_MODES:
            raise ConfigError(f"--switch_mode must be one of {', '.join(SWITCH_MODES)}; got {self.switch_mode!r}")


def build_badam(model, lr, betas, eps, weight_decay, config: BadamConfig | None = None):
    try:
        from badam import BlockOptimizer
    except ImportError:
        raise ConfigError("--optimizer badam needs the optional package badam: "
                          "pip install 'blockllm-scale[peers]' (or badam==1.4)") from None
    config = config or BadamConfig()
    base = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                          switch_block_every=config.switch_block_every, switch_mode=config.switch_mode,
                          include_embedding=False, include_lm_head=False, verbose=0)
