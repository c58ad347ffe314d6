"""Optimizers that step inside backward: one library optimizer per parameter, stepped by a
post-accumulate-grad hook the moment that parameter's gradient is complete, which then frees the
gradient. So at most a few gradients exist at any time instead of a full set (GaLore's "per-layer weight
updates", its README's recipe for a 7B model on one GPU; PyTorch's "optimizer step in backward" recipe).

How the launcher drives it, unchanged: ``backend.step()`` calls ``step()``, which does nothing (every
parameter was updated during backward), then the LR scheduler, then ``zero_grad``, which finds no
gradient left. The scheduler writes the learning rate into this wrapper's param groups (one per
parameter); each hook copies it into its parameter's optimizer before stepping. So step t uses the rate
the scheduler set after step t - 1, as with an ordinary optimizer.

What it cannot do: accumulate gradients over micro-batches (the hook would step on each one) or run
under a backend that owns the gradients (DDP, ZeRO, FSDP2). ``steps_in_backward = True`` tells the
launcher to refuse those with a one-line error.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from blockllm_scale.states import copy_hyperparameters


class StepInBackward(torch.optim.Optimizer):
    steps_in_backward = True

    def __init__(self, per_parameter: Sequence[tuple[torch.nn.Parameter, torch.optim.Optimizer]]):
        if not per_parameter:
            raise ValueError("StepInBackward: no parameters to optimize")
        groups = [{"params": [param], "lr": float(inner.param_groups[0]["lr"])} for param, inner in per_parameter]
        super().__init__(groups, defaults={})
        self.inner = [inner for _, inner in per_parameter]
        self._handles = [param.register_post_accumulate_grad_hook(self._step_and_free(index))
                         for index, (param, _) in enumerate(per_parameter)]

    def _step_and_free(self, index: int):
        def hook(param: torch.Tensor) -> None:
            inner = self.inner[index]
            for group in inner.param_groups:
                copy_hyperparameters(self.param_groups[index], group, ("lr",))
            inner.step()
            param.grad = None

        return hook

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing to do: the hooks stepped every parameter during backward."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def state_dict(self) -> dict[str, Any]:
        return {"lrs": [group["lr"] for group in self.param_groups],
                "inner": [inner.state_dict() for inner in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["inner"]) != len(self.inner):
            raise ValueError(f"StepInBackward.load_state_dict: saved for {len(state_dict['inner'])} parameters, "
                             f"this model has {len(self.inner)}")
        for group, lr in zip(self.param_groups, state_dict["lrs"]):
            group["lr"] = lr
        for inner, saved in zip(self.inner, state_dict["inner"]):
            inner.load_state_dict(saved)

    def remove_hooks(self) -> None:
        """Detach from the model (the parameters then keep their gradients again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
