"""UNet2DModel: the unconditional (or class-conditional) denoising UNet of DDPM (Ho et al. 2020, App. B), also used
by score models with Fourier time features (Song et al. 2021).

``unet(sample, timestep, class_labels=None).sample`` predicts the noise (or the score) with the shape of ``sample``.
The config fields and the state_dict keys are diffusers' ones, so ``UNet2DModel.from_pretrained(folder)`` loads a
diffusers folder and ``save_pretrained`` writes one diffusers reads. ``UNetBase`` holds what both UNets share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from minidiff.configuration import Config, check_choice
from minidiff.models.attention import AttentionBackendMixin
from minidiff.models.checks import (
    check_dropout,
    check_groups_divide,
    check_heads,
    check_input_dtype,
    check_ints,
    check_not_empty,
    check_output_scale,
    check_positive_floats,
    check_sample_size,
    fail,
)
from minidiff.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, make_class_embedding
from minidiff.models.modeling import ModelMixin
from minidiff.models.resnet import ResnetBlock2D, activate_temporary, get_activation
from minidiff.models.unet_blocks import (
    DOWN_BLOCK_TYPES,
    SAMPLER_TYPES,
    SKIP_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    ResnetOptions,
    SkipUpBlock2D,
    UNetMidBlock2D,
    check_block_type,
    get_up_block,
    make_down_blocks,
    ncsn_groups,
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
    if timestep.is_floating_point() and not torch.isfinite(timestep).all():
        raise ValueError(f"timestep must be finite, got {timestep.tolist()}")
    return timestep.expand(batch_size)


def check_common_config(config: Config) -> None:
    """The checks both UNets' configs need: block types, channel and group counts, one block type per level,
    resnet options and the time embedding's frequencies."""
    check_choice("resnet_time_scale_shift", config.resnet_time_scale_shift, ("default", "scale_shift"))
    get_activation(config.act_fn)
    down, up, channels = (list(getattr(config, name)) for name in ("down_block_types", "up_block_types",
                                                                     "block_out_channels"))
    check_not_empty(config, "block_out_channels")
    if not len(down) == len(up) == len(channels):
        raise ValueError(f"down_block_types {down}, up_block_types {up} and block_out_channels {channels} "
                         "must have the same length")
    for block_type in down:
        check_block_type("down", block_type, DOWN_BLOCK_TYPES)
    for block_type in up:
        check_block_type("up", block_type, UP_BLOCK_TYPES)
    check_ints(config, "in_channels", "out_channels", "block_out_channels", "norm_num_groups", "layers_per_block",
               "time_embedding_dim", "num_class_embeds")
    check_ints(config, "downsample_padding", minimum=0)
    if config.norm_num_groups is not None:  # None (NCSN++'s own groups): UNet2DModel._check_ncsn_blocks
        check_groups_divide(config)
    check_positive_floats(config, "norm_eps")
    check_output_scale(config, "mid_block_scale_factor")
    check_dropout(config)
    check_sample_size(config)
    half = channels[0] // 2
    if config.time_embedding_type == "positional" and half >= 1 and config.freq_shift == half:
        fail("freq_shift", config.freq_shift, f"equals half of block_out_channels[0]={channels[0]}, which divides "
             "the sinusoid frequencies by zero", "use freq_shift 0 or 1 and block_out_channels[0] >= 4")


class UNetBase(AttentionBackendMixin, ModelMixin):
    """What UNet2DModel and UNet2DConditionModel share: input checks, class embedding, the U and the output head."""

    _supports_gradient_checkpointing = True  # every resnet and attention of the blocks (unet_blocks._ResnetStack)

    def _check_sample(self, sample: torch.Tensor) -> None:
        if not torch.is_tensor(sample) or sample.ndim != 4:
            shape = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(f"{type(self).__name__} expects sample of shape (B, C, H, W), got {shape}")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has {sample.shape[1]} channels but {type(self).__name__} was built with "
                f"in_channels={self.config.in_channels} (sample shape {tuple(sample.shape)})"
            )
        check_input_dtype("sample", sample, self.dtype)
        self._check_sample_size(sample)

    def _check_sample_size(self, sample: torch.Tensor) -> None:
        """Refuse, naming the size, what torch would fail on deep inside: a downsampler on a map too small for it, a
        GroupNorm group holding one value (torch raises at batch 1 and returns the bias above), a "resnet"
        upsampler that cannot restore an odd size to its skip connection's."""
        name, (height, width) = type(self).__name__, sample.shape[-2:]
        channels, groups = list(self.config.block_out_channels), self.config.norm_num_groups  # None: NCSN++'s
        attention_groups = getattr(self.config, "attn_norm_num_groups", None)  # UNet2DModel's mid-block attention
        sizes = [(height, width)]  # (h, w) of each level
        for block in self.down_blocks[:-1]:
            sizes.append(self._downsampled(block, sizes[-1]))
        for i, size in enumerate(sizes):
            # the narrowest GroupNorm at level i
            per_group = min(ch // (groups or ncsn_groups(ch)) for ch in (channels[max(i - 1, 0)], channels[i]))
            if i == len(channels) - 1 and attention_groups:
                per_group = min(per_group, channels[i] // attention_groups)
            if min(size) < 1 or size[0] * size[1] * per_group <= 1:
                raise ValueError(f"{name}: sample of {height}x{width} is too small: level {i} would be "
                                 f"{size[0]}x{size[1]}, too small to downsample or normalise; use a sample of at "
                                 f"least {2 ** len(channels)}x{2 ** len(channels)}")
        for i, block in enumerate(self.up_blocks[:-1]):  # up block i goes from level L-1-i to level L-2-i
            below, above = sizes[len(sizes) - 1 - i], sizes[len(sizes) - 2 - i]
            exact = isinstance(block, SkipUpBlock2D) or isinstance(block.upsamplers[0], ResnetBlock2D)
            if exact and above != (2 * below[0], 2 * below[1]):
                multiple = 2 ** (len(channels) - 1)
                kind = "FIR" if isinstance(block, SkipUpBlock2D) else "resnet"
                raise ValueError(f"{name}: sample of {height}x{width} does not fit the {kind} upsampler of up block "
                                 f"{i}, which doubles {below[0]}x{below[1]}; use a height and width that are "
                                 f"multiples of {multiple}")

    @staticmethod
    def _downsampled(block: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
        sampler = block.downsamplers[0]
        return (sampler.downsample if isinstance(sampler, ResnetBlock2D) else sampler).output_size(*size)

    def _build_blocks(self, resnet: ResnetOptions, down_options: list[dict], up_options: list[dict],
                      make_mid_block: Callable[[], nn.Module | None]) -> None:
        """``down_blocks``, ``mid_block``, ``up_blocks`` from the config, created in that order and registered as
        down, up, mid (both diffusers' orders: a seed gives its initial weights, and module walks such as
        ``attn_processors`` list the layers as it does); ``*_options[i]`` are the per-level extras of block i."""
        channels = list(self.config.block_out_channels)
        last = len(channels) - 1
        self.down_blocks = make_down_blocks(self.config.down_block_types, channels, resnet, down_options)
        self.up_blocks = nn.ModuleList()
        self.mid_block = make_mid_block()
        reversed_channels = channels[::-1]
        self.up_blocks.extend(
            get_up_block(block_type, in_channels=reversed_channels[min(i + 1, last)],
                         prev_output_channel=reversed_channels[max(i - 1, 0)], out_channels=reversed_channels[i],
                         add_upsample=i < last, resnet=resnet, **up_options[i])
            for i, block_type in enumerate(self.config.up_block_types)
        )

    def _class_embedding(self, class_labels: torch.Tensor | None, dtype: torch.dtype,
                         batch_size: int) -> torch.Tensor | None:
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError(f"class_labels were given but this {type(self).__name__} has no class embedding "
                                 "(set num_class_embeds or class_embed_type)")
            return None
        if class_labels is None:
            raise ValueError(f"this {type(self).__name__} is class-conditioned: pass class_labels")
        self._check_class_labels(class_labels, batch_size)
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(dtype)  # labels embedded like timesteps
        class_emb = self.class_embedding(class_labels).to(dtype)  # (B, time_embed_dim)
        width = getattr(self.time_embedding.linear_2, "base_layer", self.time_embedding.linear_2).out_features
        if class_emb.ndim != 2 or class_emb.shape[0] not in (1, batch_size) or class_emb.shape[1] != width:
            raise ValueError(f"class_labels of shape {tuple(class_labels.shape)} give a class embedding of shape "
                             f"{tuple(class_emb.shape)}; expected ({batch_size}, {width})")
        return class_emb

    def _check_class_labels(self, class_labels: torch.Tensor, batch_size: int) -> None:
        """Labels of a table (``num_class_embeds``) are integer ids in range; sinusoid-embedded labels are 1-d."""
        if not torch.is_tensor(class_labels):
            raise ValueError(f"class_labels must be a tensor, got {type(class_labels).__name__}")
        table = isinstance(self.class_embedding, nn.Embedding)
        if (table or self.config.class_embed_type == "timestep") and class_labels.ndim != 1:
            raise ValueError(f"class_labels must be a 1-d tensor of {batch_size} labels, "
                             f"got shape {tuple(class_labels.shape)}")
        if table and (class_labels.is_floating_point() or class_labels.numel() and not
                      0 <= int(class_labels.min()) <= int(class_labels.max()) < self.config.num_class_embeds):
            raise ValueError(f"class_labels must be integer ids in [0, {self.config.num_class_embeds}) "
                             f"(num_class_embeds), got {class_labels.tolist()}")

    def _unet(self, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states=None) -> torch.Tensor:
        image = sample  # NCSN++'s skip blocks carry the input image beside the features
        sample = self.conv_in(sample)  # (B, C_in, H, W) -> (B, C0, H, W)
        sample, output_image = run_unet_blocks(self.down_blocks, self.mid_block, self.up_blocks, sample, emb,
                                               encoder_hidden_states, image=image)
        sample = activate_temporary(self.conv_act, self.conv_norm_out(sample))
        sample = self.conv_out(sample)  # (B, C0, H, W) -> (B, C_out, H, W)
        if output_image is not None:
            sample = sample + output_image  # NCSN++'s output skip: (B, 3, H, W)
        return sample.contiguous()  # NHWC inside, NCHW out


@dataclass
class UNet2DConfig(Config):
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32  # None: NCSN++'s min(channels // 4, 32) (skip blocks only)
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

        resnet = ResnetOptions(temb_channels=time_embed_dim, groups=c.norm_num_groups or ncsn_groups(channels[-1]),
                               eps=c.norm_eps, act_fn=c.act_fn, time_scale_shift=c.resnet_time_scale_shift,
                               dropout=c.dropout)  # groups: the mid block's when None (skip blocks pick their own)
        levels = len(channels)
        per_level = [dict(num_layers=c.layers_per_block, attention_head_dim=c.attention_head_dim)] * levels
        down = [dict(level, downsample_padding=c.downsample_padding, downsample_type=c.downsample_type)
                for level in per_level]
        up = [dict(level, num_layers=c.layers_per_block + 1, upsample_type=c.upsample_type) for level in per_level]
        self._build_blocks(resnet, down, up, lambda: None if c.mid_block_type is None else UNetMidBlock2D(
            channels[-1], dataclasses.replace(resnet, output_scale_factor=c.mid_block_scale_factor),
            attention_head_dim=c.attention_head_dim, attn_groups=c.attn_norm_num_groups, add_attention=c.add_attention,
        ))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups or ncsn_groups(channels[0]), channels[0], eps=c.norm_eps)
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
        UNet2DModel._check_ncsn_blocks(c)
        check_common_config(c)
        for key in ("down_block_types", "up_block_types"):
            for block_type in c[key]:
                if "CrossAttn" in block_type:
                    raise ValueError(f"{key}: {block_type} needs cross_attention_dim (UNet2DModel has no "
                                     "cross-attention settings); use UNet2DConditionModel for text conditioning")
        check_ints(c, "attention_head_dim", "attn_norm_num_groups", "num_train_timesteps")
        UNet2DModel._check_attention_heads(c)
        if c.attn_norm_num_groups is not None and c.block_out_channels[-1] % c.attn_norm_num_groups:
            fail("attn_norm_num_groups", c.attn_norm_num_groups, f"does not divide the {c.block_out_channels[-1]} "
                 "channels of the mid block's attention", "use a divisor of block_out_channels[-1] or None")

    @staticmethod
    def _check_ncsn_blocks(c: UNet2DConfig) -> None:
        """NCSN++'s skip blocks carry a 3-channel image: they go together, in_channels=3; norm_num_groups=None (their
        own groups) is for them only."""
        blocks = [*c.down_block_types, *c.up_block_types]
        skip = [name for name in blocks if name in SKIP_BLOCK_TYPES]
        if skip and len(skip) != len(blocks):
            raise ValueError(f"down_block_types/up_block_types mix NCSN++ skip blocks {skip} with others; use skip "
                             "blocks (SkipDownBlock2D, AttnSkipDownBlock2D, SkipUpBlock2D, AttnSkipUpBlock2D) "
                             "throughout or none")
        if skip and c.in_channels != 3:
            fail("in_channels", c.in_channels, "must be 3 with NCSN++ skip blocks (their image path is RGB)",
                 "use in_channels=3")
        if c.norm_num_groups is None and not skip:
            fail("norm_num_groups", None, "is only for NCSN++ skip blocks, which choose min(channels // 4, 32)",
                 "give an int such as 32")
        for channels in c.block_out_channels if c.norm_num_groups is None else ():
            if channels < 4 or channels % ncsn_groups(channels):
                fail("block_out_channels", list(c.block_out_channels), f"has {channels}, which NCSN++'s "
                     f"min(channels // 4, 32) = {ncsn_groups(channels)} groups do not divide",
                     "use multiples of 4 (of 128 above 128)")
        levels = len(c.block_out_channels)
        attention_levels = [i for i, name in enumerate(c.down_block_types) if name == "AttnSkipDownBlock2D"]
        attention_levels += [levels - 1 - i for i, name in enumerate(c.up_block_types) if name == "AttnSkipUpBlock2D"]
        for level in attention_levels:
            if c.block_out_channels[level] % 32:
                fail("block_out_channels", list(c.block_out_channels), f"has {c.block_out_channels[level]} at "
                     f"level {level}, whose NCSN++ attention normalises in 32 groups", "use a multiple of 32 there")

    @staticmethod
    def _check_attention_heads(c: UNet2DConfig) -> None:
        """``attention_head_dim`` is the head size: at most the channels of each level with attention."""
        if c.attention_head_dim is None:
            return
        channels = list(c.block_out_channels)
        levels = [i for i, name in enumerate(c.down_block_types) if "Attn" in name]
        levels += [len(channels) - 1 - i for i, name in enumerate(c.up_block_types) if "Attn" in name]
        if c.mid_block_type is not None and c.add_attention:
            levels.append(len(channels) - 1)
        for level in sorted(set(levels)):
            check_heads("attention_head_dim", c.attention_head_dim, level, channels[level] // c.attention_head_dim,
                        channels[level], "this head size")

    def _check_timesteps(self, timesteps: torch.Tensor) -> None:
        """Fourier features embed log(sigma): sigma > 0; a learned table has num_train_timesteps rows."""
        c = self.config
        if c.time_embedding_type == "fourier" and not (timesteps > 0).all():
            raise ValueError(f"time_embedding_type='fourier' takes the noise level sigma > 0 as timestep, got "
                             f"{timesteps.tolist()} (python numbers are truncated to int: pass a float tensor)")
        if c.time_embedding_type == "learned" and (timesteps.is_floating_point() or not
                                                   0 <= int(timesteps.min()) <= int(timesteps.max())
                                                   < c.num_train_timesteps):
            raise ValueError(f"time_embedding_type='learned' takes integer timesteps in [0, {c.num_train_timesteps})"
                             f" (num_train_timesteps), got {timesteps.tolist()}")

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
        self._check_timesteps(timesteps)

        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))  # (B, C0 or 2 C0) -> (B, 4 C0)
        class_emb = self._class_embedding(class_labels, self.dtype, sample.shape[0])
        if class_emb is not None:
            emb = emb + class_emb

        output = self._unet(sample, emb)
        if c.time_embedding_type == "fourier":
            output = output / timesteps.reshape(-1, 1, 1, 1)  # NCSN++ outputs the score scaled by 1/sigma
        return UNet2DOutput(sample=output) if return_dict else (output,)
