"""The convolutional pieces of the UNets and the VAE: ResnetBlock2D, Downsample2D, Upsample2D, FirResample2D.

The residual block is the one of the DDPM UNet (Ho et al. 2020, Appendix B, after Wide ResNets): two
GroupNorm -> SiLU -> 3x3 conv stages, the time embedding added in between, and a 1x1 conv on the skip path when the
channel count changes. Attribute names equal diffusers' state_dict keys (``norm1``, ``conv1``, ``time_emb_proj``,
``norm2``, ``conv2``, ``conv_shortcut``), so checkpoints load without renaming.

The VAE reuses these blocks with ``temb_channels=None`` (no time embedding) and ``Downsample2D(padding=0)``
(asymmetric zero pad, see ``Downsample2D``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.configuration import check_choice

# diffusers' activation names (models/activations.py ACT2CLS)
ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(name: str, key: str = "act_fn") -> nn.Module:
    """The activation module for a diffusers ``act_fn`` name (case-insensitive); ``key`` names the config option."""
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"{key}: activation {name!r} is not supported; "
                         f"accepted values: {', '.join(map(repr, ACTIVATIONS))}")
    return ACTIVATIONS[name.lower()]()


_IN_PLACE = {nn.SiLU: F.silu, nn.Mish: F.mish, nn.ReLU: F.relu}


def activate_temporary(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)`` for an ``x`` nothing else holds (a norm's fresh output): computed in place when autograd
    records nothing, so inference never holds the input and the output of an activation at once (at SD's largest
    resolution that is one ~250 MB buffer less at the memory peak). Same values either way."""
    in_place = _IN_PLACE.get(type(activation))
    if in_place is None or x.requires_grad:
        return activation(x)
    return in_place(x, inplace=True)


class Downsample2D(nn.Module):
    """Halve the spatial size: a 3x3 conv with stride 2 (``use_conv``) or a 2x2 average pool.

    ``padding=0`` is the VAE encoder's layout (from the LDM code): the input is zero-padded by one pixel on the right
    and bottom only, ``F.pad(x, (0, 1, 0, 1))``, before the stride-2 conv, so an even size H maps to H / 2.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError(f"Downsample2D without a conv keeps the channels: got {channels} -> {out_channels}")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) this layer returns for an input of that size (0 where it cannot run)."""
        def side(size: int) -> int:
            if not self.use_conv:
                return size // 2  # 2x2 average pool
            padded = size + 1 if self.padding == 0 else size + 2 * self.padding
            return (padded - 3) // 2 + 1 if padded >= 3 else 0
        return side(height), side(width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))  # (B, C, H, W) -> (B, C, H + 1, W + 1)
        return self.conv(hidden_states)  # -> (B, C_out, H / 2, W / 2)


class Upsample2D(nn.Module):
    """Double the spatial size (nearest neighbour), or resize to ``output_size`` when the skip connection it will be
    concatenated with has an odd size; then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            hidden_states = F.interpolate(hidden_states, size=tuple(output_size), mode="nearest")
        return self.conv(hidden_states) if self.conv is not None else hidden_states


FIR_KERNEL = (1, 3, 3, 1)  # NCSN++'s resampling filter (Song et al. 2021, after StyleGAN2's)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative pads crop), convolve each channel with ``kernel`` (a true
    convolution: the kernel is flipped), keep every ``down``-th pixel (StyleGAN2's upfirdn2d, Karras et al. 2020).
    (B, C, H, W) -> (B, C, (H*up + pad0 + pad1 - k) // down + 1, ...)."""
    batch, channels, height, width = x.shape
    if up > 1:
        spread = x.new_zeros(batch, channels, height * up, width * up)
        spread[:, :, ::up, ::up] = x  # each pixel followed by up - 1 zeros
        x = spread
    low, high = pad
    x = F.pad(x, [max(low, 0), max(high, 0), max(low, 0), max(high, 0)])
    x = x[:, :, max(-low, 0): x.shape[2] - max(-high, 0), max(-low, 0): x.shape[3] - max(-high, 0)]
    weight = torch.flip(kernel, [0, 1]).to(x)[None, None].expand(channels, 1, *kernel.shape)  # (C, 1, k, k)
    x = F.conv2d(x, weight, groups=channels)  # depthwise
    return x[:, :, ::down, ::down]


class FirResample2D(nn.Module):
    """Double (``up``) or halve the spatial size with the separable FIR filter ``FIR_KERNEL``, normalised to keep
    a constant image constant: NCSN++'s resampler (diffusers' parameter-free FirUpsample2D/FirDownsample2D and the
    ``kernel="fir"`` resnet up/down). Exactly 2H x 2W up, floor(H/2) x floor(W/2) down."""

    def __init__(self, up: bool, kernel: tuple[int, ...] = FIR_KERNEL):
        super().__init__()
        self.up = up
        taps = torch.tensor(kernel, dtype=torch.float32)
        self.register_buffer("kernel", torch.outer(taps, taps) / taps.sum() ** 2, persistent=False)  # (k, k)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (2 * height, 2 * width) if self.up else (height // 2, width // 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        k = self.kernel.shape[0]
        if self.up:  # the filter scaled by factor^2 = 4: zero insertion keeps one pixel in four
            return upfirdn2d(hidden_states, self.kernel * 4, up=2, pad=((k - 1) // 2 + 1, (k - 2) // 2))
        return upfirdn2d(hidden_states, self.kernel, down=2, pad=((k - 1) // 2, (k - 2) // 2))


class ResnetBlock2D(nn.Module):
    """``x -> (skip(x) + conv2(drop(act(norm2(conv1(act(norm1(x))) + proj(act(temb))))))) / output_scale_factor``.

    Options (diffusers' names):
      - ``temb_channels=None``: no time embedding (VAE).
      - ``time_embedding_norm="scale_shift"``: the embedding gives a scale and a shift applied after ``norm2``,
        ``h = norm2(h) * (1 + scale) + shift`` (Nichol & Dhariwal 2021, "adaptive group norm").
      - ``skip_time_act``: feed ``temb`` to ``time_emb_proj`` without the activation.
      - ``up`` / ``down``: resample both paths after the first activation (nearest x2 / 2x2 average pool), the
        "resnet" up/down samplers of ``ResnetUpsampleBlock2D`` / ``ResnetDownsampleBlock2D``; ``kernel="fir"``
        resamples with ``FirResample2D`` instead (NCSN++'s skip blocks).
      - ``use_in_shortcut``: force the 1x1 ``conv_shortcut`` (default: only when the channel count changes).
        diffusers' ``conv_shortcut=True`` flag has no effect in 0.42 (the shortcut is always 1x1), so it is not taken.
      - ``output_scale_factor``: divide the sum (the mid block of UNet2DModel uses ``mid_block_scale_factor``).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
        skip_time_act: bool = False,
        up: bool = False,
        down: bool = False,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        kernel: str | None = None,
    ):
        super().__init__()
        check_choice("resnet_time_scale_shift", time_embedding_norm, ("default", "scale_shift"))
        if up and down:
            raise ValueError("ResnetBlock2D cannot both upsample and downsample")
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            temb_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, temb_out)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(non_linearity)

        # parameter-free resamplers, so they add no state_dict keys
        check_choice("kernel", kernel, (None, "fir"))
        if kernel == "fir":
            self.upsample = FirResample2D(up=True) if up else None
            self.downsample = FirResample2D(up=False) if down else None
        else:
            self.upsample = Upsample2D(in_channels) if up else None
            self.downsample = Downsample2D(in_channels) if down else None

        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=conv_shortcut_bias) if use_in_shortcut else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = activate_temporary(self.nonlinearity, self.norm1(input_tensor))
        if self.upsample is not None:
            input_tensor, hidden_states = self.upsample(input_tensor), self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor, hidden_states = self.downsample(input_tensor), self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)  # (B, C_in, H, W) -> (B, C_out, H, W)

        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock2D was built with temb_channels and needs a time embedding `temb`")
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]  # (B, T) -> (B, C_out or 2 C_out, 1, 1)

        if self.time_embedding_norm == "scale_shift" and self.time_emb_proj is not None:
            scale, shift = temb.chunk(2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + scale) + shift
        else:
            if self.time_emb_proj is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)

        hidden_states = self.conv2(self.dropout(activate_temporary(self.nonlinearity, hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)  # 1x1: (B, C_in, H, W) -> (B, C_out, H, W)
        hidden_states = hidden_states.add_(input_tensor)  # in place: conv2's output is ours, and add needs no inputs
        return hidden_states if self.output_scale_factor == 1 else hidden_states / self.output_scale_factor
