"""Scaled dot-product attention (Vaswani et al. 2017, Eq. 1): ``softmax(Q K^T * scale) V``, three ways.

All backends take ``q (B, heads, N, d)``, ``k, v (B, heads, M, d)`` and return ``(B, heads, N, d)``.
- ``math``: the formula written out; the readable reference.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused, what diffusers runs by default).
- ``chunked``: ``math`` over slices of queries, so the (N, M) score matrix never exists whole; memory stays
  bounded at any resolution (diffusers' "attention slicing").
``upcast=True`` computes scores and softmax in float32 (needed by SD 2.1-v in fp16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minidiff.ops.registry import current_backend, define_op, dispatch, register_backend

SCORE_BUDGET_BYTES = 64 * 2**20  # the chunked backend keeps each (B, h, rows, M) score block under this


def _expected(q, k, v, **_):
    return (*q.shape[:-1], v.shape[-1]), q.dtype


define_op("attention", default="sdpa", expected_output=_expected)


def math_attention(q, k, v, *, scale: float | None = None, upcast: bool = False, mask=None) -> torch.Tensor:
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    scores = (q * scale) @ k.transpose(-1, -2)  # (B, h, N, d) @ (B, h, d, M) -> (B, h, N, M)
    if mask is not None:
        scores += mask
    weights = scores.softmax(dim=-1).to(v.dtype)
    del scores  # free the scores before the weighted sum
    return (weights @ v).to(dtype)  # (B, h, N, M) @ (B, h, M, d) -> (B, h, N, d)


def sdpa_attention(q, k, v, *, scale: float | None = None, upcast: bool = False, mask=None) -> torch.Tensor:
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return math_attention(q, k, v, scale=scale, upcast=True, mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def chunk_rows(q: torch.Tensor, k: torch.Tensor, budget_bytes: int = SCORE_BUDGET_BYTES) -> int:
    """Query rows per slice so that one (B, h, rows, M) float32 score block fits in ``budget_bytes``."""
    bytes_per_row = q.shape[:-2].numel() * k.shape[-2] * 4
    return max(1, budget_bytes // bytes_per_row)


def chunked_attention(q, k, v, *, scale=None, upcast=False, mask=None, chunk_size: int | None = None) -> torch.Tensor:
    """``math`` over slices of ``chunk_size`` query rows (default: sized by ``SCORE_BUDGET_BYTES``)."""
    chunk_size = chunk_size or chunk_rows(q, k)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)  # (B, h, N, d)
    for start in range(0, q.shape[-2], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_mask = None if mask is None else mask[..., rows, :] if mask.shape[-2] > 1 else mask
        out[..., rows, :] = math_attention(q[..., rows, :], k, v, scale=scale, upcast=upcast, mask=chunk_mask)
    return out


register_backend("attention", "math", math_attention, builtin=True)
register_backend("attention", "sdpa", sdpa_attention, builtin=True)
register_backend("attention", "chunked", chunked_attention, builtin=True)


def attention(q, k, v, *, scale=None, upcast=False, mask=None, backend: str | None = None,
              chunk_size: int | None = None) -> torch.Tensor:
    """Attention through the seam; ``backend`` is a per-model choice that a ``use_backend`` block overrides.

    ``chunk_size`` (query rows per slice) is a per-model setting of the ``chunked`` backend; other backends ignore it.
    """
    if chunk_size is not None and current_backend("attention", backend) == "chunked":
        return dispatch("attention", backend, q, k, v, scale=scale, upcast=upcast, mask=mask, chunk_size=chunk_size)
    return dispatch("attention", backend, q, k, v, scale=scale, upcast=upcast, mask=mask)
