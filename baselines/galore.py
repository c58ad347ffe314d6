"""GaLore (Zhao et al., 2024) from galore-torch: full-rank weights, gradients projected to a low rank.

The param groups are the paper's: the weights of the attention and MLP projections (the ``nn.Linear``
modules whose name contains "attn" or "mlp", GaLore's own rule) are projected with ``rank``,
``update_proj_gap``, ``scale`` and ``proj_type``; everything else (embeddings, LM head, norms) is a
plain Adam group. Three builders:

- ``galore``: GaLoreAdamW (CPU or CUDA).
- ``galore8bit``: GaLoreAdamW8bit, 8-bit moments. CUDA only (it calls ``torch.cuda.synchronize()``).
- ``galore8bit_layerwise``: the README's 7B recipe, one GaLoreAdamW8bit per projected weight (8-bit
  bitsandbytes AdamW for the rest) stepped inside backward (``in_backward.StepInBackward``). GaLore's
  script doubles update_proj_gap in this mode to undo a scheduler stepped twice per update; here each
  parameter's optimizer steps once per update, so update_proj_gap means the same in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blockllm_scale.config import ConfigError

from .in_backward import StepInBackward

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
TARGET_MODULES = ("attn", "mlp")


@dataclass
class GaloreConfig:
    """GaLore's projection settings (defaults: the paper's 60M-1B pre-training; its 7B recipe uses
    rank 1024, update_proj_gap 500)."""

    rank: int = field(default=128, metadata={"help": "GaLore: rank of the gradient projection"})
    update_proj_gap: int = field(default=200, metadata={"help": "GaLore: steps between projection updates (SVDs)"})
    scale: float = field(default=0.25, metadata={"help": "GaLore: scale of the projected-back update"})
    proj_type: str = field(default="std", metadata={"help": f"GaLore: {', '.join(PROJ_TYPES)}"})

    def __post_init__(self) -> None:
        for name in ("rank", "update_proj_gap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ConfigError(f"--scale must be a number > 0, got {self.scale!r}")
        if self.proj_type not in PROJ_TYPES:
            raise ConfigError(f"--proj_type must be one of {', '.join(PROJ_TYPES)}; got {self.proj_type!r}")


def galore_param_groups(model: torch.nn.Module, config: GaloreConfig) -> list[dict]:
    """[plain group, projected group]: trainable attention/MLP Linear weights go in the projected one."""
    projected = [module.weight for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and any(key in name for key in TARGET_MODULES)
                 and module.weight.requires_grad]
    chosen = {id(p) for p in projected}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    settings = dict(rank=config.rank, update_proj_gap=config.update_proj_gap, scale=config.scale,
                    proj_type=config.proj_type)
    return [group for group in ({"params": plain}, {"params": projected, **settings}) if group["params"]]


def build_galore(model, lr, betas, eps, weight_decay, config: GaloreConfig | None = None):
    from galore_torch import GaLoreAdamW

    groups = galore_param_groups(model, config or GaloreConfig())
    return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_deprecation_warning=True)


def build_galore8bit(model, lr, betas, eps, weight_decay, config: GaloreConfig | None = None):
    _require_cuda(model, "galore8bit")
    from galore_torch import GaLoreAdamW8bit

    groups = galore_param_groups(model, config or GaloreConfig())
    return GaLoreAdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_galore8bit_layerwise(model, lr, betas, eps, weight_decay, config: GaloreConfig | None = None):
    _require_cuda(model, "galore8bit_layerwise")
    import bitsandbytes as bnb
    from galore_torch import GaLoreAdamW8bit

    adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    per_parameter = []
    for group in galore_param_groups(model, config or GaloreConfig()):
        settings = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            inner = (GaLoreAdamW8bit([{"params": [param], **settings}], **adam) if settings
                     else bnb.optim.AdamW8bit([param], **adam))
            per_parameter.append((param, inner))
    return StepInBackward(per_parameter)


def _require_cuda(model: torch.nn.Module, name: str) -> None:
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ConfigError(f"--optimizer {name} needs CUDA (galore-torch's GaLoreAdamW8bit calls "
                          f"torch.cuda.synchronize()); the model is on {device.type}")
