"""BlockLLM's settings: one validated dataclass, the single home for them in Python, JSON and YAML."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

GRANULARITIES = ("parameter", "layer")
VARIANTS = ("approximate", "masked")
STRATEGIES = ("norm_over_visits", "rms_over_visits", "norm", "random")
EMBEDDINGS = ("candidate", "always", "never")
STATES = ("fp32", "bnb_8bit", "torchao_8bit")
WEIGHT_UPDATES = ("fp32_master", "stochastic_rounding", "round_to_nearest")


# The paper's own rule (§2, Algorithms 1-2, Appendix E.3), as the reproduction runs it: single tensors ranked by
# raw ||G|| / visits, every tensor a candidate, no block warm-up. ``BlockLLM(params, **PAPER_SETTINGS)``.
PAPER_SETTINGS = {"granularity": "parameter", "strategy": "norm_over_visits", "embeddings": "candidate",
                  "patience": 50, "block_warmup_steps": 0, "row_ranges": False}


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
    strategy: "norm_over_visits" (the paper: ||G|| / visits), "rms_over_visits" (||G|| / sqrt(numel) / visits:
        the gradient's root mean square, so that tensor types whose raw norms differ ~50x compete on equal
        terms), "norm" and "random" (the Appendix E.5 ablations).
    embeddings: token embeddings / lm_head are "candidate"s like any block, trained "always", or "never"
        trained. "always" counts against the budget too: sparsity s trains (1 - s) n parameters in all.
    states: Adam moments of the selected block in fp32 ("fp32"), 8-bit bitsandbytes ("bnb_8bit")
        or 8-bit torchao ("torchao_8bit", the one that works on FSDP2's DTensors).
    block_warmup_steps: a block's learning rate ramps up linearly over its first steps after it is
        selected (its Adam moments start from zero then, as at step 0 of AdamW, which warms up for the
        same reason); 0: full learning rate at once.
    weight_update: how the update reaches parameters stored in bf16/fp16. "fp32_master": the trained
        blocks (only those) keep an fp32 copy that Adam updates, rounded into the weights after each
        step; "stochastic_rounding": the update is rounded stochastically into the bf16 weights
        (torchao's AdamW, no extra memory); "round_to_nearest": plain bf16 arithmetic, where updates
        smaller than half a bf16 step (2^-9 relative) are lost. fp32 parameters are updated exactly
        either way.
    row_ranges: a candidate matrix larger than the whole budget (LLaMA-60M's embeddings at s=0.9) is trained
        a range of its rows at a time, within the budget (variant "approximate", when BlockLLM steps itself:
        not under DeepSpeed or FSDP2, which step whole tensors). False: whole, as the paper, which then trains
        it alone, over the budget.
    seed: seeds the random strategy; never the global RNG, so every rank decides alike.
    step_in_backward: step each trained tensor inside backward, the moment its gradient is ready,
        and free that gradient at once (as GaLore's per-layer mode): the peak then holds one
        gradient instead of the whole block's. Single process, no gradient accumulation.
    """

    sparsity: float = 0.9
    patience: int = 50
    granularity: str = "layer"
    variant: str = "approximate"
    strategy: str = "norm_over_visits"
    embeddings: str = "candidate"
    states: str = "fp32"
    block_warmup_steps: int = 0
    weight_update: str = "fp32_master"
    row_ranges: bool = True
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
            ("weight_update", WEIGHT_UPDATES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

        if isinstance(self.block_warmup_steps, bool) or not isinstance(self.block_warmup_steps, int) \
                or self.block_warmup_steps < 0:
            raise ConfigError(f"block_warmup_steps must be an integer >= 0, got {self.block_warmup_steps!r}")
        if self.weight_update == "stochastic_rounding" and self.states == "bnb_8bit":
            raise ConfigError("weight_update='stochastic_rounding' steps with torchao's AdamW: use states='fp32' "
                              "or 'torchao_8bit' (bitsandbytes has no stochastic rounding)")
        for name in ("step_in_backward", "row_ranges"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
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
