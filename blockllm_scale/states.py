"""Where the Adam moments of the selected block live: an AdamW from torch, bitsandbytes or torchao.

BlockLLM delegates the Adam arithmetic to a library optimizer that holds only the selected
parameters, and rebuilds it at every block switch; this module picks that optimizer and reports what
its state really is (dtype and element count), measured on the live tensors rather than assumed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

# The AdamW hyperparameters every param group carries, copied from BlockLLM's groups into the optimizers that
# hold the trained blocks (BlockLLM's own, or a backend's).
ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")


def build_adam(states: str, param_groups: list[dict[str, Any]], stochastic_rounding: bool = False) -> torch.optim.Optimizer:
    """An AdamW over ``param_groups`` whose moments are stored as ``states`` says.

    ``stochastic_rounding``: bf16 parameters receive their update rounded stochastically (torchao's AdamW
    computes it in fp32 and rounds up or down with the probability of the remainder), so that updates
    below half a bf16 step still move the weights on average; no fp32 copy is kept.
    """
    if stochastic_rounding:
        from torchao.optim import AdamW8bit, _AdamW

        if states == "bnb_8bit":
            raise ValueError("stochastic rounding needs torchao's AdamW: states fp32 or torchao_8bit")
        return (AdamW8bit if states == "torchao_8bit" else _AdamW)(param_groups, bf16_stochastic_round=True)
    if states == "fp32":
        return torch.optim.AdamW(param_groups)
    if states == "bnb_8bit":
        return _bnb_adamw8bit_without_waits()(param_groups)
    if states == "torchao_8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(param_groups)
    raise ValueError(f"states must be one of fp32, bnb_8bit, torchao_8bit; got {states!r}")


@functools.cache
def _bnb_adamw8bit_without_waits() -> type:
    """bitsandbytes' AdamW8bit, minus the wait for the GPU after each tensor.

    Its ``step()`` calls ``torch.cuda.synchronize()`` after every tensor's update; only its paged states need
    that. Stepped inside backward (step_in_backward), each wait stalls the host, and at 7B with batch 4 the host
    sets the pace (it launches ~5k kernels a step): 17 waits a step there (benchmarks/profile_steps.py). The
    update kernels and their order are bitsandbytes' own, so results are bit-identical (tests/unit/test_optim.py).
    """
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit


def copy_hyperparameters(source: dict[str, Any], target: dict[str, Any], keys) -> None:
    """Copy ``keys`` of an outer param group into an inner optimizer's group. torchao keeps ``lr``
    as a tensor and refuses a float in its place, so a tensor value is updated in place."""
    for key in keys:
        if torch.is_tensor(target.get(key)):
            target[key].fill_(source[key])
        else:
            target[key] = source[key]


def _state_tensors(optimizer: torch.optim.Optimizer):
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, DTensor):
                value = value.to_local()  # FSDP2: this rank's shard (torchao's 8-bit codes live inside)
            if torch.is_tensor(value):
                # Scalars such as the step count are no moments. (Every tensor has .dequantize, so
                # the test below must not see them.) torchao's OptimState8bit is a tensor subclass.
                if value.numel() > 1:
                    yield value
            elif hasattr(value, "dequantize") or type(value).__name__.startswith("OptimState"):
                yield value  # torchao's quantized subclasses


def state_numel(optimizer: torch.optim.Optimizer | None) -> int:
    """Elements held in moment tensors on this rank (scalars such as the step count excluded)."""
    if optimizer is None:
        return 0
    return sum(t.numel() for t in _state_tensors(optimizer))


def state_numel_by_dtype(optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Moment elements per storage dtype, e.g. {"torch.uint8": 1048576, "torch.float32": 8448}: shows
    how much of an 8-bit setting fell back to fp32 (small tensors), besides the 8-bit codes' scales."""
    found: dict[str, int] = {}
    for t in _state_tensors(optimizer) if optimizer is not None else ():
        inner = getattr(t, "codes", None)  # torchao keeps the 8-bit codes in .codes
        key = str(inner.dtype if inner is not None else t.dtype)
        found[key] = found.get(key, 0) + t.numel()
    return found


def state_dtypes(optimizer: torch.optim.Optimizer | None) -> set[str]:
    """Storage dtypes of the moment tensors, e.g. {"torch.float32"} or {"torch.uint8"}."""
    if optimizer is None:
        return set()
    found = set()
    for t in _state_tensors(optimizer):
        inner = getattr(t, "codes", None)  # torchao keeps the 8-bit codes in .codes
        found.add(str(inner.dtype if inner is not None else t.dtype))
    return found
