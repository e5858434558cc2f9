"""GEGLU gating (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6): ``GEGLU(x) = (x W) * GELU(x V)``.

The projection ``x -> [x W, x V]`` is a Linear layer of the model (it holds weights); this op is the gating that
follows it, a second swappable op of the kernel seam next to attention. Input ``(..., 2 * inner)``: the first half
is the value, the second half the gate. Output ``(..., inner)``. GELU is the exact (erf) one, as in diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minidiff.ops.registry import define_op, dispatch, register_backend


def _expected(x, **_):
    return (*x.shape[:-1], x.shape[-1] // 2), x.dtype


define_op("geglu", default="torch", expected_output=_expected)


def torch_geglu(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.chunk(2, dim=-1)  # (..., 2 inner) -> 2 x (..., inner)
    if x.requires_grad:
        return value * F.gelu(gate)
    # inference: the product lands in GELU's fresh buffer, so the peak holds x and one (..., inner) buffer, not two
    # (at SD's 128x128 latents that is 160 MiB less); the same values, as float multiplication commutes
    return F.gelu(gate).mul_(value)


register_backend("geglu", "torch", torch_geglu, builtin=True)


def geglu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """GEGLU through the seam (``ops.use_backend("geglu", name)`` swaps the kernel)."""
    if x.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dimension (value and gate halves), got shape {tuple(x.shape)}")
    return dispatch("geglu", backend, x)
