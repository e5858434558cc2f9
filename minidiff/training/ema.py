"""EMAModel: an exponential moving average of a model's weights, the weights one samples from after training.

``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every optimizer step, with a decay that warms up as
``1 - (1 + n)^-power`` over the first updates (n = updates so far; the first update copies the weights) and is
capped at ``max_decay`` (diffusers' ``EMAModel(use_ema_warmup=True, inv_gamma=1)``; power 3/4 suits short runs,
2/3 long ones, Karras et al. 2022).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMAModel:
    def __init__(self, model: nn.Module, max_decay: float = 0.9999, power: float = 0.75):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # the averaged weights, a full model
        self.max_decay, self.power = max_decay, power
        self.num_updates = 0

    def decay(self) -> float:
        """The decay of the next update: 0 for the first (a copy), then ``min(max_decay, 1 - (1 + n)^-power)``."""
        if self.num_updates == 0:
            return 0.0
        return min(self.max_decay, 1.0 - (1.0 + self.num_updates) ** -self.power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.decay()
        for averaged, current in zip(self.model.parameters(), model.parameters()):
            averaged.lerp_(current.detach(), weight)  # averaged += (1 - decay) (current - averaged)
        for averaged, current in zip(self.model.buffers(), model.buffers()):
            averaged.copy_(current)
        self.num_updates += 1
