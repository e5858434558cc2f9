"""CLIPTextModel: the text tower of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", Sec. 2.4), the prompt encoder of Stable Diffusion.

A pre-LayerNorm transformer with a causal self-attention mask (GPT-2 style, Sec. 2.4: "masked self-attention was
used in the text encoder"). Stable Diffusion 1.x uses OpenAI's ViT-L/14 text tower (12 layers, width 768,
``quick_gelu``); 2.x uses OpenCLIP ViT-H/14's tower (width 1024, exact ``gelu``) with its last of 24 layers dropped,
so the pipeline reads the penultimate layer. Both are this one class in transformers' layout: attribute paths equal
transformers 5.x's state_dict keys (``encoder.layers.0.self_attn.q_proj.weight``); older checkpoints with a
``text_model.`` prefix load too.

SDXL's second text encoder is OpenCLIP ViT-bigG/14's tower with its projection head: ``CLIPTextModelWithProjection``,
the same tower under ``text_model.`` plus ``text_projection`` (a bias-free Linear, CLIP Sec. 2.5's W_t) applied to
the pooled end-of-text state; SDXL reads that projection and the penultimate layer's hidden states.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minidiff import ops
from minidiff.configuration import Config, check_choice
from minidiff.models.attention import AttentionBackendMixin
from minidiff.models.checks import check_ints, check_positive_floats, fail
from minidiff.models.modeling import ModelMixin, checkpointed
from minidiff.outputs import BaseOutput

TRANSFORMERS_VERSION = "5.23.0"

# Keys that transformers' PretrainedConfig writes into every config.json (bookkeeping, generation and
# fine-tuning defaults of transformers 4.x and 5.x). None of them changes the text tower's architecture.
TRANSFORMERS_BOOKKEEPING_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "name_or_path", "dropout",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label",
    "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type", "gradient_checkpointing",
})

def constructor_kwargs(cls: type, config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords of ``cls(config)``, transformers' form, where ``config`` is a CLIPTextConfig of either library
    (or a mapping): its keys checked as a config.json's (bookkeeping keys dropped, unknown ones refused). Keywords
    alone are minidiff's form and pass through."""
    if config is None:
        return kwargs
    if kwargs:
        raise TypeError(f"{cls.__name__}(config) takes no other arguments, got {sorted(kwargs)}: put them in the "
                        "config, or pass keywords only")
    if not isinstance(config, Mapping) and not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"{cls.__name__}(config): config must be a CLIPTextConfig (minidiff's or transformers') or a "
                        f"mapping, got {type(config).__name__}")
    values = dict(config) if isinstance(config, Mapping) else config.to_dict()
    return cls.config_from_file_values(values, f"{cls.__name__}(config)")


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,  # exact (erf) GELU, OpenCLIP
}


@dataclass
class CLIPTextConfig(Config):
    """transformers' CLIPTextConfig keys and defaults (the OpenAI ViT-B/32 text tower)."""

    lists_default_values = False  # transformers' configs have no _use_default_values
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512  # used only by CLIPTextModelWithProjection; kept for round trips
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407


@dataclass
class CLIPTextModelOutput(BaseOutput):
    """``last_hidden_state`` (B, N, C) after the final LayerNorm; ``pooler_output`` (B, C), the state at the
    end-of-text token; ``hidden_states``: the embeddings and the output of every layer (before the final
    LayerNorm), ``num_hidden_layers + 1`` tensors, only when asked for (clip_skip reads ``hidden_states[-(k+1)]``)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.position_ids[:, : input_ids.shape[1]]  # (1, N)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)  # (B, N, C)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; the kernel comes from ``minidiff.ops``
    (``backend``/``chunk_size``: the per-model choice set by ``set_attention_backend``/``enable_attention_slicing``)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.scale = (width // self.heads) ** -0.5
        self.backend: str | None = None
        self.chunk_size: int | None = None
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape

        def split_heads(x):  # (B, N, C) -> (B, heads, N, C / heads)
            return x.view(batch, length, self.heads, -1).transpose(1, 2)

        q, k, v = (split_heads(proj(hidden)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = ops.attention(q, k, v, scale=self.scale, mask=mask, backend=self.backend, chunk_size=self.chunk_size)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))  # (B, heads, N, d) -> (B, N, C)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), mask)
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nn.Module):
    gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing: each layer via checkpointed

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


def causal_attention_mask(attention_mask: torch.Tensor | None, length: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """Additive mask (B or 1, 1, N, N): 0 where query i may see key j (j <= i and key j not padding), else the
    dtype's most negative number.

    A query whose every key is masked (a sequence that starts with padding) gets a uniform average of all
    values here; transformers' SDPA path returns zeros for such rows. Positions that read real tokens agree.
    """
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, N, N)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, N, N)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class TransformersCheckpointingNames:
    """transformers' names for ModelMixin's gradient checkpointing switches (diffusers' training scripts call
    ``text_encoder.gradient_checkpointing_enable()``); ``is_gradient_checkpointing`` is shared by both libraries."""

    _supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        if gradient_checkpointing_kwargs not in (None, {}, {"use_reentrant": False}):
            raise ValueError(f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r} is not supported: "
                             "minidiff always checkpoints with use_reentrant=False; pass None")
        self.enable_gradient_checkpointing()

    def gradient_checkpointing_disable(self) -> None:
        self.disable_gradient_checkpointing()


class CLIPTextModel(TransformersCheckpointingNames, ModelMixin, AttentionBackendMixin):
    """The CLIP text transformer (no projection head), as transformers' CLIPTextModel.

    ``text_encoder(input_ids).last_hidden_state`` is Stable Diffusion's ``encoder_hidden_states``.
    """

    config_class = CLIPTextConfig
    weights_name = "model.safetensors"
    ignored_config_keys = TRANSFORMERS_BOOKKEEPING_KEYS

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__()
        c = self.register_config(constructor_kwargs(type(self), config, kwargs))
        self._check_config(c)
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    @staticmethod
    def _check_config(c: CLIPTextConfig) -> None:
        check_choice("hidden_act", c.hidden_act, ACTIVATIONS)
        check_ints(c, "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                   "max_position_embeddings")
        check_ints(c, "num_hidden_layers", minimum=0)
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(
                f"hidden_size={c.hidden_size} is not divisible by num_attention_heads={c.num_attention_heads}; "
                "use a num_attention_heads that divides hidden_size"
            )
        check_positive_floats(c, "layer_norm_eps")
        if c.attention_dropout:
            raise ValueError(f"attention_dropout={c.attention_dropout} is not supported; accepted value: 0.0")
        if not 0 <= c.eos_token_id < c.vocab_size:
            fail("eos_token_id", c.eos_token_id, f"is not a token id of the vocabulary (vocab_size={c.vocab_size})",
                 "use the tokenizer's end-of-text id")

    @property
    def text_model(self) -> "CLIPTextModel":
        """transformers 4.x nested the tower under ``text_model``; diffusers' clip_skip path still calls
        ``text_encoder.text_model.final_layer_norm`` (diffusers #14124), which this alias keeps working."""
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (vocab_size, hidden_size), transformers' name."""
        return self.embeddings.token_embedding

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Grow or cut the token table to ``new_num_tokens`` rows (``config.vocab_size`` follows). Kept rows are
        unchanged; new rows start at the mean of the old ones (transformers' mean resizing, without its noise)."""
        old = self.get_input_embeddings().weight  # (V, C)
        too_few = isinstance(new_num_tokens, int) and new_num_tokens <= self.config.eos_token_id
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or too_few:
            raise ValueError(f"new_num_tokens={new_num_tokens!r}: must be an int above eos_token_id="
                             f"{self.config.eos_token_id}, which must stay a token of the table")
        kept = old.detach()[:new_num_tokens]  # (min(V, V'), C)
        grown = old.detach().mean(dim=0, keepdim=True).expand(new_num_tokens - kept.shape[0], -1)  # (V' - V, C)
        table = nn.Embedding.from_pretrained(torch.cat([kept, grown]), freeze=not old.requires_grad)  # (V', C)
        self.embeddings.token_embedding = table
        self.config.vocab_size = new_num_tokens
        return table

    def attention_modules(self) -> list[CLIPAttention]:
        """What ``set_attention_backend`` / ``enable_attention_slicing`` (AttentionBackendMixin) configure."""
        return [layer.self_attn for layer in self.encoder.layers]

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept transformers 4.x keys (``text_model.`` prefix); drop the ``position_ids`` buffer some files hold."""
        converted = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
        converted.pop("embeddings.position_ids", None)
        return converted

    def save_config(self, folder: str | os.PathLike) -> str:
        """A config.json that transformers' ``CLIPTextModel.from_pretrained`` (and AutoConfig) accepts."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(os.fspath(folder), self.config_name)
        payload = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                   "transformers_version": TRANSFORMERS_VERSION, "dtype": str(self.dtype).removeprefix("torch."),
                   **self.config.to_dict()}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        return path

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None) -> None:
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
                else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, sequence), got {got}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} hold no tokens; pass at least one")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; max_position_embeddings is {c.max_position_embeddings}"
            )
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < c.vocab_size:
            raise ValueError(
                f"input_ids hold token ids in [{int(input_ids.min())}, {int(input_ids.max())}]; "
                f"vocab_size is {c.vocab_size}"
            )
        if attention_mask is not None and not torch.is_tensor(attention_mask):
            raise ValueError(f"attention_mask must be a tensor of the input_ids shape {tuple(input_ids.shape)}, "
                             f"got {type(attention_mask).__name__}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected the input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        if position_ids is not None and not (
            torch.is_tensor(position_ids) and not position_ids.is_floating_point() and position_ids.ndim == 2
            and position_ids.shape[0] in (1, input_ids.shape[0]) and position_ids.shape[1] == input_ids.shape[1]
            and 0 <= int(position_ids.min()) <= int(position_ids.max()) < c.max_position_embeddings
        ):
            got = tuple(position_ids.shape) if torch.is_tensor(position_ids) else type(position_ids).__name__
            raise ValueError(f"position_ids must be integers in [0, {c.max_position_embeddings}) "
                             f"(max_position_embeddings) of shape (1 or {input_ids.shape[0]}, {input_ids.shape[1]}), "
                             f"got {got}")

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state at the end-of-text token (B, C).

        Configs with the legacy ``eos_token_id == 2`` take the position of the largest id (OpenAI's original rule,
        as end-of-text is the last vocabulary entry); others take the first occurrence of ``eos_token_id``.
        """
        if self.config.eos_token_id == 2:
            eos_position = input_ids.int().argmax(dim=-1)  # (B,)
        else:
            eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # (B,)
        rows = torch.arange(input_ids.shape[0], device=last_hidden_state.device)
        return last_hidden_state[rows, eos_position.to(last_hidden_state.device)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> CLIPTextModelOutput | tuple:
        """``input_ids`` (B, N) token ids, ``attention_mask`` (B, N) 1 = token, 0 = padding."""
        self._check_inputs(input_ids, attention_mask, position_ids)
        hidden = self.embeddings(input_ids, position_ids)  # (B, N, C)
        mask = causal_attention_mask(attention_mask, input_ids.shape[1], hidden.dtype, hidden.device)
        all_hidden = [hidden]
        for layer in self.encoder.layers:
            hidden = checkpointed(self.encoder, layer, hidden, mask)
            all_hidden.append(hidden)
        last_hidden_state = self.final_layer_norm(hidden)
        output = CLIPTextModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pool(last_hidden_state, input_ids),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


@dataclass
class CLIPTextModelWithProjectionOutput(BaseOutput):
    """``text_embeds`` (B, projection_dim): the projected pooled state (SDXL's pooled prompt embedding);
    ``last_hidden_state`` and ``hidden_states`` as CLIPTextModelOutput (transformers' ``CLIPTextModelOutput``)."""

    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CLIPTextModelWithProjection(TransformersCheckpointingNames, ModelMixin, AttentionBackendMixin):
    """The CLIP text tower plus its projection head, as transformers' CLIPTextModelWithProjection: ``text_model``
    (a CLIPTextModel, sharing this model's config) and ``text_projection`` (hidden_size -> projection_dim, no bias).

    ``text_encoder_2(input_ids, output_hidden_states=True)`` gives SDXL both of its inputs: ``.text_embeds`` (the
    pooled prompt embedding) and ``.hidden_states[-2]`` (the penultimate layer, concatenated with CLIP-L's).
    """

    config_class = CLIPTextConfig
    weights_name = "model.safetensors"
    ignored_config_keys = TRANSFORMERS_BOOKKEEPING_KEYS

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__()
        kwargs = constructor_kwargs(type(self), config, kwargs)
        c = self.register_config(kwargs)
        self._check_config(c)
        self.text_model = CLIPTextModel(**kwargs)
        self.text_model.config = c  # one config object: resize_token_embeddings updates both
        self.text_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)

    @staticmethod
    def _check_config(c: CLIPTextConfig) -> None:
        CLIPTextModel._check_config(c)
        check_ints(c, "projection_dim")
        if c.projection_dim is None:
            fail("projection_dim", None, "CLIPTextModelWithProjection projects the pooled state to projection_dim",
                 "set projection_dim (SDXL's OpenCLIP bigG: 1280)")

    @property
    def final_layer_norm(self) -> nn.LayerNorm:
        return self.text_model.final_layer_norm

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        return self.text_model.resize_token_embeddings(new_num_tokens)

    def attention_modules(self) -> list[CLIPAttention]:
        return self.text_model.attention_modules()

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop the ``position_ids`` buffer some files hold."""
        return {key: value for key, value in state_dict.items() if key != "text_model.embeddings.position_ids"}

    def save_config(self, folder: str | os.PathLike) -> str:
        path = CLIPTextModel.save_config(self, folder)
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        payload["architectures"] = ["CLIPTextModelWithProjection"]
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        return path

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> CLIPTextModelWithProjectionOutput | tuple:
        """``input_ids`` (B, N); ``[0]`` is ``text_embeds`` (B, projection_dim), as in transformers."""
        tower = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states)
        output = CLIPTextModelWithProjectionOutput(
            text_embeds=self.text_projection(tower.pooler_output),  # (B, C) -> (B, projection_dim)
            last_hidden_state=tower.last_hidden_state,
            hidden_states=tower.hidden_states,
        )
        return output if return_dict else output.to_tuple()
