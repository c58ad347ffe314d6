"""fp32 master weights for a baseline optimizer stepping bf16 parameters (the launcher's ``--dtype bf16``).

Why: in bf16 an AdamW step of 1e-3 on a weight near 1.0 (an RMSNorm gain) is below half of bf16's spacing
there (2^-8) and is rounded away; late in a cosine schedule updates to most weights are. Mixed precision as
DeepSpeed's and FSDP2's bf16 modes do it: the optimizer updates fp32 copies, and each step rounds them into
the bf16 weights that forward and backward use. BlockLLM keeps such copies of its selected blocks only
(its ``weight_update`` setting); a baseline keeps them of every parameter it trains.
"""

from __future__ import annotations

import torch


class Fp32MasterWeights(torch.optim.Optimizer):
    """Wraps an optimizer built over bf16/fp16 parameters: it steps fp32 copies of them instead.

    The wrapped optimizer's ``param_groups`` (and so LR schedulers) are shared; its state is keyed by the
    fp32 copies, which ``state_dict`` saves so that a resumed run continues exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if any(optimizer.state.values()):
            raise ValueError("Fp32MasterWeights: wrap the optimizer before its first step")
        self.optimizer = optimizer
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bf16 parameter, its fp32 copy)
        for group in optimizer.param_groups:
            masters = []
            for param in group["params"]:
                if param.dtype in (torch.bfloat16, torch.float16):
                    master = param.detach().float()
                    self.pairs.append((param, master))
                    masters.append(master)
                else:
                    masters.append(param)
            group["params"] = masters
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    # Read through, never copied: the wrapped optimizer's load_state_dict replaces its param_groups list, and a
    # copy kept here would leave LR schedulers writing to groups it no longer reads.
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def step(self, closure=None):
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None  # the fp32 copy replaces it
        loss = self.optimizer.step(closure)
        for param, master in self.pairs:
            param.copy_(master)
            master.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param, _ in self.pairs:
            param.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "masters": [master for _, master in self.pairs]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        with torch.no_grad():
            for (param, master), saved in zip(self.pairs, state_dict["masters"]):
                master.copy_(saved)
                param.copy_(saved)
