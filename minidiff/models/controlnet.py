"""ControlNetModel: structure control for Stable Diffusion (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to
Text-to-Image Diffusion Models").

A ControlNet is a trainable copy of the UNet's encoder half (conv_in, time embedding, down blocks, mid block) that
also sees a condition image (edges, depth, pose, ...). The image goes through a small strided-conv encoder E to the
latent size (Sec. 3.3: ``c_f = E(c_i)``) and is added after conv_in. Every skip tensor of the copy and its mid block
output go through a zero-initialised 1x1 convolution ("zero convolution" Z) and become residuals that the frozen
UNet adds to its own skips and mid output (Eq. 2: ``y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)``):

    down, mid = controlnet(sample, t, text, controlnet_cond=image, return_dict=False)
    eps = unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

The encoder half is not re-implemented here: it is built by the UNet's own code (``TextConditionedEncoderMixin``,
``level_options``, ``make_mid_block`` of unet_2d_condition.py and the blocks of unet_blocks.py) from a
UNet2DConditionConfig derived from this model's config, so SDXL's added conditioning (``addition_embed_type=
"text_time"``) works as in the UNet. Config fields and state_dict keys are diffusers' ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.adapters.lora import has_lora, scaled_lora
from minidiff.configuration import Config, build_config, check_choice
from minidiff.models.checks import check_input_dtype, check_ints, check_not_empty
from minidiff.models.unet_2d import UNetBase
from minidiff.models.unet_2d_condition import (
    TextConditionedEncoderMixin,
    UNet2DConditionConfig,
    UNet2DConditionModel,
    level_options,
    lora_scale_of,
    make_mid_block,
)
from minidiff.models.unet_blocks import make_down_blocks, run_encoder_blocks
from minidiff.outputs import BaseOutput


@dataclass
class ControlNetOutput(BaseOutput):
    down_block_res_samples: tuple[torch.Tensor, ...]  # one (B, C_k, h_k, w_k) per skip tensor of the UNet
    mid_block_res_sample: torch.Tensor  # (B, C_last, h_last, w_last)


@dataclass
class ControlNetConfig(Config):
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int | None, ...] | None = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64


# the fields that are the ControlNet's own; all others are UNet2DConditionConfig fields of the copied encoder
CONTROLNET_FIELDS = ("conditioning_channels", "controlnet_conditioning_channel_order",
                     "conditioning_embedding_out_channels", "global_pool_conditions")
ENCODER_FIELDS = tuple(name for name in ControlNetConfig.field_names() if name not in CONTROLNET_FIELDS)
# UNet fields that shape the encoder half but that a ControlNet cannot hold: from_unet needs their defaults
UNET_ONLY_ENCODER_FIELDS = ("center_input_sample", "time_embedding_type", "time_embedding_dim",
                            "time_embedding_act_fn", "timestep_post_act", "conv_in_kernel", "class_embeddings_concat",
                            "resnet_skip_time_act", "resnet_out_scale_factor")
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")  # diffusers' ControlNet has no simple_projection


def encoder_config(c: ControlNetConfig) -> UNet2DConditionConfig:
    """The UNet2DConditionConfig whose encoder half (conv_in, embeddings, down and mid blocks) is this ControlNet's.

    A ControlNet has no up blocks: plain ``UpBlock2D`` placeholders (never built) keep the UNet's checks to the
    down and mid blocks, and per-layer transformer depths get placeholder up-block depths for the same reason."""
    levels = len(c.block_out_channels)
    values = {name: c[name] for name in ENCODER_FIELDS}
    values["up_block_types"] = ("UpBlock2D",) * levels
    depths = c.transformer_layers_per_block
    if isinstance(depths, (list, tuple)) and any(isinstance(depth, (list, tuple)) for depth in depths):
        values["reverse_transformer_layers_per_block"] = (1,) * levels
    return build_config(UNet2DConditionConfig, "ControlNetModel", values)


def zero_conv(channels: int, kernel_size: int = 1, out_channels: int | None = None) -> nn.Conv2d:
    """A convolution whose weight and bias start at zero (the paper's "zero convolution", Sec. 3.1): a fresh
    ControlNet adds nothing to the UNet until trained."""
    conv = nn.Conv2d(channels, out_channels or channels, kernel_size=kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetConditioningEmbedding(nn.Module):
    """The condition-image encoder E (Sec. 3.3): a 3x3 conv, then per step a 3x3 conv and a stride-2 3x3 conv
    (SiLU after each), then a zero 3x3 conv to the UNet's first width. (16, 32, 96, 256) halves the image 3 times:
    a 512x512 image becomes the 64x64 latent size."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        channels = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for channel_in, channel_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(channel_in, channel_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = zero_conv(channels[-1], kernel_size=3, out_channels=conditioning_embedding_channels)

    @staticmethod
    def output_size(size: int, steps: int) -> int:
        """The embedding's height (or width) for an image of ``size``: each stride-2 conv gives ceil(size / 2)."""
        for _ in range(steps):
            size = (size - 1) // 2 + 1
        return size

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))  # (B, cond, H, W) -> (B, c_0, H, W)
        for block in self.blocks:
            embedding = F.silu(block(embedding))  # stride-2 convs: (B, c_i, h, w) -> (B, c_i+1, h/2, w/2)
        return self.conv_out(embedding)  # (B, c_last, H/f, W/f) -> (B, C0, H/f, W/f)


class ControlNetModel(TextConditionedEncoderMixin, UNetBase):
    """``controlnet(sample, timestep, encoder_hidden_states, controlnet_cond)`` -> ControlNetOutput with one residual
    per skip tensor of the UNet (``down_block_res_samples``) and one for its mid block (``mid_block_res_sample``).

    ``controlnet_cond (B, conditioning_channels, H*f, W*f)``: the condition image in [0, 1] at the image size
    (f = 2^(len(conditioning_embedding_out_channels) - 1) = 8 with the defaults, the VAE's factor).
    """

    config_class = ControlNetConfig
    up_blocks = ()  # the encoder half of a UNet: UNetBase's input-size checks find no up blocks to walk

    def __init__(self, **kwargs: Any):
        super().__init__()
        c = self.register_config(kwargs)
        self._check_config(c)
        self._encoder_config = encoder_config(c)
        channels = list(c.block_out_channels)

        resnet = self._build_embeddings(self._encoder_config)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], c.conditioning_channels, c.conditioning_embedding_out_channels)
        down_options, _ = level_options(self._encoder_config)
        # one zero conv per skip tensor: conv_in's output, each resnet layer's and each downsampler's, each made
        # right after its block (diffusers' order, so a seed gives its initial weights)
        zero_convs = [zero_conv(channels[0])]

        def add_zero_convs(i: int, block: nn.Module) -> None:
            skips = len(block.resnets) + (block.downsamplers is not None)
            zero_convs.extend(zero_conv(channels[i]) for _ in range(skips))

        self.down_blocks = make_down_blocks(c.down_block_types, channels, resnet, down_options, add_zero_convs)
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)
        self.controlnet_mid_block = zero_conv(channels[-1])
        self.mid_block = make_mid_block(self._encoder_config, resnet)
        self.to(memory_format=torch.channels_last)  # NHWC weights and activations: see ModelMixin

    @property
    def encoder_config(self) -> UNet2DConditionConfig:
        return self._encoder_config

    @staticmethod
    def _check_config(c: ControlNetConfig) -> None:
        check_choice("controlnet_conditioning_channel_order", c.controlnet_conditioning_channel_order, ("rgb", "bgr"))
        check_choice("mid_block_type", c.mid_block_type, ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"))
        check_choice("class_embed_type", c.class_embed_type, CLASS_EMBED_TYPES)
        check_not_empty(c, "conditioning_embedding_out_channels")
        check_ints(c, "conditioning_channels", "conditioning_embedding_out_channels")
        try:  # the encoder's checks are the UNet's
            UNet2DConditionModel._check_config(encoder_config(c))
        except ValueError as error:
            raise ValueError(str(error).replace("UNet2DConditionModel", "ControlNetModel")) from None

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> "ControlNetModel":
        """A ControlNet with ``unet``'s encoder options and (``load_weights_from_unet``) a copy of its conv_in,
        time/class/added embeddings, down blocks and mid block; the zero convolutions start at zero (Sec. 3.1)."""
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"ControlNetModel.from_unet takes a minidiff UNet2DConditionModel, got "
                            f"{type(unet).__name__}")
        defaults = {field.name: field.default for field in dataclasses.fields(UNet2DConditionConfig)}
        differing = {name: unet.config[name] for name in UNET_ONLY_ENCODER_FIELDS
                     if unet.config[name] != defaults[name]}
        if differing:
            fixed = {name: defaults[name] for name in differing}
            raise ValueError(f"ControlNetModel.from_unet: the UNet's {differing} shape its encoder but a ControlNet "
                             f"cannot hold them (it has diffusers' fixed choices {fixed}); use a UNet with those "
                             "defaults")
        if load_weights_from_unet and has_lora(unet):
            raise ValueError("ControlNetModel.from_unet: the UNet has LoRA adapters; fuse_lora() and "
                             "unload_lora_weights() (or only unload them) before copying its weights")
        controlnet = cls(
            **{name: unet.config[name] for name in ENCODER_FIELDS},
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block"):
                source = getattr(unet, name, None)
                if source is not None:
                    getattr(controlnet, name).load_state_dict(source.state_dict())
        return controlnet

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: Any = None,
                         torch_dtype: Any = None) -> "ControlNetModel":
        """A ControlNet from an original (LDM layout, ``control_model.``) ``.safetensors`` file such as
        control_v11p_sd15_canny.safetensors; ``config``: a config dict / ControlNetConfig / local folder, else the
        SD 1.x / 2.x config is detected from shapes (see minidiff.loading.single_file_controlnet)."""
        from minidiff.loading.single_file_controlnet import load_single_file_controlnet

        return load_single_file_controlnet(path, config=config, torch_dtype=torch_dtype)

    def _check_controlnet_cond(self, sample: torch.Tensor, controlnet_cond: Any) -> None:
        """The condition image: (B or 1, conditioning_channels, H, W) whose embedding has the sample's size."""
        c = self.config
        steps = len(c.conditioning_embedding_out_channels) - 1
        factor = 2 ** steps
        batch, height, width = sample.shape[0], *sample.shape[-2:]
        wanted = f"({batch}, {c.conditioning_channels}, {height * factor}, {width * factor})"
        if not torch.is_tensor(controlnet_cond):
            raise TypeError(f"controlnet_cond must be a tensor {wanted} (the condition image), "
                            f"got {type(controlnet_cond).__name__}")
        shape = tuple(controlnet_cond.shape)
        if controlnet_cond.ndim != 4 or shape[0] not in (1, batch):
            raise ValueError(f"controlnet_cond must have shape (B, C, H, W) with the batch of sample ({batch}), e.g. "
                             f"{wanted}, got {shape}")
        if shape[1] != c.conditioning_channels:
            raise ValueError(f"controlnet_cond has {shape[1]} channels (shape {shape}) but this ControlNetModel was "
                             f"built with conditioning_channels={c.conditioning_channels}; pass {wanted}")
        embedded = tuple(ControlNetConditioningEmbedding.output_size(size, steps) for size in shape[2:])
        if embedded != (height, width):
            raise ValueError(
                f"controlnet_cond of {shape[2]}x{shape[3]} does not fit sample of {height}x{width}: the condition "
                f"embedding divides the image size by {factor} (to {embedded[0]}x{embedded[1]}), so pass a condition "
                f"image of {height * factor}x{width * factor} (sample size x {factor}), shape {wanted}"
            )
        check_input_dtype("controlnet_cond", controlnet_cond, self.dtype)

    @staticmethod
    def _check_scale_options(conditioning_scale: Any, guess_mode: Any) -> None:
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float)) or \
                not math.isfinite(conditioning_scale):
            raise TypeError(f"conditioning_scale must be a finite number (1.0: the residuals as trained, 0: no "
                            f"control), got {conditioning_scale!r}")
        if not isinstance(guess_mode, bool):
            raise TypeError(f"guess_mode must be True or False, got {guess_mode!r}")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple:
        """``sample``, ``timestep``, ``encoder_hidden_states``, ``class_labels``, ``added_cond_kwargs`` and
        ``cross_attention_kwargs`` as for UNet2DConditionModel; ``controlnet_cond (B, conditioning_channels, H*f,
        W*f)`` the condition image (flipped to RGB first if ``controlnet_conditioning_channel_order="bgr"``).

        The residuals are multiplied by ``conditioning_scale``; with ``guess_mode`` (a ControlNet that must work
        without a prompt, diffusers' variant of the paper's Sec. 4.2) by conditioning_scale x 10^(-1 + k/n), from
        0.1 for conv_in's residual up to 1.0 for the mid block's. ``global_pool_conditions`` (shuffle-type
        ControlNets) averages each residual over its map to (B, C, 1, 1). ``attention_mask`` and ``timestep_cond``
        exist for diffusers' call signature and must be None."""
        lora_scale = lora_scale_of(cross_attention_kwargs, "ControlNetModel")
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by minidiff's ControlNetModel (its cross-attention "
                             "takes no mask, as the UNet's); pass None")
        self._check_conditioning(sample, encoder_hidden_states, added_cond_kwargs, timestep_cond)
        self._check_controlnet_cond(sample, controlnet_cond)
        self._check_scale_options(conditioning_scale, guess_mode)
        c = self.config
        if c.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)  # BGR -> RGB, as the weights expect

        with scaled_lora(self, lora_scale):
            emb = self._embed(sample, timestep, class_labels, added_cond_kwargs)  # (B, time_embed_dim)
            # x + Z(c): the condition's embedding added to the copied conv_in's output (Eq. 2)
            sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, C0, H, W)
            sample, skips = run_encoder_blocks(self.down_blocks, self.mid_block, sample, emb, encoder_hidden_states)
            down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]  # (B, C_k, h_k, w_k) each
            mid = self.controlnet_mid_block(sample)  # (B, C_last, h, w)

        if guess_mode and not c.global_pool_conditions:
            # log-spaced from 0.1 (conv_in's residual) to 1.0 (the mid block's), float32 as in diffusers
            scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * conditioning_scale  # (n + 1,)
        else:
            scales = [conditioning_scale] * (len(down) + 1)
        down = [residual * scale for residual, scale in zip(down, scales)]
        mid = mid * scales[-1]
        if c.global_pool_conditions:
            down = [residual.mean(dim=(2, 3), keepdim=True) for residual in down]  # (B, C_k, 1, 1)
            mid = mid.mean(dim=(2, 3), keepdim=True)  # (B, C_last, 1, 1)
        down = tuple(residual.contiguous() for residual in down)  # NHWC inside, NCHW out
        mid = mid.contiguous()
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
