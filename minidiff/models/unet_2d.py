"""UNet2DModel: the unconditional (or class-conditional) denoising UNet of DDPM (Ho et al. 2020, App. B), also used
by score models with Fourier time features (Song et al. 2021).

``unet(sample, timestep, class_labels=None).sample`` predicts the noise (or the score) with the shape of ``sample``.
The config fields and the state_dict keys are diffusers' ones, so ``UNet2DModel.from_pretrained(folder)`` loads a
diffusers folder and ``save_pretrained`` writes one diffusers reads. ``UNetBase`` holds what both UNets share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minidiff.configuration import Config, check_choice
from minidiff.models.attention import AttentionBackendMixin
from minidiff.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, make_class_embedding
from minidiff.models.modeling import ModelMixin
from minidiff.models.resnet import activate_temporary, get_activation
from minidiff.models.unet_blocks import (
    SAMPLER_TYPES,
    ResnetOptions,
    UNetMidBlock2D,
    get_down_block,
    get_up_block,
    run_unet_blocks,
)
from minidiff.outputs import BaseOutput


@dataclass
class UNet2DOutput(BaseOutput):
    sample: torch.Tensor  # (B, out_channels, H, W)


def batch_timesteps(timestep: Any, batch_size: int, device: torch.device, float_dtype: torch.dtype) -> torch.Tensor:
    """``timestep`` (a python number, a 0-d tensor, or a 1-d tensor of 1 or ``batch_size`` entries) as a 1-d tensor
    of ``batch_size`` entries. Python ints become int64 and python floats ``float_dtype``."""
    if not torch.is_tensor(timestep):
        if not isinstance(timestep, (int, float)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        dtype = float_dtype if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(device)
    if timestep.ndim != 1 or timestep.shape[0] not in (1, batch_size):
        raise ValueError(
            f"timestep must be a number, a 0-d tensor or a 1-d tensor of 1 or {batch_size} (batch size) entries, "
            f"got shape {tuple(timestep.shape)}"
        )
    return timestep.expand(batch_size)


def check_lengths(config: Config, *names: str) -> None:
    """Per-block settings must have one entry per down block."""
    count = len(config.down_block_types)
    for name in names:
        value = getattr(config, name)
        if isinstance(value, (list, tuple)) and len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries but there are {count} down_block_types "
                             f"{list(config.down_block_types)}")


def check_common_config(config: Config) -> None:
    """The checks both UNets' configs need: resnet options, activation, groups, one block type per level."""
    check_choice("resnet_time_scale_shift", config.resnet_time_scale_shift, ("default", "scale_shift"))
    get_activation(config.act_fn)
    if not isinstance(config.norm_num_groups, int):
        raise ValueError(f"norm_num_groups must be an int, got {config.norm_num_groups!r}")
    down, up, channels = (list(getattr(config, name)) for name in ("down_block_types", "up_block_types",
                                                                     "block_out_channels"))
    if not len(down) == len(up) == len(channels):
        raise ValueError(f"down_block_types {down}, up_block_types {up} and block_out_channels {channels} "
                         "must have the same length")


class UNetBase(AttentionBackendMixin, ModelMixin):
    """What UNet2DModel and UNet2DConditionModel share: input checks, class embedding, the U and the output head."""

    def _check_sample(self, sample: torch.Tensor) -> None:
        if not torch.is_tensor(sample) or sample.ndim != 4:
            shape = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(f"{type(self).__name__} expects sample of shape (B, C, H, W), got {shape}")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has {sample.shape[1]} channels but {type(self).__name__} was built with "
                f"in_channels={self.config.in_channels} (sample shape {tuple(sample.shape)})"
            )

    def _build_blocks(self, resnet: ResnetOptions, down_options: list[dict], up_options: list[dict]) -> None:
        """``down_blocks``/``up_blocks`` from the config; ``*_options[i]`` are the per-level extras of block i."""
        channels = list(self.config.block_out_channels)
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList(
            get_down_block(block_type, in_channels=channels[max(i - 1, 0)], out_channels=channels[i],
                           add_downsample=i < last, resnet=resnet, **down_options[i])
            for i, block_type in enumerate(self.config.down_block_types)
        )
        reversed_channels = channels[::-1]
        self.up_blocks = nn.ModuleList(
            get_up_block(block_type, in_channels=reversed_channels[min(i + 1, last)],
                         prev_output_channel=reversed_channels[max(i - 1, 0)], out_channels=reversed_channels[i],
                         add_upsample=i < last, resnet=resnet, **up_options[i])
            for i, block_type in enumerate(self.config.up_block_types)
        )

    def _class_embedding(self, class_labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError(f"class_labels were given but this {type(self).__name__} has no class embedding "
                                 "(set num_class_embeds or class_embed_type)")
            return None
        if class_labels is None:
            raise ValueError(f"this {type(self).__name__} is class-conditioned: pass class_labels")
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(dtype)  # labels embedded like timesteps
        return self.class_embedding(class_labels).to(dtype)  # (B, time_embed_dim)

    def _unet(self, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states=None) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, C_in, H, W) -> (B, C0, H, W)
        sample = run_unet_blocks(self.down_blocks, self.mid_block, self.up_blocks, sample, emb, encoder_hidden_states)
        sample = activate_temporary(self.conv_act, self.conv_norm_out(sample))
        sample = self.conv_out(sample)  # (B, C0, H, W) -> (B, C_out, H, W)
        return sample.contiguous()  # NHWC inside, NCHW out


@dataclass
class UNet2DConfig(Config):
    sample_size: Any = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None


class UNet2DModel(UNetBase):
    """Denoising UNet for images without text: ``unet(sample, timestep, class_labels=None).sample``.

    ``attention_head_dim`` is the real size of a head here (``heads = channels // attention_head_dim``; None: one
    head per attention). ``time_embedding_type``: "positional" (sinusoids of t), "fourier" (Gaussian Fourier
    features of log(sigma), output divided by sigma as in NCSN++), or "learned" (a table of num_train_timesteps).
    """

    config_class = UNet2DConfig

    def __init__(self, **kwargs: Any):
        super().__init__()
        c = self.register_config(kwargs)
        self._check_config(c)
        channels = list(c.block_out_channels)
        time_embed_dim = c.time_embedding_dim or channels[0] * 4

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], kernel_size=3, padding=1)
        if c.time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=channels[0], scale=16)
            timestep_input_dim = 2 * channels[0]
        elif c.time_embedding_type == "learned":
            self.time_proj = nn.Embedding(c.num_train_timesteps, channels[0])
            timestep_input_dim = channels[0]
        else:
            self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
            timestep_input_dim = channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        self.class_embedding = make_class_embedding(c.class_embed_type, c.num_class_embeds, time_embed_dim,
                                                    timestep_input_dim)

        resnet = ResnetOptions(temb_channels=time_embed_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                               act_fn=c.act_fn, time_scale_shift=c.resnet_time_scale_shift, dropout=c.dropout)
        levels = len(channels)
        per_level = [dict(num_layers=c.layers_per_block, attention_head_dim=c.attention_head_dim)] * levels
        down = [dict(level, downsample_padding=c.downsample_padding, downsample_type=c.downsample_type)
                for level in per_level]
        up = [dict(level, num_layers=c.layers_per_block + 1, upsample_type=c.upsample_type) for level in per_level]
        self._build_blocks(resnet, down, up)
        self.mid_block = None if c.mid_block_type is None else UNetMidBlock2D(
            channels[-1], dataclasses.replace(resnet, output_scale_factor=c.mid_block_scale_factor),
            attention_head_dim=c.attention_head_dim, attn_groups=c.attn_norm_num_groups, add_attention=c.add_attention,
        )

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn is, as diffusers
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, kernel_size=3, padding=1)
        self.to(memory_format=torch.channels_last)  # NHWC weights and activations: see ModelMixin

    @staticmethod
    def _check_config(c: UNet2DConfig) -> None:
        check_choice("time_embedding_type", c.time_embedding_type, ("positional", "fourier", "learned"))
        check_choice("mid_block_type", c.mid_block_type, ("UNetMidBlock2D", None))
        check_choice("downsample_type", c.downsample_type, SAMPLER_TYPES)
        check_choice("upsample_type", c.upsample_type, SAMPLER_TYPES)
        check_choice("class_embed_type", c.class_embed_type, (None, "timestep", "identity"))
        if c.time_embedding_type == "learned" and c.num_train_timesteps is None:
            raise ValueError("time_embedding_type='learned' needs num_train_timesteps")
        check_common_config(c)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None, return_dict: bool = True) -> UNet2DOutput | tuple:
        """``sample (B, in_channels, H, W)``, ``timestep`` (number or tensor, broadcast over the batch)."""
        self._check_sample(sample)
        c = self.config
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        # as diffusers: python numbers (even floats) become int64 here, then t * ones(B) in that dtype
        timestep = timestep if torch.is_tensor(timestep) else int(timestep)
        timesteps = batch_timesteps(timestep, sample.shape[0], sample.device, torch.int64)  # (B,)

        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))  # (B, C0 or 2 C0) -> (B, 4 C0)
        class_emb = self._class_embedding(class_labels, self.dtype)
        if class_emb is not None:
            emb = emb + class_emb

        output = self._unet(sample, emb)
        if c.time_embedding_type == "fourier":
            output = output / timesteps.reshape(-1, 1, 1, 1)  # NCSN++ outputs the score scaled by 1/sigma
        return UNet2DOutput(sample=output) if return_dict else (output,)
