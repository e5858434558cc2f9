"""LoRA file formats (being written for issue 12). The shared record every format is read into:"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRAWeights:
    """One LoRA target: ``W' = W + scale * (alpha / rank) * up @ down`` (Hu et al. 2021, Eq. 3).

    ``down`` is (rank, in_features) for a Linear, (rank, in_channels, kh, kw) for a Conv2d; ``up`` is
    (out_features, rank) or (out_channels, rank, 1, 1). ``alpha`` None means alpha = rank (scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]
