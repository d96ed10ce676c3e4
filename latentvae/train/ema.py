"""An exponential moving average of the weights, as a few lines of `lerp_`.

The decay at the n-th update (n = 0 at the first) is `min(decay, (1 + n) / (10 + n))`: it warms up
from 0.1, so the random initial weights fade out quickly, and reaches `decay` after
`(10 * decay - 1) / (1 - decay)` updates (89 for 0.99, 989 for 0.999). This is the schedule of
diffusers' `EMAModel` (without `update_after_step`), written out so the checkpoint holds it plainly.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies (fp32) of a module's parameters, updated with `update(module)`."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.names = [n for n, _ in module.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in module.parameters()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in module.parameters()], weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> shadow tensor (the module's own key names)."""
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"EMA weights lack {missing[:3]}{'...' if len(missing) > 3 else ''}")
        wrong = [n for n, s in zip(self.names, self.shadow) if tensors[n].shape != s.shape]
        if wrong:
            raise ValueError(f"EMA weight {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model's is "
                           f"{tuple(self.shadow[self.names.index(wrong[0])].shape)}")
        # into copies of the live shadow (its device and memory layout), not views of the file
        self.shadow = [torch.empty_like(s).copy_(tensors[n]) for n, s in zip(self.names, self.shadow)]
        self.updates = updates
