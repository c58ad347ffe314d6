"""BlockLLM's settings: one validated dataclass, the single home for them in Python, JSON and YAML."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

GRANULARITIES = ("parameter", "layer")
VARIANTS = ("approximate", "masked")
STRATEGIES = ("norm_over_visits", "norm", "random")
EMBEDDINGS = ("candidate", "always", "never")
STATES = ("fp32", "bnb_8bit", "torchao_8bit")


class ConfigError(ValueError):
    """A user's configuration mistake: entry points print its message as one line, no traceback."""


@dataclass
class BlockLLMConfig:
    """What BlockLLM trains and when it changes its mind.

    sparsity: fraction s of parameters left frozen each step; (1 - s) * n are trained. 0 trains all.
    patience: m, the loss-history window of the reselection rule.
    granularity: "parameter" selects single tensors; "layer" whole decoder layers.
    variant: "approximate" trains whole selected blocks (Appendix D, the paper's default);
        "masked" also trims them to exactly (1 - s) * n entries by gradient magnitude.
    strategy: "norm_over_visits" (the paper), "norm" and "random" (the Appendix E.5 ablations).
    embeddings: token embeddings / lm_head are "candidate"s like any block, trained "always"
        (outside the budget, like GaLore leaves them unprojected), or "never" trained.
    states: Adam moments of the selected block in fp32 ("fp32"), 8-bit bitsandbytes ("bnb_8bit")
        or 8-bit torchao ("torchao_8bit", the one that works on FSDP2's DTensors).
    seed: seeds the random strategy; never the global RNG, so every rank decides alike.
    step_in_backward: step each trained tensor inside backward, the moment its gradient is ready,
        and free that gradient at once (as GaLore's per-layer mode): the peak then holds one
        gradient instead of the whole block's. Single process, no gradient accumulation.
    """

    sparsity: float = 0.9
    patience: int = 50
    granularity: str = "parameter"
    variant: str = "approximate"
    strategy: str = "norm_over_visits"
    embeddings: str = "always"
    states: str = "fp32"
    seed: int = 0
    step_in_backward: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ConfigError(f"patience must be an integer >= 1, got {self.patience!r}")
        for name, allowed in (
            ("granularity", GRANULARITIES),
            ("variant", VARIANTS),
            ("strategy", STRATEGIES),
            ("embeddings", EMBEDDINGS),
            ("states", STATES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

        if not isinstance(self.step_in_backward, bool):
            raise ConfigError(f"step_in_backward must be true or false, got {self.step_in_backward!r}")
        if self.step_in_backward and self.variant == "masked":
            raise ConfigError("step_in_backward works with variant='approximate' only (masks need the whole step)")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> "BlockLLMConfig":
        """Build from a JSON/YAML section; an unknown (e.g. misspelt) key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"unknown BlockLLM setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        return cls(**settings)
