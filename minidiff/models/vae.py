"""AutoencoderKL: the KL-regularised autoencoder that maps images to Stable Diffusion's latents and back.

Latent Diffusion (Rombach et al. 2022, Sec. 3.1) runs diffusion in the latent space of an autoencoder trained once:
the encoder turns a (B, 3, H, W) image into a diagonal Gaussian over (B, 4, H/8, W/8) latents, regularised towards
N(0, I) by a small KL term as in a VAE (Kingma & Welling 2014), and the decoder maps latents back to pixels.
Pipelines multiply latents by ``config.scaling_factor`` (0.18215 for SD 1/2) so they have roughly unit variance.

Layout (diffusers' state_dict keys): ``encoder.{conv_in, down_blocks.i, mid_block, conv_norm_out, conv_out}``,
``quant_conv``, ``post_quant_conv``, ``decoder.{conv_in, mid_block, up_blocks.i, conv_norm_out, conv_out}``.
The residual blocks, resamplers and the mid-block attention are the UNet's (``resnet.py``, ``unet_blocks.py``),
built without a time embedding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from minidiff.configuration import Config, check_choice
from minidiff.models.attention import AttentionBackendMixin
from minidiff.models.checks import (
    check_groups_divide,
    check_input_dtype,
    check_ints,
    check_not_empty,
    check_positive_floats,
    check_sample_size,
    fail,
)
from minidiff.models.modeling import ModelMixin
from minidiff.models.resnet import ACTIVATIONS, Upsample2D, activate_temporary
from minidiff.models.unet_blocks import DownBlock2D, ResnetOptions, UNetMidBlock2D
from minidiff.outputs import BaseOutput
from minidiff.random import Generator, randn_tensor

VAE_EPS = 1e-6  # every GroupNorm of the VAE


@dataclass
class AutoencoderKLConfig(Config):
    """diffusers' AutoencoderKL config keys and defaults. ``scaling_factor``, ``shift_factor``,
    ``latents_mean/std`` and ``force_upcast`` are read by pipelines, not by the network."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))), from moments (B, 2 * latent, h, w).

    ``logvar`` is clamped to [-30, 20] (as LDM/diffusers) so ``std`` neither underflows nor overflows.
    With ``deterministic=True`` the distribution collapses to its mean (std = var = 0, KL = NLL = 0).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, 2L, h, w) -> 2 x (B, L, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014, Eq. 10).
        ``eps`` is drawn as diffusers draws it (``randn_tensor``), so a seed gives the same latents."""
        eps = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                           dtype=self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) per sample (B,), summed over (C, h, w); ``other=None`` means N(0, I):
        0.5 * sum(mean^2 + var - 1 - logvar) (Kingma & Welling 2014, Appendix B)."""
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``: 0.5 * sum(log(2 pi) + logvar + (x - mean)^2 / var)."""
        if self.deterministic:
            return torch.Tensor([0.0])
        return 0.5 * torch.sum(np.log(2.0 * np.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))


@dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class DownEncoderBlock2D(DownBlock2D):
    """The UNet's DownBlock2D without time embedding or skip outputs: resnets, then (except at the last level) a
    stride-2 conv after an asymmetric one-pixel pad (``downsample_padding=0``, the LDM encoder's layout)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resnet: ResnetOptions,
                 add_downsample: bool):
        super().__init__(in_channels, out_channels, num_layers, resnet, "conv" if add_downsample else None,
                         downsample_padding=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states)[0]


class UpDecoderBlock2D(nn.Module):
    """Resnets (the first maps ``in_channels`` to ``out_channels``), then (except at the last level) nearest x2
    upsampling and a 3x3 conv. Unlike the UNet's UpBlock2D there are no skip connections."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resnet: ResnetOptions,
                 add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            resnet.block(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)  # (B, C, h, w) -> (B, C, 2h, 2w)
        return hidden_states


class _CoderBase(nn.Module):
    """What Encoder and Decoder share: ``conv_in``, a mid block (resnet, 1-head self-attention, resnet) at the
    lowest resolution, and the output head GroupNorm -> SiLU -> 3x3 ``conv_out``. Subclasses add their blocks
    (``build_blocks``, called before the mid block when ``blocks_first``, after it otherwise: diffusers' creation
    order, so a seed gives its initial weights) and say in which order the stages run."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels, stem_channels: int,
                 head_channels: int, resnet: ResnetOptions, mid_block_add_attention: bool,
                 build_blocks: Callable[[], None], blocks_first: bool):
        super().__init__()
        bottom = block_out_channels[-1]
        self.conv_in = nn.Conv2d(in_channels, stem_channels, kernel_size=3, padding=1)
        if blocks_first:
            build_blocks()
        self.mid_block = UNetMidBlock2D(bottom, resnet, attention_head_dim=bottom,  # one head over all channels
                                        add_attention=mid_block_add_attention)
        if not blocks_first:
            build_blocks()
        self.conv_norm_out = nn.GroupNorm(resnet.groups, head_channels, eps=VAE_EPS)
        self.conv_act = nn.SiLU()  # always SiLU, whatever act_fn the resnets use (as diffusers)
        self.conv_out = nn.Conv2d(head_channels, out_channels, kernel_size=3, padding=1)

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(sample)
        for stage in self.stages():
            hidden_states = stage(hidden_states)
        return self.conv_out(activate_temporary(self.conv_act, self.conv_norm_out(hidden_states)))


def _check_block_types(option: str, block_types, accepted: str) -> None:
    for i, block_type in enumerate(block_types):
        check_choice(f"{option}[{i}]", block_type, [accepted])


class Encoder(_CoderBase):
    """(B, in, H, W) -> (B, 2 * out, H / 2^(levels-1), W / 2^(levels-1)) (mean and log-variance when ``double_z``)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, down_block_types=("DownEncoderBlock2D",),
                 block_out_channels=(64,), layers_per_block: int = 2, norm_num_groups: int = 32,
                 act_fn: str = "silu", double_z: bool = True, mid_block_add_attention: bool = True):
        _check_block_types("down_block_types", down_block_types, "DownEncoderBlock2D")
        resnet = ResnetOptions(temb_channels=None, groups=norm_num_groups, eps=VAE_EPS, act_fn=act_fn)
        levels = len(block_out_channels)

        def build_blocks() -> None:
            self.down_blocks = nn.ModuleList(
                DownEncoderBlock2D(block_out_channels[max(i - 1, 0)], block_out_channels[i], layers_per_block,
                                   resnet, add_downsample=i < levels - 1)
                for i in range(levels)
            )

        super().__init__(in_channels, 2 * out_channels if double_z else out_channels, block_out_channels,
                         stem_channels=block_out_channels[0], head_channels=block_out_channels[-1], resnet=resnet,
                         mid_block_add_attention=mid_block_add_attention, build_blocks=build_blocks,
                         blocks_first=True)

    def stages(self) -> list[nn.Module]:
        return [*self.down_blocks, self.mid_block]


class Decoder(_CoderBase):
    """(B, in, h, w) -> (B, out, h * 2^(levels-1), w * 2^(levels-1)); each up block has ``layers_per_block + 1``
    resnets, channels run through ``block_out_channels`` in reverse."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, up_block_types=("UpDecoderBlock2D",),
                 block_out_channels=(64,), layers_per_block: int = 2, norm_num_groups: int = 32,
                 act_fn: str = "silu", mid_block_add_attention: bool = True):
        _check_block_types("up_block_types", up_block_types, "UpDecoderBlock2D")
        resnet = ResnetOptions(temb_channels=None, groups=norm_num_groups, eps=VAE_EPS, act_fn=act_fn)
        channels = list(reversed(block_out_channels))

        def build_blocks() -> None:
            self.up_blocks = nn.ModuleList(
                UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], layers_per_block + 1, resnet,
                                 add_upsample=i < len(channels) - 1)
                for i in range(len(channels))
            )

        super().__init__(in_channels, out_channels, block_out_channels, stem_channels=block_out_channels[-1],
                         head_channels=block_out_channels[0], resnet=resnet,
                         mid_block_add_attention=mid_block_add_attention, build_blocks=build_blocks,
                         blocks_first=False)

    def stages(self) -> list[nn.Module]:
        return [self.mid_block, *self.up_blocks]


def blend_overlap(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade, in place, the first ``extent`` rows (dim 2) or columns (dim 3) of ``tile`` from the last ones of
    its neighbour ``previous``: weight ``k / extent`` on the tile at offset k, ``1 - k / extent`` on the neighbour."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    ramp = torch.arange(extent, device=tile.device, dtype=tile.dtype) / extent  # (extent,)
    ramp = ramp[:, None] if dim == 2 else ramp  # broadcast over columns (dim 2) or rows (dim 3)
    head = tile.narrow(dim, 0, extent)
    head.copy_(previous.narrow(dim, previous.shape[dim] - extent, extent) * (1 - ramp) + head * ramp)


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, in_tile: int, out_tile: int,
              overlap_factor: float) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``in_tile``-sized tiles of ``x`` and stitch the ``out_tile``-sized results, as
    diffusers' tiled encode/decode: tiles start every ``in_tile * (1 - overlap)`` pixels, each result is blended
    with its upper and left neighbours (already blended, in raster order), then cropped to the stride."""
    stride = int(in_tile * (1 - overlap_factor))
    extent = int(out_tile * overlap_factor)
    keep = out_tile - extent
    grid = [[fn(x[:, :, top:top + in_tile, left:left + in_tile]) for left in range(0, x.shape[3], stride)]
            for top in range(0, x.shape[2], stride)]
    for i, row in enumerate(grid):
        for j, tile in enumerate(row):
            if i > 0:
                blend_overlap(grid[i - 1][j], tile, extent, dim=2)
            if j > 0:
                blend_overlap(row[j - 1], tile, extent, dim=3)
    rows = [torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3) for row in grid]
    return torch.cat(rows, dim=2)  # (B, C, H_out, W_out)


# Attention keys of diffusers checkpoints saved before 0.14 (the VAE mid block's "AttentionBlock")
_DEPRECATED_ATTENTION_KEY = re.compile(r"^(.*mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` (likewise key, value, proj_attn)."""
    def rename(key: str) -> str:
        match = _DEPRECATED_ATTENTION_KEY.match(key)
        if match is None:
            return key
        path, name, kind = match.groups()
        return f"{path}.{_DEPRECATED_ATTENTION_NAMES[name]}.{kind}"
    return {rename(key): value for key, value in state_dict.items()}


class AutoencoderKL(ModelMixin, AttentionBackendMixin):
    """``vae.encode(images).latent_dist`` (a DiagonalGaussianDistribution) and ``vae.decode(latents).sample``.

    ``enable_slicing()`` runs a batch one image at a time; ``enable_tiling()`` encodes/decodes images larger than
    ``tile_sample_min_size`` (latents larger than ``tile_latent_min_size``) in overlapping, blended tiles, so memory
    stays bounded at any resolution (the result differs slightly from untiled, exactly as diffusers' does).
    """

    config_class = AutoencoderKLConfig

    def __init__(self, **kwargs: Any):
        super().__init__()
        c = self.register_config(kwargs)
        self._check_config(c)
        shared = dict(block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                      norm_num_groups=c.norm_num_groups, act_fn=c.act_fn,
                      mid_block_add_attention=c.mid_block_add_attention)
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.down_block_types, double_z=True, **shared)
        self.decoder = Decoder(c.latent_channels, c.out_channels, c.up_block_types, **shared)
        moments = 2 * c.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, kernel_size=1) if c.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(c.latent_channels, c.latent_channels, kernel_size=1) if c.use_post_quant_conv else None
        )
        self.use_slicing = False
        self.use_tiling = False
        sample_size = c.sample_size[0] if isinstance(c.sample_size, (list, tuple)) else c.sample_size
        self.tile_sample_min_size = sample_size
        self.tile_latent_min_size = int(sample_size / 2 ** (len(c.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25
        self.to(memory_format=torch.channels_last)  # NHWC weights and activations: see ModelMixin

    @staticmethod
    def _check_config(c: AutoencoderKLConfig) -> None:
        check_choice("act_fn", c.act_fn.lower() if isinstance(c.act_fn, str) else c.act_fn, ACTIVATIONS)
        check_not_empty(c, "block_out_channels")
        _check_block_types("down_block_types", c.down_block_types, "DownEncoderBlock2D")
        _check_block_types("up_block_types", c.up_block_types, "UpDecoderBlock2D")
        levels = len(c.block_out_channels)
        for option in ("down_block_types", "up_block_types"):
            if len(c[option]) != levels:
                raise ValueError(
                    f"{option} has {len(c[option])} entries but block_out_channels has {levels}; give one per level"
                )
        check_ints(c, "in_channels", "out_channels", "latent_channels", "block_out_channels", "norm_num_groups",
                   "layers_per_block")
        check_groups_divide(c)
        check_sample_size(c)
        check_positive_floats(c, "scaling_factor")
        if c.shift_factor is not None and not math.isfinite(c.shift_factor):
            fail("shift_factor", c.shift_factor, "must be a finite number", "set shift_factor to a number or null")
        for key in ("latents_mean", "latents_std"):
            values = c[key]
            if values is not None and (len(values) != c.latent_channels or not all(map(math.isfinite, values))
                                       or (key == "latents_std" and min(values) <= 0)):
                fail(key, values, f"needs {c.latent_channels} (latent_channels) finite numbers"
                     + (", all > 0" if key == "latents_std" else ""), "give one value per latent channel or null")

    # -- slicing / tiling switches (diffusers' names) --
    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        """Tiles are ``sample_size`` pixels; each must keep at least 2 latent pixels to overlap and blend."""
        if self.tile_latent_min_size < 2:
            smallest = 2 ** len(self.config.block_out_channels)
            fail("sample_size", self.config.sample_size, f"tiles of {self.tile_sample_min_size} pixels are "
                 f"{self.tile_latent_min_size} latent pixels, too small to blend", f"use sample_size >= {smallest}")
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rename_deprecated_attention_keys(state_dict)

    def _check_input(self, method: str, name: str, x: torch.Tensor, channels: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"AutoencoderKL.{method} expects {name} of shape (B, {channels}, H, W), got {got}")
        check_input_dtype(name, x, self.dtype)

    def _check_size(self, method: str, name: str, x: torch.Tensor) -> None:
        """Raise, naming the fix, where torch would fail deep inside: a map downsampled below 1 pixel, or a GroupNorm
        group holding a single value (one channel per group on a 1x1 map) cannot be normalised. torch raises for the
        latter only at batch 1; at larger batches it silently returns the bias, erasing the image, so refuse both."""
        groups, height, width = self.config.norm_num_groups, *x.shape[-2:]
        # down block i runs at (H >> i, W >> i) on block_out_channels[i - 1 .. i]; up block i at (h << i, w << i) on
        # the reversed channels[i - 1 .. i]
        encoding = method == "encode"
        channels = list(self.config.block_out_channels if encoding else reversed(self.config.block_out_channels))
        safe_side = 1 << len(channels) if encoding else 2  # lowest level at least 2x2
        for i in range(len(channels)):
            level_height, level_width = (height >> i, width >> i) if encoding else (height << i, width << i)
            per_group = min(channels[max(i - 1, 0)], channels[i]) // groups
            if level_height * level_width * per_group <= 1:
                raise ValueError(
                    f"AutoencoderKL.{method}: {name} of {height}x{width} are too small for this VAE: they reach a "
                    f"{level_height}x{level_width} level with {per_group} channel(s) per GroupNorm group, fewer than "
                    f"two values to normalise; use {name} of at least {safe_side}x{safe_side}"
                )

    def _per_sample(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn(x)``, or ``fn`` on one batch element at a time when slicing is enabled."""
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(one) for one in x.split(1)])
        return fn(x)

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, 2 * latent, H / f, W / f): mean and log-variance of q(z|x)."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return run_tiled(self._encode_moments_whole, x, self.tile_sample_min_size, self.tile_latent_min_size,
                             self.tile_overlap_factor)
        return self._encode_moments_whole(x)

    def _encode_moments_whole(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        moments = self.quant_conv(moments) if self.quant_conv is not None else moments
        return moments.contiguous()  # NHWC inside, NCHW out

    def _decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()  # NHWC inside, NCHW out

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled_decode(z)
        return self._decode_whole(z)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        return run_tiled(self._decode_whole, z, self.tile_latent_min_size, self.tile_sample_min_size,
                         self.tile_overlap_factor)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images (B, in_channels, H, W), usually in [-1, 1] -> ``.latent_dist`` over (B, latent, H / f, W / f)."""
        self._check_input("encode", "images", x, self.config.in_channels)
        self._check_size("encode", "images", x)
        posterior = DiagonalGaussianDistribution(self._per_sample(self._encode_moments, x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Generator = None) -> DecoderOutput | tuple:
        """Latents (B, latent_channels, h, w) (already divided by ``scaling_factor``) -> ``.sample`` images.
        ``generator`` is accepted for diffusers' signature; decoding draws no noise."""
        self._check_input("decode", "latents", z, self.config.latent_channels)
        self._check_size("decode", "latents", z)
        images = self._per_sample(self._decode, z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode in blended tiles whatever the size (what ``decode`` does for large latents with tiling on)."""
        self._check_input("tiled_decode", "latents", z, self.config.latent_channels)
        images = self._tiled_decode(z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Generator = None) -> DecoderOutput | tuple:
        """Reconstruct: encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
