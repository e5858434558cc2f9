"""The down, mid and up blocks of the UNets (Ronneberger et al. 2015; the DDPM variant of Ho et al. 2020, App. B;
the text-conditioned variant of Rombach et al. 2022, Sec. 3.3).

Every block is a stack of ResnetBlock2D layers, each optionally followed by an attention layer, plus an optional
resampler. What differs between diffusers' block types is only *which* attention and *which* resampler:

| block type                      | attention after each resnet                    | resampler                    |
|---------------------------------|------------------------------------------------|------------------------------|
| DownBlock2D / UpBlock2D         | none                                           | stride-2 conv / nearest+conv |
| AttnDownBlock2D / AttnUpBlock2D | self-attention over pixels (``Attention``)     | conv, or a resnet (``*_type``) |
| CrossAttnDownBlock2D / ...Up... | ``Transformer2DModel`` (self + cross on text)  | conv                         |
| ResnetDownsampleBlock2D / ...Up | none                                           | a ResnetBlock2D with down/up |

so each family is one class (``DownBlock2D``, ``UpBlock2D``, ``UNetMidBlock2D``) parameterised by an attention
factory and a resampler kind; the named subclasses only choose them. NCSN++'s ``(Attn)Skip{Down,Up}Block2D``
(``SkipDownBlock2D`` / ``SkipUpBlock2D``) also carry the input image beside the features and resample with a FIR
filter, so they are classes of their own. Attribute names (``resnets``, ``attentions``,
``downsamplers``, ``upsamplers``) are diffusers' state_dict keys.

Down blocks return their output and the tensors they leave for the skip connections; up blocks concatenate those
(last in, first out) before each resnet. ``run_unet_blocks`` wires the U.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from minidiff.models.attention import Attention, Transformer2DModel
from minidiff.models.modeling import checkpointed
from minidiff.models.resnet import Downsample2D, FirResample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "ResnetDownsampleBlock2D",
                    "SkipDownBlock2D", "AttnSkipDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D",
                  "AttnSkipUpBlock2D")
SKIP_BLOCK_TYPES = ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")  # NCSN++'s
SAMPLER_TYPES = ("conv", "resnet")


@dataclass(frozen=True)
class ResnetOptions:
    """The settings every ResnetBlock2D of a UNet shares (diffusers passes them as ``resnet_*`` arguments)."""

    temb_channels: int | None
    groups: int
    eps: float
    act_fn: str = "silu"
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    skip_time_act: bool = False

    def block(self, in_channels: int, out_channels: int, **extra) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels=in_channels, out_channels=out_channels, temb_channels=self.temb_channels, groups=self.groups,
            eps=self.eps, non_linearity=self.act_fn, time_embedding_norm=self.time_scale_shift,
            output_scale_factor=self.output_scale_factor, dropout=self.dropout, skip_time_act=self.skip_time_act,
            **extra,
        )


@dataclass(frozen=True)
class CrossAttentionOptions:
    """The Transformer2DModel settings of one resolution level of UNet2DConditionModel.

    ``transformer_layers``: BasicTransformerBlocks per Transformer2DModel, one int for all or one per resnet layer.
    """

    num_heads: int
    cross_attention_dim: int
    transformer_layers: int | tuple[int, ...] | list[int] = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False

    def transformer(self, channels: int, groups: int, layer: int) -> Transformer2DModel:
        depth = self.transformer_layers
        return Transformer2DModel(
            self.num_heads, channels // self.num_heads, in_channels=channels,
            num_layers=depth if isinstance(depth, int) else depth[layer],
            cross_attention_dim=self.cross_attention_dim, norm_num_groups=groups,
            use_linear_projection=self.use_linear_projection, only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
        )


def pixel_self_attention(channels: int, head_dim: int | None, groups: int | None, eps: float,
                         rescale_output_factor: float = 1.0) -> Attention:
    """The attention layer of the DDPM UNet (Ho et al. 2020) and of the VAE: GroupNorm, self-attention over the
    H*W pixels with ``channels // head_dim`` heads of ``head_dim`` (None: one head), residual connection."""
    head_dim = channels if head_dim is None else head_dim
    return Attention(
        channels, heads=channels // head_dim, dim_head=head_dim, rescale_output_factor=rescale_output_factor, eps=eps,
        norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True,
    )


# attention factory: layer index -> the attention module after that layer's resnet
AttentionFactory = Callable[[int], nn.Module]


def pixel_attentions(channels: int, head_dim: int | None, resnet: ResnetOptions,
                     groups: int | None) -> AttentionFactory:
    """One ``pixel_self_attention`` per layer (eps and output scale shared with the resnets)."""
    return lambda _: pixel_self_attention(channels, head_dim, groups, resnet.eps, resnet.output_scale_factor)


def transformers(channels: int, cross: CrossAttentionOptions, resnet: ResnetOptions) -> AttentionFactory:
    """One Transformer2DModel per layer (GroupNorm groups shared with the resnets)."""
    return lambda layer: cross.transformer(channels, resnet.groups, layer)


def build_layers(module: nn.Module, make_resnet: Callable[[int], nn.Module], make_attention: AttentionFactory | None,
                 num_layers: int, attention_first: bool = False) -> None:
    """``module.resnets`` and ``module.attentions`` (one per layer), created in diffusers' order, resnet i then
    attention i (attention i then resnet i with ``attention_first``: the mid block's), so that a seed drawn before
    building a model gives diffusers' initial weights."""
    resnets, attentions = [], []
    for i in range(num_layers):
        if make_attention and attention_first:
            attentions.append(make_attention(i))
        resnets.append(make_resnet(i))
        if make_attention and not attention_first:
            attentions.append(make_attention(i))
    module.attentions = nn.ModuleList(attentions) if make_attention else None  # registered first, as diffusers
    module.resnets = nn.ModuleList(resnets)


class _ResnetStack(nn.Module):
    """Shared by all blocks: ``resnets``, optional ``attentions`` (one per layer) and how to call them (each call
    through ``checkpointed``, so ``enable_gradient_checkpointing`` on the UNet reaches every resnet and attention)."""

    has_cross_attention = False
    gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing

    def _resnet(self, layer: int, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        return checkpointed(self, self.resnets[layer], hidden_states, temb)

    def _attend(self, layer: int, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.attentions is None:
            return hidden_states
        context = (encoder_hidden_states, encoder_attention_mask) if self.has_cross_attention else ()
        attention = self.attentions[layer]
        if isinstance(attention, Transformer2DModel):  # it checkpoints each of its transformer blocks, as diffusers'
            return attention(hidden_states, *context)
        return checkpointed(self, attention, hidden_states, *context)


def _resample(sampler: nn.Module, hidden_states, temb, output_size=None) -> torch.Tensor:
    if isinstance(sampler, ResnetBlock2D):  # "resnet" samplers take the time embedding
        return sampler(hidden_states, temb)
    if isinstance(sampler, Upsample2D):
        return sampler(hidden_states, output_size)
    return sampler(hidden_states)


class DownBlock2D(_ResnetStack):
    """``num_layers`` x (resnet [+ attention]), then an optional downsampler (``"conv"``: stride-2 3x3 conv with
    ``downsample_padding``; ``"resnet"``: a ResnetBlock2D with ``down=True``; None: keep the size)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        resnet: ResnetOptions,
        downsample: str | None = "conv",
        downsample_padding: int = 1,
        make_attention: AttentionFactory | None = None,
    ):
        super().__init__()
        build_layers(self, lambda i: resnet.block(in_channels if i == 0 else out_channels, out_channels),
                     make_attention, num_layers)
        if downsample == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
        elif downsample == "resnet":
            self.downsamplers = nn.ModuleList([resnet.block(out_channels, out_channels, down=True)])
        else:
            self.downsamplers = None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for i in range(len(self.resnets)):
            hidden_states = self._attend(i, self._resnet(i, hidden_states, temb), encoder_hidden_states,
                                         encoder_attention_mask)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = _resample(self.downsamplers[0], hidden_states, temb)  # (B, C, H, W) -> (B, C, H/2, W/2)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class AttnDownBlock2D(DownBlock2D):
    """DownBlock2D with pixel self-attention (``attention_head_dim`` is the real head size) after each resnet."""

    def __init__(self, in_channels, out_channels, num_layers, resnet: ResnetOptions, attention_head_dim: int | None,
                 downsample: str | None = "conv", downsample_padding: int = 1):
        super().__init__(
            in_channels, out_channels, num_layers, resnet, downsample, downsample_padding,
            pixel_attentions(out_channels, attention_head_dim, resnet, resnet.groups),
        )


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel (self- and cross-attention on the text) after each resnet."""

    has_cross_attention = True

    def __init__(self, in_channels, out_channels, num_layers, resnet: ResnetOptions, cross: CrossAttentionOptions,
                 add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__(
            in_channels, out_channels, num_layers, resnet, "conv" if add_downsample else None, downsample_padding,
            transformers(out_channels, cross, resnet),
        )


class ResnetDownsampleBlock2D(DownBlock2D):
    """DownBlock2D whose downsampler is a ResnetBlock2D with ``down=True`` (2x2 average pool inside the resnet)."""

    def __init__(self, in_channels, out_channels, num_layers, resnet: ResnetOptions, add_downsample: bool = True):
        super().__init__(in_channels, out_channels, num_layers, resnet, "resnet" if add_downsample else None)


class UpBlock2D(_ResnetStack):
    """``num_layers`` x (concat a skip tensor, resnet [+ attention]), then an optional upsampler (``"conv"``:
    nearest x2 + 3x3 conv; ``"resnet"``: a ResnetBlock2D with ``up=True``).

    Channel bookkeeping (as diffusers): layer i takes ``prev_output_channel`` (i = 0) or ``out_channels`` from below
    plus a skip of ``out_channels``, except the last layer whose skip comes from the level above (``in_channels``).
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        num_layers: int,
        resnet: ResnetOptions,
        upsample: str | None = "conv",
        make_attention: AttentionFactory | None = None,
    ):
        super().__init__()

        def make_resnet(i: int) -> ResnetBlock2D:
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            below_channels = prev_output_channel if i == 0 else out_channels
            return resnet.block(below_channels + skip_channels, out_channels)

        build_layers(self, make_resnet, make_attention, num_layers)
        if upsample == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)])
        elif upsample == "resnet":
            self.upsamplers = nn.ModuleList([resnet.block(out_channels, out_channels, up=True)])
        else:
            self.upsamplers = None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                upsample_size: tuple[int, int] | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for i in range(len(self.resnets)):
            skip = res_hidden_states_tuple[-1 - i]  # the skip tensors are consumed last-in, first-out
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = self._attend(i, self._resnet(i, hidden_states, temb), encoder_hidden_states,
                                         encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = _resample(self.upsamplers[0], hidden_states, temb, upsample_size)  # -> (B, C, 2H, 2W)
        return hidden_states


class AttnUpBlock2D(UpBlock2D):
    """UpBlock2D with pixel self-attention after each resnet (``attention_head_dim``: real head size)."""

    def __init__(self, in_channels, prev_output_channel, out_channels, num_layers, resnet: ResnetOptions,
                 attention_head_dim: int | None, upsample: str | None = "conv"):
        super().__init__(
            in_channels, prev_output_channel, out_channels, num_layers, resnet, upsample,
            pixel_attentions(out_channels, attention_head_dim, resnet, resnet.groups),
        )


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""

    has_cross_attention = True

    def __init__(self, in_channels, prev_output_channel, out_channels, num_layers, resnet: ResnetOptions,
                 cross: CrossAttentionOptions, add_upsample: bool = True):
        super().__init__(
            in_channels, prev_output_channel, out_channels, num_layers, resnet, "conv" if add_upsample else None,
            transformers(out_channels, cross, resnet),
        )


class ResnetUpsampleBlock2D(UpBlock2D):
    """UpBlock2D whose upsampler is a ResnetBlock2D with ``up=True`` (nearest x2 inside the resnet)."""

    def __init__(self, in_channels, prev_output_channel, out_channels, num_layers, resnet: ResnetOptions,
                 add_upsample: bool = True):
        super().__init__(in_channels, prev_output_channel, out_channels, num_layers, resnet,
                         "resnet" if add_upsample else None)


class UNetMidBlock2D(_ResnetStack):
    """The bottleneck: resnet, then ``num_layers`` x (attention, resnet) at constant channels.

    UNet2DModel (and the VAE) use pixel self-attention with ``attention_head_dim`` (None: one head) and a GroupNorm
    of ``attn_groups`` groups (None: ``resnet.groups``, or no norm with ``scale_shift`` resnets, as diffusers);
    ``add_attention=False`` leaves only the resnets. ``UNetMidBlock2DCrossAttn`` uses Transformer2DModels.
    """

    def __init__(self, in_channels: int, resnet: ResnetOptions, attention_head_dim: int | None = None,
                 attn_groups: int | None = None, add_attention: bool = True, num_layers: int = 1,
                 make_attention: AttentionFactory | None = None):
        super().__init__()
        if make_attention is None and add_attention:
            if attn_groups is None and resnet.time_scale_shift == "default":
                attn_groups = resnet.groups
            make_attention = pixel_attentions(in_channels, attention_head_dim, resnet, attn_groups)
        first = resnet.block(in_channels, in_channels)  # resnet 0, then (attention i, resnet i + 1) per layer
        build_layers(self, lambda _: resnet.block(in_channels, in_channels), make_attention, num_layers,
                     attention_first=True)
        self.resnets.insert(0, first)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self._resnet(0, hidden_states, temb)
        for i in range(1, len(self.resnets)):
            attended = self._attend(i - 1, hidden_states, encoder_hidden_states, encoder_attention_mask)
            hidden_states = self._resnet(i, attended, temb)
        return hidden_states


class UNetMidBlock2DCrossAttn(UNetMidBlock2D):
    """The bottleneck of Stable Diffusion: resnet, Transformer2DModel, resnet (``cross.only_cross_attention`` is
    not used here, as in diffusers)."""

    has_cross_attention = True

    def __init__(self, in_channels: int, resnet: ResnetOptions, cross: CrossAttentionOptions, num_layers: int = 1):
        cross = dataclasses.replace(cross, only_cross_attention=False)
        super().__init__(in_channels, resnet, num_layers=num_layers,
                         make_attention=transformers(in_channels, cross, resnet))


def ncsn_groups(channels: int) -> int:
    """The GroupNorm groups of NCSN++'s blocks: one per 4 channels, at most 32 (diffusers' skip blocks fix them,
    whatever norm_num_groups says)."""
    return min(channels // 4, 32)


NCSN_OUTPUT_SCALE = math.sqrt(2.0)  # every NCSN++ resnet and attention divides its residual sum by sqrt(2)


def _ncsn_resnet(resnet: ResnetOptions, in_channels: int, out_channels: int, groups: int | None = None,
                 **extra) -> ResnetBlock2D:
    return dataclasses.replace(resnet, groups=ncsn_groups(in_channels) if groups is None else groups,
                               output_scale_factor=NCSN_OUTPUT_SCALE).block(
        in_channels, out_channels, groups_out=ncsn_groups(out_channels), **extra)


def _ncsn_attention(channels: int, head_dim: int | None, resnet: ResnetOptions) -> Attention:
    return pixel_self_attention(channels, head_dim, 32, resnet.eps, NCSN_OUTPUT_SCALE)  # 32 groups, as diffusers


class SkipDownBlock2D(nn.Module):
    """NCSN++'s down block (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H, with the
    "input skip" progressive growing): resnets (each followed by pixel attention in ``AttnSkipDownBlock2D``), then a
    resnet that halves the size with the FIR filter; beside the features, the model's input image is FIR-halved
    too and added through a 1x1 conv (``skip_conv``). ``forward(x, temb, image) -> (x, skips, image)``."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resnet: ResnetOptions,
                 attention_head_dim: int | None = None, with_attention: bool = False, add_downsample: bool = True):
        super().__init__()
        build_layers(self, lambda i: _ncsn_resnet(resnet, in_channels if i == 0 else out_channels, out_channels),
                     (lambda _: _ncsn_attention(out_channels, attention_head_dim, resnet)) if with_attention else None,
                     num_layers)
        if add_downsample:
            self.resnet_down = _ncsn_resnet(resnet, out_channels, out_channels, use_in_shortcut=True, down=True,
                                            kernel="fir")
            self.downsamplers = nn.ModuleList([FirResample2D(up=False)])  # for the image: no parameters
            self.skip_conv = nn.Conv2d(3, out_channels, kernel_size=1)
        else:
            self.resnet_down = self.downsamplers = self.skip_conv = None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, image: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            skips.append(hidden_states)
        if self.resnet_down is not None:
            hidden_states = self.resnet_down(hidden_states, temb)  # (B, C, H, W) -> (B, C, H/2, W/2)
            image = self.downsamplers[0](image)  # (B, 3, H, W) -> (B, 3, H/2, W/2)
            hidden_states = self.skip_conv(image) + hidden_states
            skips.append(hidden_states)
        return hidden_states, tuple(skips), image


class SkipUpBlock2D(nn.Module):
    """NCSN++'s up block with the "output skip": concatenated skips and resnets as ``UpBlock2D`` (one pixel
    attention after the last in ``AttnSkipUpBlock2D``), then, while not at the top, the running output image is
    FIR-doubled and gets ``skip_conv(act(skip_norm(x)))`` added (3 channels), and a FIR resnet doubles the features.
    ``forward(x, skips, temb, image) -> (x, image)``; the top block returns the image the model adds to its output.

    The attention variant's first resnet normalises with ``min(in + skip // 4, 32)`` groups: diffusers' operator
    precedence, kept for its numbers (it is 32 for every channel count above 128)."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, num_layers: int,
                 resnet: ResnetOptions, attention_head_dim: int | None = None, with_attention: bool = False,
                 add_upsample: bool = True):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            below_channels = prev_output_channel if i == 0 else out_channels
            groups = min(below_channels + skip_channels // 4, 32) if with_attention else None
            resnets.append(_ncsn_resnet(resnet, below_channels + skip_channels, out_channels, groups))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([_ncsn_attention(out_channels, attention_head_dim, resnet)]) \
            if with_attention else None
        self.upsampler = FirResample2D(up=True)  # for the image: no parameters
        if add_upsample:
            self.resnet_up = _ncsn_resnet(resnet, out_channels, out_channels, use_in_shortcut=True, up=True,
                                          kernel="fir")
            self.skip_conv = nn.Conv2d(out_channels, 3, kernel_size=3, padding=1)
            self.skip_norm = nn.GroupNorm(ncsn_groups(out_channels), out_channels, eps=resnet.eps)
            self.act = nn.SiLU()
        else:
            self.resnet_up = self.skip_conv = self.skip_norm = self.act = None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | float]:
        for i, resnet in enumerate(self.resnets):
            skip = res_hidden_states_tuple[-1 - i]  # last in, first out
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)  # (B, C + C_skip, H, W) -> ...
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        image = 0 if image is None else self.upsampler(image)  # (B, 3, h, w) -> (B, 3, 2h, 2w)
        if self.resnet_up is not None:
            image = image + self.skip_conv(self.act(self.skip_norm(hidden_states)))  # (B, 3, H, W)
            hidden_states = self.resnet_up(hidden_states, temb)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return hidden_states, image


def _strip_prefix(block_type: str) -> str:
    return block_type[len("UNetRes"):] if block_type.startswith("UNetRes") else block_type


def check_block_type(kind: str, block_type: str, supported: tuple[str, ...]) -> str:
    """The block class name of a ``{kind}_block_types`` entry (diffusers' ``UNetRes`` prefix dropped)."""
    name = _strip_prefix(block_type)
    if name not in supported:
        raise ValueError(f"{kind}_block_types: {kind} block type {block_type!r} is not supported; "
                         f"supported types: {', '.join(supported)}")
    return name


def _need_cross(block_type: str, cross: CrossAttentionOptions | None) -> CrossAttentionOptions:
    if cross is None:
        raise ValueError(f"{block_type} needs cross_attention_dim (this model has no cross-attention settings)")
    return cross


def get_down_block(
    block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    add_downsample: bool,
    resnet: ResnetOptions,
    attention_head_dim: int | None = None,
    cross: CrossAttentionOptions | None = None,
    downsample_padding: int = 1,
    downsample_type: str = "conv",
    resnet_skip_time_act: bool = False,
    resnet_out_scale_factor: float = 1.0,
) -> DownBlock2D:
    """Build a down block by diffusers' type name. As in diffusers, ``downsample_type`` only concerns
    AttnDownBlock2D, and ``resnet_skip_time_act``/``resnet_out_scale_factor`` only ResnetDownsampleBlock2D."""
    name = check_block_type("down", block_type, DOWN_BLOCK_TYPES)
    common = dict(in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, resnet=resnet)
    if name == "DownBlock2D":
        return DownBlock2D(**common, downsample="conv" if add_downsample else None,
                           downsample_padding=downsample_padding)
    if name == "AttnDownBlock2D":
        return AttnDownBlock2D(**common, attention_head_dim=attention_head_dim,
                               downsample=downsample_type if add_downsample else None,
                               downsample_padding=downsample_padding)
    if name == "CrossAttnDownBlock2D":
        return CrossAttnDownBlock2D(**common, cross=_need_cross(name, cross), add_downsample=add_downsample,
                                    downsample_padding=downsample_padding)
    if name in SKIP_BLOCK_TYPES:
        return SkipDownBlock2D(**common, attention_head_dim=attention_head_dim, with_attention=name.startswith("Attn"),
                               add_downsample=add_downsample)
    common["resnet"] = dataclasses.replace(resnet, skip_time_act=resnet_skip_time_act,
                                           output_scale_factor=resnet_out_scale_factor)
    return ResnetDownsampleBlock2D(**common, add_downsample=add_downsample)


def make_down_blocks(block_types: tuple[str, ...], channels: list[int], resnet: ResnetOptions,
                     options: list[dict], after_block: Callable[[int, nn.Module], None] | None = None
                     ) -> nn.ModuleList:
    """The down blocks of a UNet (or of a ControlNet, its encoder half): block i maps ``channels[i-1]`` to ``channels[i]``
    and halves the size, except the last; ``options[i]`` are its per-level extras (see ``get_down_block``).
    ``after_block(i, block)`` runs after each (the ControlNet builds its zero convs there, in diffusers' order)."""
    last = len(channels) - 1
    blocks = nn.ModuleList()
    for i, block_type in enumerate(block_types):
        blocks.append(get_down_block(block_type, in_channels=channels[max(i - 1, 0)], out_channels=channels[i],
                                     add_downsample=i < last, resnet=resnet, **options[i]))
        if after_block is not None:
            after_block(i, blocks[-1])
    return blocks


def get_up_block(
    block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    prev_output_channel: int,
    out_channels: int,
    add_upsample: bool,
    resnet: ResnetOptions,
    attention_head_dim: int | None = None,
    cross: CrossAttentionOptions | None = None,
    upsample_type: str = "conv",
    resnet_skip_time_act: bool = False,
    resnet_out_scale_factor: float = 1.0,
) -> UpBlock2D:
    """Build an up block by diffusers' type name (see ``get_down_block`` for which options reach which block)."""
    name = check_block_type("up", block_type, UP_BLOCK_TYPES)
    common = dict(in_channels=in_channels, prev_output_channel=prev_output_channel, out_channels=out_channels,
                  num_layers=num_layers, resnet=resnet)
    if name == "UpBlock2D":
        return UpBlock2D(**common, upsample="conv" if add_upsample else None)
    if name == "AttnUpBlock2D":
        return AttnUpBlock2D(**common, attention_head_dim=attention_head_dim,
                             upsample=upsample_type if add_upsample else None)
    if name == "CrossAttnUpBlock2D":
        return CrossAttnUpBlock2D(**common, cross=_need_cross(name, cross), add_upsample=add_upsample)
    if name in SKIP_BLOCK_TYPES:
        return SkipUpBlock2D(**common, attention_head_dim=attention_head_dim, with_attention=name.startswith("Attn"),
                             add_upsample=add_upsample)
    common["resnet"] = dataclasses.replace(resnet, skip_time_act=resnet_skip_time_act,
                                           output_scale_factor=resnet_out_scale_factor)
    return ResnetUpsampleBlock2D(**common, add_upsample=add_upsample)


def run_encoder_blocks(down_blocks: nn.ModuleList, mid_block: nn.Module | None, sample: torch.Tensor,
                       temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                       encoder_attention_mask: torch.Tensor | None = None,
                       image: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The down half of the U, shared by the UNets and the ControlNet: each down block leaves its skip tensors on
    a stack (the input first), then the mid block runs at the lowest resolution. Returns (mid output, skips).
    NCSN++'s skip blocks also take the model's input ``image``, downsampled from block to block."""
    skips = [sample]
    for block in down_blocks:
        if isinstance(block, SkipDownBlock2D):
            sample, block_skips, image = block(sample, temb, image)
        else:
            sample, block_skips = block(sample, temb, encoder_hidden_states, encoder_attention_mask)
        skips.extend(block_skips)
    if mid_block is not None:
        sample = mid_block(sample, temb, encoder_hidden_states, encoder_attention_mask)
    return sample, skips


def run_unet_blocks(down_blocks: nn.ModuleList, mid_block: nn.Module | None, up_blocks: nn.ModuleList,
                    sample: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                    down_residuals: tuple[torch.Tensor, ...] | None = None,
                    mid_residual: torch.Tensor | None = None,
                    encoder_attention_mask: torch.Tensor | None = None,
                    image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The U: the encoder half (``run_encoder_blocks``), then each up block takes back as many skips as it has
    resnets. Upsamplers resize to the size of the next skip tensor, so inputs whose size is not a multiple of
    2^levels work (diffusers' ``upsample_size``). ControlNet (Zhang et al. 2023, Eq. 4 / Fig. 3): the residuals
    ``down_residuals`` (one per skip) are added to the skips and ``mid_residual`` to the mid block's output.
    Returns (sample, the output image of NCSN++'s skip up blocks, to add to the model's output; None without them)."""
    sample, skips = run_encoder_blocks(down_blocks, mid_block, sample, temb, encoder_hidden_states,
                                       encoder_attention_mask, image)
    if down_residuals is not None:
        skips = [skip + residual for skip, residual in zip(skips, down_residuals)]  # (B, C_k, h_k, w_k) each
    if mid_residual is not None:
        sample = sample + mid_residual  # (B, C_last, h, w)
    output_image = None  # the up path builds its own image, from the lowest level up (as diffusers)
    for block in up_blocks:
        count = len(block.resnets)
        block_skips, skips = tuple(skips[-count:]), skips[:-count]
        upsample_size = tuple(skips[-1].shape[2:]) if skips else None
        if isinstance(block, SkipUpBlock2D):
            sample, output_image = block(sample, block_skips, temb, output_image)
        else:
            sample = block(sample, block_skips, temb, encoder_hidden_states, upsample_size, encoder_attention_mask)
    return sample, output_image
