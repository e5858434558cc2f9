"""UNet2DConditionModel: the text-conditioned denoising UNet of Latent Diffusion / Stable Diffusion 1.x, 2.x and XL
(Rombach et al. 2022, Sec. 3.3): a DDPM UNet whose attention layers are Transformer2DModels that cross-attend to
the text encoder's hidden states (``encoder_hidden_states``, LDM Eq. 1 with K, V from the text tokens).

``unet(sample, timestep, encoder_hidden_states).sample`` predicts epsilon (or v) with the shape of ``sample``.
SDXL (Podell et al. 2023, Sec. 2.1-2.2) is the same network with deeper transformers (``transformer_layers_per_block``)
and one more conditioning path, ``addition_embed_type="text_time"``: the pooled text embedding and the size/crop
"micro-conditioning" numbers (``added_cond_kwargs={"text_embeds", "time_ids"}``) are embedded and added to the time
embedding. A ControlNet (minidiff.models.controlnet) is a copy of this UNet's encoder half, built by the same code
(``TextConditionedEncoderMixin``, ``level_options``, ``make_mid_block``); its residuals enter ``forward`` as
``down_block_additional_residuals`` / ``mid_block_additional_residual``. Config fields and state_dict keys are
diffusers' ones; fields of diffusers' config that select features minidiff does not implement (Kandinsky's
projections, dual cross-attention, ...) are accepted at their default value and rejected with a ValueError otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minidiff.adapters.lora import scaled_lora
from minidiff.adapters.lora_loader import UNet2DConditionLoadersMixin
from minidiff.configuration import Config, check_choice
from minidiff.models.checks import check_heads, check_input_dtype, check_ints, check_output_scale, check_per_block, fail
from minidiff.models.embeddings import (
    GaussianFourierProjection,
    TimestepEmbedding,
    Timesteps,
    check_class_embedding,
    make_class_embedding,
)
from minidiff.models.resnet import activate_temporary, get_activation
from minidiff.models.unet_2d import UNetBase, batch_timesteps, check_common_config
from minidiff.models.unet_blocks import (
    SKIP_BLOCK_TYPES,
    CrossAttentionOptions,
    ResnetOptions,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    run_unet_blocks,
)
from minidiff.outputs import BaseOutput

# config fields whose other values select features minidiff does not implement: field -> accepted values
UNSUPPORTED_FIELDS = {
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}


@dataclass
class UNet2DConditionOutput(BaseOutput):
    sample: torch.Tensor  # (B, out_channels, H, W)


@dataclass
class UNet2DConditionConfig(Config):
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    # one int for all, one per block, or one list (an int per resnet layer) per block
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int | None, ...] | None = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False  # SDXL base/refiner config.json files say null (= False)
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64


def per_block(value: Any, count: int) -> list:
    """An int/bool/None setting repeated for each of ``count`` blocks, or the given per-block list."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def level_settings(c: UNet2DConditionConfig) -> dict[str, list]:
    """The per-level settings, one entry per resolution level (``up_depths``: per up block, deepest first)."""
    levels = len(c.block_out_channels)
    depths = per_block(c.transformer_layers_per_block, levels)
    return dict(
        heads=per_block(c.num_attention_heads or c.attention_head_dim, levels),
        head_dims=per_block(c.attention_head_dim, levels),
        cross_dims=per_block(c.cross_attention_dim, levels),
        layers=per_block(c.layers_per_block, levels),
        depths=depths,
        up_depths=list(c.reverse_transformer_layers_per_block or depths[::-1]),
        only_cross=per_block(c.only_cross_attention, levels),
    )


def lora_scale_of(cross_attention_kwargs: dict | None, owner: str = "UNet2DConditionModel") -> float | None:
    """The LoRA ``scale`` of ``cross_attention_kwargs``, the one key minidiff's attention takes."""
    if cross_attention_kwargs is None:
        return None
    if not isinstance(cross_attention_kwargs, dict):
        raise ValueError(f"cross_attention_kwargs must be a dict such as {{'scale': 0.5}} or None, got "
                         f"{type(cross_attention_kwargs).__name__}")
    unknown = sorted(map(str, set(cross_attention_kwargs) - {"scale"}))
    if unknown:
        raise ValueError(f"cross_attention_kwargs {unknown} are not supported by minidiff's {owner}; "
                         "the accepted key is 'scale' (the LoRA scale)")
    return cross_attention_kwargs.get("scale")


def text_token_bias(encoder_attention_mask: torch.Tensor | None, encoder_hidden_states: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor | None:
    """A keep (1) / hide (0) mask over the text tokens ``(B, tokens)`` as the additive score bias
    ``(1 - mask) * -10000`` of shape (B, 1, 1, tokens), broadcast over heads and queries (diffusers' numbers)."""
    if encoder_attention_mask is None:
        return None
    tokens = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape[:2])
    if not torch.is_tensor(encoder_attention_mask) or tuple(encoder_attention_mask.shape) != tokens:
        shape = tuple(encoder_attention_mask.shape) if torch.is_tensor(encoder_attention_mask) else None
        raise ValueError(f"encoder_attention_mask must be a tensor of shape (batch, tokens) = {tokens} (1 keeps a "
                         f"token, 0 hides it), got {shape or type(encoder_attention_mask).__name__}")
    return ((1 - encoder_attention_mask.to(dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, M)


def _is_pixel_attention(block_type: str) -> bool:
    return block_type.removeprefix("UNetRes") in ("AttnDownBlock2D", "AttnUpBlock2D")


def level_options(c: UNet2DConditionConfig) -> tuple[list[dict], list[dict]]:
    """The per-block extras of ``get_down_block`` (down block i) and ``get_up_block`` (up block i)."""
    channels, levels = list(c.block_out_channels), len(c.block_out_channels)
    settings = level_settings(c)
    heads, head_dims, cross_dims, layers = (settings[key] for key in ("heads", "head_dims", "cross_dims", "layers"))
    depths, up_depths, only_cross = settings["depths"], settings["up_depths"], settings["only_cross"]

    def level(i: int, down: bool) -> dict:
        j = i if down else levels - 1 - i  # up block i sits at the level of down block levels-1-i
        cross = CrossAttentionOptions(
            heads[j], cross_dims[j], depths[j] if down else up_depths[i], c.use_linear_projection,
            only_cross[j], c.upcast_attention,
        )
        return dict(num_layers=layers[j] + (0 if down else 1), cross=cross,
                    # diffusers indexes head sizes of up blocks by i, not reversed (only Attn*Block2D use them)
                    attention_head_dim=head_dims[i] if head_dims[i] is not None else channels[j],
                    resnet_skip_time_act=c.resnet_skip_time_act, resnet_out_scale_factor=c.resnet_out_scale_factor)

    down = [dict(level(i, True), downsample_padding=c.downsample_padding) for i in range(levels)]
    return down, [level(i, False) for i in range(levels)]


def make_mid_block(c: UNet2DConditionConfig, resnet: ResnetOptions) -> nn.Module | None:
    """The mid block of ``mid_block_type`` at the lowest level (heads, cross width and depth of the last level)."""
    channels, settings = list(c.block_out_channels), level_settings(c)
    mid_resnet = dataclasses.replace(resnet, output_scale_factor=c.mid_block_scale_factor)
    if c.mid_block_type == "UNetMidBlock2DCrossAttn":
        cross = CrossAttentionOptions(settings["heads"][-1], settings["cross_dims"][-1], settings["depths"][-1],
                                      c.use_linear_projection, upcast_attention=c.upcast_attention)
        return UNetMidBlock2DCrossAttn(channels[-1], mid_resnet, cross)
    if c.mid_block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(channels[-1], mid_resnet, add_attention=False, num_layers=0)
    return None


class TextConditionedEncoderMixin:
    """What UNet2DConditionModel and ControlNetModel share: the input convolution, the time / class / SDXL added
    embeddings and the checks of the conditioning inputs. ``encoder_config`` is the UNet2DConditionConfig these
    are built from (the ControlNet's is derived from its own config, see minidiff.models.controlnet)."""

    @property
    def encoder_config(self) -> UNet2DConditionConfig:
        return self.config

    def _build_embeddings(self, c: UNet2DConditionConfig) -> ResnetOptions:
        """``conv_in``, ``time_proj``, ``time_embedding``, ``class_embedding``, SDXL's ``add_time_proj`` /
        ``add_embedding`` and ``time_embed_act``; returns the resnet options of the blocks (their time width)."""
        channels = list(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, channels[0], kernel_size=c.conv_in_kernel,
                                 padding=(c.conv_in_kernel - 1) // 2)
        if c.time_embedding_type == "fourier":
            time_embed_dim = c.time_embedding_dim or channels[0] * 2
            self.time_proj = GaussianFourierProjection(time_embed_dim // 2, log=False,
                                                       flip_sin_to_cos=c.flip_sin_to_cos)
            timestep_input_dim = time_embed_dim
        else:
            time_embed_dim = c.time_embedding_dim or channels[0] * 4
            self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
            timestep_input_dim = channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=c.act_fn,
                                                post_act_fn=c.timestep_post_act, cond_proj_dim=c.time_cond_proj_dim)
        self.class_embedding = make_class_embedding(
            c.class_embed_type, c.num_class_embeds, time_embed_dim, timestep_input_dim, c.act_fn,
            c.projection_class_embeddings_input_dim,
        )
        if c.addition_embed_type == "text_time":  # SDXL: [pooled text, sinusoids of each time id] -> MLP
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)
        self.time_embed_act = get_activation(c.time_embedding_act_fn) if c.time_embedding_act_fn else None

        # the resnets see the time embedding, concatenated with the class embedding if class_embeddings_concat
        blocks_time_embed_dim = 2 * time_embed_dim if c.class_embeddings_concat else time_embed_dim
        return ResnetOptions(temb_channels=blocks_time_embed_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                             act_fn=c.act_fn, time_scale_shift=c.resnet_time_scale_shift, dropout=c.dropout)

    def _check_encoder_hidden_states(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> None:
        dims = sorted({m.cross_attention_dim for m in self.attention_modules() if m.is_cross_attention})
        if not dims:
            return
        if encoder_hidden_states is None:
            raise ValueError(f"this {type(self).__name__} cross-attends to text: pass encoder_hidden_states "
                             f"of shape (B, tokens, {dims[0]})")
        if not torch.is_tensor(encoder_hidden_states):
            raise ValueError(f"encoder_hidden_states must be a tensor (B, tokens, {dims[0]}), "
                             f"got {type(encoder_hidden_states).__name__}")
        shape = tuple(encoder_hidden_states.shape)
        if encoder_hidden_states.ndim != 3 or shape[-1] not in dims or shape[0] != sample.shape[0]:
            raise ValueError(
                f"encoder_hidden_states must have shape (B={sample.shape[0]}, tokens, cross_attention_dim="
                f"{dims[0] if len(dims) == 1 else dims}), got {shape}"
            )
        if shape[1] == 0:
            raise ValueError(f"encoder_hidden_states of shape {shape} hold no tokens; pass at least one")
        check_input_dtype("encoder_hidden_states", encoder_hidden_states, self.dtype)

    def _check_added_cond_kwargs(self, added_cond_kwargs: dict | None, sample: torch.Tensor) -> None:
        """A ``text_time`` UNet needs ``text_embeds (B, P)`` and ``time_ids (B, n)`` that fill its add_embedding's
        input; other UNets take none (None or an empty dict)."""
        c = self.encoder_config
        if c.addition_embed_type != "text_time":
            if added_cond_kwargs is not None and not (isinstance(added_cond_kwargs, dict) and not added_cond_kwargs):
                shown = sorted(added_cond_kwargs) if isinstance(added_cond_kwargs, dict) else \
                    type(added_cond_kwargs).__name__
                raise ValueError(f"added_cond_kwargs={shown} given, but this {type(self).__name__} has no added "
                                 "conditioning (addition_embed_type=None, an SD 1.x/2.x UNet); pass None, or use an "
                                 "SDXL UNet (addition_embed_type='text_time')")
            return
        width, per_id = c.projection_class_embeddings_input_dim, c.addition_time_embed_dim
        example = f'added_cond_kwargs={{"text_embeds": (B, P), "time_ids": (B, n)}} with P + n * {per_id} = {width}'
        if not isinstance(added_cond_kwargs, dict) or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
            given = sorted(added_cond_kwargs) if isinstance(added_cond_kwargs, dict) else added_cond_kwargs
            raise ValueError(f"this SDXL {type(self).__name__} (addition_embed_type='text_time') needs {example} "
                             f"(the SDXL pipelines pass the pooled text embedding and the size/crop ids); got {given}")
        unknown = sorted(set(added_cond_kwargs) - {"text_embeds", "time_ids"})
        if unknown:
            raise ValueError(f"added_cond_kwargs {unknown} are not used by a text_time UNet; pass only "
                             "'text_embeds' and 'time_ids'")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        batch = sample.shape[0]
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            if not torch.is_tensor(value) or value.ndim != 2 or value.shape[0] != batch:
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"added_cond_kwargs[{name!r}] must be a 2-D tensor with the batch of sample "
                                 f"(B={batch}, ...), got {got}; {example}")
            if name == "text_embeds" and not value.is_floating_point():  # time ids may be ints: sizes, crops
                raise ValueError(f"added_cond_kwargs[{name!r}] must be a floating-point tensor, got {value.dtype}")
        got = text_embeds.shape[1] + time_ids.shape[1] * per_id
        if got != width:
            ids = (width - text_embeds.shape[1]) / per_id
            wanted = f"{int(ids)} time ids" if ids == int(ids) and ids >= 0 else "another text_embeds width"
            raise ValueError(
                f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} give "
                f"{text_embeds.shape[1]} + {time_ids.shape[1]} * {per_id} = {got} features, but add_embedding takes "
                f"projection_class_embeddings_input_dim={width}: with this text_embeds width pass {wanted} "
                "(SDXL base: 6 = original size, crop top-left, target size; refiner: 5 = original size, crop, "
                "aesthetic score)"
            )

    def _text_time_embedding(self, added_cond_kwargs: dict, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's added embedding (Podell et al. 2023, Sec. 2.2): each time id (sizes, crop, aesthetic score) gets
        the sinusoidal features of a timestep, concatenated after the pooled text embedding, then an MLP."""
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]  # (B, P), (B, n)
        time_embeds = self.add_time_proj(time_ids.flatten())  # (B * n, addition_time_embed_dim)
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, n * addition_time_embed_dim)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))  # (B, time_embed_dim)

    def _check_timestep_cond(self, timestep_cond: torch.Tensor | None, sample: torch.Tensor) -> None:
        """LCM's guidance embedding: (B, time_cond_proj_dim) for a UNet built with time_cond_proj_dim, else None."""
        dim = getattr(self.encoder_config, "time_cond_proj_dim", None)
        if timestep_cond is None:
            return
        if dim is None:
            raise ValueError(f"timestep_cond was given but this {type(self).__name__} has no time_cond_proj_dim "
                             "(only LCM-distilled UNets take a guidance embedding); pass None")
        if not torch.is_tensor(timestep_cond) or tuple(timestep_cond.shape) != (sample.shape[0], dim):
            shape = tuple(timestep_cond.shape) if torch.is_tensor(timestep_cond) else type(timestep_cond).__name__
            raise ValueError(f"timestep_cond must be a tensor of shape (B={sample.shape[0]}, time_cond_proj_dim="
                             f"{dim}), got {shape}")
        check_input_dtype("timestep_cond", timestep_cond, self.dtype)

    def _check_conditioning(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                            added_cond_kwargs: dict | None, timestep_cond: torch.Tensor | None) -> None:
        self._check_sample(sample)
        self._check_timestep_cond(timestep_cond, sample)
        self._check_encoder_hidden_states(sample, encoder_hidden_states)
        self._check_added_cond_kwargs(added_cond_kwargs, sample)

    def _embed(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None,
               added_cond_kwargs: dict | None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding every resnet sees (B, time_embed_dim): MLP(sinusoids of t [+ LCM's projected
        ``timestep_cond``]) + class and SDXL embeddings."""
        c = self.encoder_config
        timesteps = batch_timesteps(timestep, sample.shape[0], sample.device, torch.float64)  # (B,)
        t_emb = self.time_proj(timesteps).to(sample.dtype)  # (B, C0)
        emb = self.time_embedding(t_emb, timestep_cond)  # (B, C0) -> (B, time_embed_dim)
        class_emb = self._class_embedding(class_labels, sample.dtype, sample.shape[0])
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if c.class_embeddings_concat else emb + class_emb
        if c.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, emb.dtype)  # (B, time_embed_dim)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb


class UNet2DConditionModel(TextConditionedEncoderMixin, UNetBase, UNet2DConditionLoadersMixin):
    """Text-conditioned denoising UNet: ``unet(sample, timestep, encoder_hidden_states).sample``.

    Naming quirk kept from diffusers: ``attention_head_dim`` is the number of heads of each level's
    Transformer2DModels (SD 1.x: 8; SD 2.x: [5, 10, 20, 20], i.e. heads of 64 channels); ``num_attention_heads``,
    when set, overrides it (diffusers 0.42 itself refuses configs that set it). The mid block uses the last entry.
    """

    config_class = UNet2DConditionConfig

    def __init__(self, **kwargs: Any):
        super().__init__()
        c = self.register_config(kwargs)
        self._check_config(c)
        resnet = self._build_embeddings(c)
        self._build_blocks(resnet, *level_options(c), lambda: make_mid_block(c, resnet))

        channels = list(c.block_out_channels)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self.conv_act = get_activation(c.act_fn)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, kernel_size=c.conv_out_kernel,
                                  padding=(c.conv_out_kernel - 1) // 2)
        self.to(memory_format=torch.channels_last)  # NHWC weights and activations: see ModelMixin

    @staticmethod
    def _check_config(c: UNet2DConditionConfig) -> None:
        for name, accepted in UNSUPPORTED_FIELDS.items():
            if getattr(c, name) not in accepted:
                raise ValueError(
                    f"{name}={getattr(c, name)!r} is not supported by minidiff's UNet2DConditionModel; "
                    f"accepted values: {', '.join(map(repr, accepted))}"
                )
        check_choice("mid_block_type", c.mid_block_type, ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None))
        check_choice("time_embedding_type", c.time_embedding_type, ("positional", "fourier"))
        for key in ("down_block_types", "up_block_types"):
            skip = [name for name in c[key] if name in SKIP_BLOCK_TYPES]
            if skip:
                raise ValueError(f"{key}: {skip[0]} is an NCSN++ block of UNet2DModel (it needs the input image, "
                                 "which this model does not route); use UNet2DModel")
        check_class_embedding(c.class_embed_type, c.projection_class_embeddings_input_dim)
        if c.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if c[key] is None:
                    fail(key, None, "addition_embed_type='text_time' embeds the time ids and the pooled text with it",
                         f"set {key} (SDXL base: addition_time_embed_dim=256, "
                         "projection_class_embeddings_input_dim=2816)")
        for name in ("time_embedding_act_fn", "timestep_post_act"):
            if getattr(c, name) is not None:
                get_activation(getattr(c, name), name)
        check_common_config(c)
        check_per_block(c, len(c.block_out_channels), "only_cross_attention", "attention_head_dim",
                        "num_attention_heads", "cross_attention_dim", "layers_per_block",
                        "transformer_layers_per_block", "reverse_transformer_layers_per_block")
        depths = c.transformer_layers_per_block
        if isinstance(depths, (list, tuple)) and c.reverse_transformer_layers_per_block is None and any(
            isinstance(d, (list, tuple)) for d in depths
        ):
            raise ValueError("per-layer transformer_layers_per_block lists need reverse_transformer_layers_per_block")
        check_ints(c, "time_cond_proj_dim")
        check_ints(c, "cross_attention_dim", "attention_head_dim", "num_attention_heads", "conv_in_kernel",
                   "conv_out_kernel", "projection_class_embeddings_input_dim", "addition_time_embed_dim")
        check_ints(c, "transformer_layers_per_block", "reverse_transformer_layers_per_block", minimum=0)
        check_output_scale(c, "resnet_out_scale_factor")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if c[key] % 2 == 0:
                fail(key, c[key], "an even kernel changes the image size", f"use an odd {key} such as 3")
        if c.time_embedding_type == "fourier" and (c.time_embedding_dim or 2 * c.block_out_channels[0]) % 2:
            fail("time_embedding_dim", c.time_embedding_dim, "time_embedding_type='fourier' needs an even "
                 "time_embedding_dim", "use an even time_embedding_dim")
        if c.class_embeddings_concat and c.class_embed_type is None and c.num_class_embeds is None:
            fail("class_embeddings_concat", True, "there is no class embedding to concatenate",
                 "set class_embed_type or num_class_embeds, or class_embeddings_concat=false")
        UNet2DConditionModel._check_levels(c, level_settings(c))

    @staticmethod
    def _check_levels(c: UNet2DConditionConfig, settings: dict[str, list]) -> None:
        """Heads fit the channels of each level that has attention; per-layer transformer depths have one entry
        per resnet layer."""
        channels, levels = list(c.block_out_channels), len(c.block_out_channels)
        heads_key = "num_attention_heads" if c.num_attention_heads else "attention_head_dim"
        cross_levels = [j for j, name in enumerate(c.down_block_types) if "CrossAttn" in name]
        cross_levels += [levels - 1 - i for i, name in enumerate(c.up_block_types) if "CrossAttn" in name]
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            cross_levels.append(levels - 1)
        cross_dims = {settings["cross_dims"][j] for j in cross_levels}
        if len(cross_dims) > 1:
            fail("cross_attention_dim", c.cross_attention_dim, f"gives the cross-attention levels different widths "
                 f"{sorted(cross_dims)}, but one encoder_hidden_states tensor feeds them all",
                 "give every cross-attention block the text encoder's hidden_size")
        for j in sorted(set(cross_levels)):
            heads = settings["heads"][j]
            if heads is None:
                fail("attention_head_dim", c.attention_head_dim, f"gives level {j} no number of heads",
                     "set attention_head_dim (the number of heads, per block or for all)")
            check_heads(heads_key, c[heads_key], j, heads, channels[j], "this head count")
        pixel_levels = [(i, i) for i, name in enumerate(c.down_block_types) if _is_pixel_attention(name)]
        pixel_levels += [(i, levels - 1 - i) for i, name in enumerate(c.up_block_types) if _is_pixel_attention(name)]
        for i, j in pixel_levels:  # as diffusers, block i's head size is attention_head_dim[i], also for up blocks
            head_dim = settings["head_dims"][i] or channels[j]
            check_heads("attention_head_dim", c.attention_head_dim, j, channels[j] // head_dim, channels[j],
                        "this head size")
        for key, blocks in (("transformer_layers_per_block", [(j, j, 0) for j in range(levels)]),
                            ("reverse_transformer_layers_per_block", [(i, levels - 1 - i, 1) for i in range(levels)])):
            depths = settings["depths" if key == "transformer_layers_per_block" else "up_depths"]
            for i, j, extra in blocks:
                needed = settings["layers"][j] + extra
                if isinstance(depths[i], (list, tuple)) and len(depths[i]) != needed:
                    fail(key, c[key], f"block {i} has {needed} resnet layer(s) but {len(depths[i])} depth(s)",
                         f"give block {i} one depth per resnet layer ({needed})")

    def _skip_shapes(self, sample: torch.Tensor) -> list[tuple[int, int, int]]:
        """(C, h, w) of each skip tensor the down blocks leave for the up blocks: conv_in's output, then each
        resnet layer's and each downsampler's output. A ControlNet's ``down_block_res_samples`` match these."""
        channels = list(self.config.block_out_channels)
        size = tuple(sample.shape[-2:])
        shapes = [(channels[0], *size)]
        for i, block in enumerate(self.down_blocks):
            shapes += [(channels[i], *size)] * len(block.resnets)
            if block.downsamplers is not None:
                size = self._downsampled(block, size)
                shapes.append((channels[i], *size))
        return shapes

    def _check_residuals(self, sample: torch.Tensor, down_residuals: Any, mid_residual: Any) -> None:
        """ControlNet residuals: both or neither; one per skip tensor, each of the skip's shape (B, C, h, w), or
        (B, C, 1, 1) as a ``global_pool_conditions`` ControlNet gives (broadcast over the map, as in diffusers)."""
        if down_residuals is None and mid_residual is None:
            return
        if down_residuals is None or mid_residual is None:
            given, missing = (("down_block_additional_residuals", "mid_block_additional_residual")
                              if mid_residual is None else
                              ("mid_block_additional_residual", "down_block_additional_residuals"))
            raise ValueError(f"{given} was given without {missing}: pass both (a ControlNet's down_block_res_samples "
                             "and mid_block_res_sample) or neither; T2I-Adapter intrablock residuals are not supported")
        shapes = self._skip_shapes(sample)
        if not isinstance(down_residuals, (list, tuple)) or len(down_residuals) != len(shapes):
            count = len(down_residuals) if isinstance(down_residuals, (list, tuple)) else type(down_residuals).__name__
            raise ValueError(f"down_block_additional_residuals must be a tuple of {len(shapes)} tensors (one per "
                             f"down-block residual of this UNet: conv_in, each resnet layer and each downsampler), "
                             f"got {count}; use a ControlNet built from this UNet's config (ControlNetModel.from_unet)")
        mid_size = shapes[-1][1:]  # the last level's size (its block has no downsampler)
        expected = [(f"down_block_additional_residuals[{i}]", r, s) for i, (r, s) in enumerate(zip(down_residuals,
                                                                                                    shapes))]
        expected.append(("mid_block_additional_residual", mid_residual, (self.config.block_out_channels[-1],
                                                                        *mid_size)))
        batch = sample.shape[0]
        for name, residual, (channels, height, width) in expected:
            if not torch.is_tensor(residual):
                raise ValueError(f"{name} must be a tensor of shape ({batch}, {channels}, {height}, {width}), "
                                 f"got {type(residual).__name__}")
            shape = tuple(residual.shape)
            if residual.ndim != 4 or shape[0] not in (1, batch) or shape[1] != channels or \
                    shape[2:] not in ((height, width), (1, 1)):
                raise ValueError(
                    f"{name} has shape {shape} but the UNet expects ({batch}, {channels}, {height}, {width}) (or "
                    f"({batch}, {channels}, 1, 1) from a global_pool_conditions ControlNet) for sample "
                    f"{tuple(sample.shape)}; the ControlNet must share this UNet's block_out_channels, "
                    "layers_per_block and down_block_types, and take a sample of the same size"
                )
            check_input_dtype(name, residual, self.dtype)

    def _unet(self, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states=None,
              down_residuals: tuple[torch.Tensor, ...] | None = None,
              mid_residual: torch.Tensor | None = None,
              encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """UNetBase._unet with the ControlNet residuals (and the text-token mask) passed to the U."""
        sample = self.conv_in(sample)  # (B, C_in, H, W) -> (B, C0, H, W)
        sample, _ = run_unet_blocks(self.down_blocks, self.mid_block, self.up_blocks, sample, emb,
                                    encoder_hidden_states, down_residuals, mid_residual, encoder_attention_mask)
        sample = activate_temporary(self.conv_act, self.conv_norm_out(sample))
        sample = self.conv_out(sample)  # (B, C0, H, W) -> (B, C_out, H, W)
        return sample.contiguous()  # NHWC inside, NCHW out

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        *,
        return_dict: bool = True,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> UNet2DConditionOutput | tuple:
        """``sample (B, in_channels, H, W)``, ``timestep`` (number or tensor, broadcast over the batch),
        ``encoder_hidden_states (B, tokens, cross_attention_dim)`` (the text encoder's last hidden states).
        ``cross_attention_kwargs={"scale": s}`` scales the unfused LoRA adapters for this call (as diffusers).
        ``added_cond_kwargs={"text_embeds": (B, P), "time_ids": (B, n)}``: SDXL's added conditioning, required by a
        ``text_time`` UNet (P + n * addition_time_embed_dim = projection_class_embeddings_input_dim) and refused by
        others. ``timestep_cond (B, time_cond_proj_dim)``: an LCM-distilled UNet's guidance-scale embedding
        (``guidance_scale_embedding``), None for other UNets. ``down_block_additional_residuals`` /
        ``mid_block_additional_residual``: a ControlNetModel's outputs, added to the skip tensors and to the mid
        block's output.
        ``encoder_attention_mask (B, tokens)``: 1 keeps a text token, 0 hides it from every cross-attention (a bias of
        -10000 on its scores, as diffusers)."""
        lora_scale = lora_scale_of(cross_attention_kwargs)
        self._check_conditioning(sample, encoder_hidden_states, added_cond_kwargs, timestep_cond)
        self._check_residuals(sample, down_block_additional_residuals, mid_block_additional_residual)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        with scaled_lora(self, lora_scale):  # every adapted layer, the time/class embeddings too (as diffusers)
            emb = self._embed(sample, timestep, class_labels, added_cond_kwargs, timestep_cond)  # (B, time_embed_dim)
            output = self._unet(sample, emb, encoder_hidden_states, down_block_additional_residuals,
                                mid_block_additional_residual,
                                text_token_bias(encoder_attention_mask, encoder_hidden_states, sample.dtype))
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)
