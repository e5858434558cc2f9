"""Attention layers of the UNets and the VAE, with diffusers' attribute names (``to_q``, ``to_k``, ``to_v``,
``to_out.0``, ``group_norm``; ``attn1``, ``attn2``, ``ff.net.0.proj``, ``ff.net.2``; ``norm``, ``proj_in``,
``transformer_blocks``, ``proj_out``).

- ``Attention``: multi-head scaled dot-product attention (Vaswani et al. 2017, Eq. 1) over tokens or over the pixels
  of a feature map, self- or cross-attention. Every call goes through ``minidiff.ops.attention``, whose backend is
  chosen per model (``set_attention_backend``) or for a ``with ops.use_backend(...)`` block.
- ``FeedForward`` with ``GEGLU`` (Shazeer 2020), the MLP of the transformer block; the gating is the ``geglu`` op.
- ``BasicTransformerBlock``: pre-LayerNorm self-attention, cross-attention on the text tokens, feed-forward, each
  with a residual connection: the conditioning mechanism of Latent Diffusion (Rombach et al. 2022, Eq. 1-3).
- ``Transformer2DModel``: GroupNorm -> project in (1x1 conv or Linear) -> transformer blocks over the H*W pixel tokens
  -> project out -> + input.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from minidiff import ops
from minidiff.models.attention_processor import AttnProcessor, apply_processor, processor_of
from minidiff.models.modeling import checkpointed


class Attention(nn.Module):
    """``softmax(Q K^T / sqrt(d)) V`` with ``heads`` heads of size ``dim_head`` (Vaswani et al. 2017, Eq. 1).

    ``Q = to_q(x)``, ``K = to_k(c)``, ``V = to_v(c)`` where ``c`` is ``encoder_hidden_states`` (cross-attention,
    LDM Eq. 1: Q from the image, K/V from the text tokens) or ``x`` itself (self-attention).

    The options used by the UNet2DModel attention blocks and the VAE's mid-block (diffusers' names):
      - ``norm_num_groups``: a GroupNorm (``group_norm``, ``eps``) on the input before the projections;
      - ``residual_connection``: add the input to the output; ``rescale_output_factor``: divide the result by it;
      - ``bias``: biases on ``to_q/to_k/to_v`` (False in the transformer blocks); ``out_bias``: bias on ``to_out.0``;
      - ``upcast_attention`` / ``upcast_softmax``: scores and softmax in float32 (only matters in fp16/bf16;
        diffusers' default SDPA processor ignores both flags, its legacy processor honours them).
    A 4-D input ``(B, C, H, W)`` is attended over its H*W pixels and returned as ``(B, C, H, W)``.
    The VAE mid-block: ``Attention(C, heads=1, dim_head=C, norm_num_groups=G, eps=1e-6, bias=True,
    residual_connection=True, upcast_softmax=True, rescale_output_factor=1.0)``.

    ``backend`` (None: the global default) and ``chunk_size`` (rows per slice for the ``chunked`` backend) are the
    per-module kernel choice; ``set_attention_backend`` / ``enable_attention_slicing`` on a model set them.
    ``slice_size`` (diffusers' ``set_attention_slice``): attend ``slice_size`` of the batch x heads score matrices
    at a time, as diffusers' SlicedAttnProcessor; ``sliceable_head_dim`` (= heads) bounds it.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        if heads < 1 or dim_head < 1:
            raise ValueError(f"Attention needs heads >= 1 and dim_head >= 1, got heads={heads}, dim_head={dim_head}")
        inner_dim = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head**-0.5
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast = upcast_attention or upcast_softmax
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.backend: str | None = None
        self.chunk_size: int | None = None
        self.sliceable_head_dim = heads
        self.slice_size: int | None = None
        self.processor = None  # the diffusers-style processor object last set (attention_processor.apply_processor)

        self.group_norm = nn.GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups is not None else None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``: an additive bias on the scores that broadcasts to (B, heads, N, M), e.g. (B, 1, 1, M)
        with -10000 on the key tokens to ignore (the UNet's ``encoder_attention_mask``)."""
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # norm over C

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if context.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"attention keys/values need {self.cross_attention_dim} features per token, "
                             f"got shape {tuple(context.shape)}")
        q = rearrange(self.to_q(hidden_states), "b n (h d) -> b h n d", h=self.heads)  # (B, N, h*d) -> (B, h, N, d)
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)  # (B, M, h*d) -> (B, h, M, d)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)
        out = self._attention(q, k, v, attention_mask)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, h, N, d) -> (B, N, h*d)
        out = self.to_out[1](self.to_out[0](out))  # (B, N, h*d) -> (B, N, C)

        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)  # (B, H*W, C) -> (B, C, H, W)
        if self.residual_connection:
            out = out + residual
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The kernel call on (B, h, N, d) queries; with ``slice_size``, over slices of the B*h matrices."""
        options = dict(scale=self.scale, upcast=self.upcast, backend=self.backend, chunk_size=self.chunk_size)
        if self.slice_size is None:
            return ops.attention(q, k, v, mask=mask, **options)
        batch, heads = q.shape[:2]
        flat = [t.flatten(0, 1) for t in (q, k, v)]  # (B*h, N or M, d)
        if mask is not None:
            mask = mask.expand(batch, heads, *mask.shape[2:]).flatten(0, 1)  # (B*h, 1 or N, M)
        out = torch.cat([ops.attention(*(t[i:i + self.slice_size] for t in flat), **options,
                                       mask=None if mask is None else mask[i:i + self.slice_size])
                         for i in range(0, batch * heads, self.slice_size)])  # (B*h, N, d)
        return out.unflatten(0, (batch, heads))  # (B, h, N, d)

    def set_attention_slice(self, slice_size: int | None) -> None:
        if slice_size is not None and (not isinstance(slice_size, int) or not 1 <= slice_size <= self.heads):
            raise ValueError(f"slice_size={slice_size!r} must be an int in [1, {self.heads}] (this attention's "
                             "heads) or None")
        self.slice_size = slice_size


class GEGLU(nn.Module):
    """``proj`` to twice ``dim_out``, then ``value * GELU(gate)`` (Shazeer 2020) through ``ops.geglu``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.geglu(self.proj(hidden_states))  # (B, N, dim_in) -> (B, N, 2 dim_out) -> (B, N, dim_out)


class FeedForward(nn.Module):
    """The transformer MLP: ``GEGLU(dim -> mult * dim)`` -> dropout -> ``Linear(mult * dim -> dim)``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """``x += attn1(norm1(x)); x += attn2(norm2(x), text); x += ff(norm3(x))`` (LDM, Rombach et al. 2022, Eq. 1).

    ``only_cross_attention``: ``attn1`` also attends to the text tokens instead of to ``x`` (so both attentions
    are cross-attentions). Without ``cross_attention_dim`` the block has no ``attn2``/``norm2``.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        if only_cross_attention and cross_attention_dim is None:
            raise ValueError("only_cross_attention needs a cross_attention_dim")
        self.only_cross_attention = only_cross_attention
        heads = dict(heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                     upcast_attention=upcast_attention)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None, **heads)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **heads)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        context1 = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), context1)  # (B, N, C)
        if self.attn2 is not None:  # the text-token mask applies to the cross-attention, as in diffusers
            hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), encoder_hidden_states,
                                                       encoder_attention_mask)
        return hidden_states + self.ff(self.norm3(hidden_states))


class Transformer2DModel(nn.Module):
    """Transformer over the pixels of a feature map (the "SpatialTransformer" of LDM, Rombach et al. 2022, Sec. 3.3).

    ``(B, C, H, W) -> GroupNorm(eps 1e-6) -> proj_in -> (B, H*W, inner) -> blocks -> proj_out -> (B, C, H, W) + input``
    with ``inner = num_attention_heads * attention_head_dim``. ``use_linear_projection`` (SD 2.x) projects with a
    Linear after flattening instead of a 1x1 conv before it (same maths, different weight shapes).
    With gradient checkpointing on, each transformer block is recomputed in the backward pass (as in diffusers).
    """

    gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
        attention_bias: bool = False,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        if inner_dim < 1:
            raise ValueError(f"{in_channels} channels split into {num_attention_heads} heads leave "
                             f"attention_head_dim={attention_head_dim}")
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        projection = nn.Linear if use_linear_projection else lambda i, o: nn.Conv2d(i, o, kernel_size=1)
        self.proj_in = projection(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, num_attention_heads, attention_head_dim, cross_attention_dim=cross_attention_dim,
                dropout=dropout, attention_bias=attention_bias, only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
            )
            for _ in range(num_layers)
        )
        self.proj_out = projection(inner_dim, in_channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        _, _, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        if self.use_linear_projection:
            hidden_states = self.proj_in(rearrange(hidden_states, "b c h w -> b (h w) c"))  # (B, H*W, inner)
        else:
            hidden_states = rearrange(self.proj_in(hidden_states), "b c h w -> b (h w) c")  # (B, H*W, inner)
        for block in self.transformer_blocks:
            hidden_states = checkpointed(self, block, hidden_states, encoder_hidden_states, encoder_attention_mask)
        if self.use_linear_projection:
            hidden_states = rearrange(self.proj_out(hidden_states), "b (h w) c -> b c h w", h=height, w=width)
        else:
            hidden_states = self.proj_out(rearrange(hidden_states, "b (h w) c -> b c h w", h=height, w=width))
        return hidden_states + residual  # (B, C, H, W)


class AttentionBackendMixin:
    """Per-model choice of the attention kernel, for every ``Attention`` inside the model (UNets, VAE)."""

    def attention_modules(self) -> list[Attention]:
        return [module for module in self.modules() if isinstance(module, Attention)]

    def set_attention_backend(self, name: str | None) -> None:
        """Serve this model's attention with backend ``name`` (``ops.available_backends("attention")``);
        None returns to the global default. A ``with ops.use_backend(...)`` block still overrides it."""
        if name is not None and name not in ops.available_backends("attention"):
            raise ValueError(
                f"unknown attention backend {name!r}; registered backends: {ops.available_backends('attention')}"
            )
        for module in self.attention_modules():
            module.backend = name

    def enable_attention_slicing(self, slice_size: int | None = None) -> None:
        """Bound attention memory: the ``chunked`` backend with ``slice_size`` query rows per slice (None: sized so
        one score block stays under ``ops.attention.SCORE_BUDGET_BYTES``). Unlike diffusers, slices run over query
        rows, not heads."""
        if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
            raise ValueError(f"slice_size must be a positive int (query rows per slice) or None, got {slice_size!r}")
        for module in self.attention_modules():
            module.backend, module.chunk_size = "chunked", slice_size

    def disable_attention_slicing(self) -> None:
        """Back to the global default backend and no per-model slice size."""
        for module in self.attention_modules():
            module.backend, module.chunk_size = None, None

    @property
    def attn_processors(self) -> dict[str, Any]:
        """diffusers' ``{"<module path>.processor": processor}``, one per attention layer: objects that name each
        layer's kernel (see ``minidiff.models.attention_processor``)."""
        return {f"{name}.processor": processor_of(module) for name, module in self._named_attention_modules()}

    def set_attn_processor(self, processor: Any) -> None:
        """Choose the kernel of every attention layer (one processor) or of each (a dict keyed like
        ``attn_processors``): ``AttnProcessor``/``AttnProcessor2_0``/``SlicedAttnProcessor`` (minidiff's or
        diffusers') or ``BackendProcessor(name)``; processors with code of their own are refused, naming the fix."""
        modules = dict(self._named_attention_modules())
        if isinstance(processor, dict):
            keys = {f"{name}.processor" for name in modules}
            if set(processor) != keys:
                raise ValueError(f"a dict of processors needs one entry per attention layer, keyed as attn_processors: "
                                 f"the number of processors ({len(processor)}) or their keys do not match the "
                                 f"{len(keys)} attention layers, e.g. {sorted(set(processor) ^ keys)[:2]}")
        for name, module in modules.items():
            key = f"{name}.processor"
            apply_processor(module, processor[key] if isinstance(processor, dict) else processor, key)

    def set_default_attn_processor(self) -> None:
        """diffusers' reset to its plain ``AttnProcessor``: the ``math`` backend, no slicing, in every layer."""
        self.set_attn_processor(AttnProcessor())

    def _named_attention_modules(self) -> list[tuple[str, Attention]]:
        return [(name, module) for name, module in self.named_modules() if isinstance(module, Attention)]

    def set_attention_slice(self, slice_size: int | str | list[int | None] | None) -> None:
        """diffusers' head slicing: each attention attends ``slice_size`` of its batch x heads score matrices at a
        time (``"auto"``: half its heads, at least 1; ``"max"``: one; an int for all; a list with one entry per
        attention layer; None: off). ``enable_attention_slicing`` bounds memory by query rows instead."""
        modules = self.attention_modules()
        if slice_size == "auto":
            sizes = [max(1, m.sliceable_head_dim // 2) for m in modules]
        elif slice_size == "max":
            sizes = [1] * len(modules)
        elif isinstance(slice_size, list):
            if len(slice_size) != len(modules):
                raise ValueError(f"slice_size has {len(slice_size)} entries but {type(self).__name__} has "
                                 f"{len(modules)} attention layers; give one per layer, or one int for all")
            sizes = slice_size
        else:
            sizes = [slice_size] * len(modules)
        for module, size in zip(modules, sizes):
            module.set_attention_slice(size)
