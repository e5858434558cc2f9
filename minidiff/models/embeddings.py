"""Time and class embeddings of the UNets.

- ``get_timestep_embedding``: the sinusoidal features of the Transformer (Vaswani et al. 2017, Sec. 3.5) applied to
  the diffusion step, as the DDPM UNet does (Ho et al. 2020, Appendix B).
- ``GaussianFourierProjection``: random Fourier features of the noise level for score models (Song et al. 2021,
  "Score-Based Generative Modeling through SDEs", Appendix H; Tancik et al. 2020).
- ``TimestepEmbedding``: the MLP ``linear_1 -> act -> linear_2`` that turns those features into the vector each
  ResnetBlock2D receives.
- ``make_class_embedding``: the optional class embedding added to (or concatenated with) the time embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.configuration import check_choice
from minidiff.models.resnet import get_activation


def get_timestep_embedding(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """``[sin(t w_i), cos(t w_i)]`` with ``w_i = max_period^(-i / (half - downscale_freq_shift))``, i < half.

    ``flip_sin_to_cos`` puts the cosines first (Stable Diffusion); an odd ``embedding_dim`` gets a zero column.
    ``timesteps`` is 1-D (may be fractional); the result is float32 ``(N, embedding_dim)``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (one per sample), got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    angles = scale * (timesteps[:, None].float() * frequencies[None, :])  # (N, 1) * (1, half) -> (N, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (N, 2 half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if embedding_dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """``get_timestep_embedding`` as a (parameter-free) module, the UNets' ``time_proj``."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class GaussianFourierProjection(nn.Module):
    """``[sin(2 pi x W), cos(2 pi x W)]`` with fixed random ``W ~ N(0, scale^2)`` (Song et al. 2021, App. H).

    ``log=True`` embeds ``log(x)`` (UNet2DModel feeds the noise level sigma); ``flip_sin_to_cos`` puts cosines first.
    ``weight`` is a frozen parameter (it is in the checkpoint but not trained).
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, log: bool = True, flip_sin_to_cos: bool = False):
        super().__init__()
        # diffusers draws W twice (the first for a legacy alias it deletes); drawing twice too, a seed gives its W
        torch.randn(embedding_size)
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        angles = x[:, None] * self.weight[None, :] * 2 * math.pi  # (N, 1) * (1, E) -> (N, E)
        sin, cos = torch.sin(angles), torch.cos(angles)
        return torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2E)


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32):
    """LCM's embedding of the guidance weights ``w`` (B,): sinusoids of 1000 w at frequencies
    ``10000^(-k / (embedding_dim/2 - 1))``, ``[sin, cos]`` (Luo et al. 2023, Sec. 4.2; VDM's Fourier features),
    zero-padded to an odd ``embedding_dim``. (B,) -> (B, embedding_dim)."""
    half = embedding_dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (w * 1000.0).to(dtype)[:, None] * frequencies[None, :]  # (B, half)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, 2 * half)
    return F.pad(embedding, (0, 1)) if embedding_dim % 2 else embedding


class TimestepEmbedding(nn.Module):
    """``linear_2(act(linear_1(x)))`` (then ``post_act`` if given): features -> time embedding vector.

    ``cond_proj_dim``: a bias-free ``cond_proj`` adds a projected ``condition`` to the features first (LCM's
    guidance-scale embedding w, Luo et al. 2023, "Latent Consistency Models", Sec. 4.2)."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)  # (B, cond_proj_dim) -> (B, in_channels)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")


def check_class_embedding(class_embed_type: str | None, projection_input_dim: int | None) -> None:
    """``class_embed_type`` is known, and the projections have their input size."""
    check_choice("class_embed_type", class_embed_type, CLASS_EMBED_TYPES)
    if class_embed_type in ("projection", "simple_projection") and projection_input_dim is None:
        raise ValueError(f"class_embed_type={class_embed_type!r} needs projection_class_embeddings_input_dim")


def make_class_embedding(
    class_embed_type: str | None,
    num_class_embeds: int | None,
    time_embed_dim: int,
    timestep_input_dim: int,
    act_fn: str = "silu",
    projection_input_dim: int | None = None,
) -> nn.Module | None:
    """The ``class_embedding`` module of a UNet, or None when the model is not class-conditioned.

    - ``None`` with ``num_class_embeds``: a learned table of class vectors (``nn.Embedding``);
    - ``"timestep"``: labels are embedded like timesteps (sinusoids, then a ``TimestepEmbedding``);
    - ``"identity"``: the labels already are embedding vectors;
    - ``"projection"`` / ``"simple_projection"``: an MLP / a Linear from ``projection_input_dim`` features.
    """
    check_class_embedding(class_embed_type, projection_input_dim)
    if class_embed_type is None:
        return nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
    if class_embed_type == "timestep":
        return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
    if class_embed_type == "identity":
        return nn.Identity()
    if class_embed_type == "projection":
        return TimestepEmbedding(projection_input_dim, time_embed_dim)
    return nn.Linear(projection_input_dim, time_embed_dim)
