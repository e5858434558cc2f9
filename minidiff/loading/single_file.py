"""Original Stable Diffusion checkpoints: one file in the LDM (CompVis) key layout, read and written by rules.

One function per model maps a diffusers/minidiff key to its LDM key (``unet_key_to_ldm``, ``vae_key_to_ldm``,
``text_key_to_ldm``). Reading builds the model from its config and fetches each of its keys from the file through
that function; writing runs the same function the other way. So there is no per-tensor table, and a key that is
missing or left over is reported by name.

LDM layout, by prefix: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE), ``cond_stage_model.transformer.``
(SD1 CLIP ViT-L) or ``cond_stage_model.model.`` (SD2 OpenCLIP ViT-H, q/k/v fused as ``in_proj``). The schedule
buffers (betas, alphas_cumprod, posterior_*), EMA copies (``model_ema.``) and ``position_ids`` are not weights of any
model and are skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidiff.loading.safetensors_io import load_checkpoint_file, require_regular_file, save_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
COMPONENT_OF_CLASS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}
SKIPPED = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar|model_ema\..*"
    r"|cond_stage_model\..*position_ids|cond_stage_model\.model\.(text_projection|logit_scale|attn_mask))$"
)

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_TO_LDM = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


@dataclass(frozen=True)
class LdmKey:
    """Where a model tensor lives in the file: ``key``; ``part`` = index into a q/k/v fusion (``in_proj``)."""

    key: str
    part: int | None = None


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


# ---- key rules: diffusers/minidiff key -> LDM key ------------------------------------------------------------------
def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> LdmKey:
    """UNet: input_blocks.{1 + b(L+1) + j} are down block b's resnet/attention j, then its downsampler;
    output_blocks.{b(L+1) + j} likewise for up blocks (L+1 resnets each, upsampler after the last)."""
    L = layers_per_block
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "class_embedding": "label_emb"}
    renamed = _rename(key, top)
    if renamed != key:
        return LdmKey(UNET_PREFIX + renamed)
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return LdmKey(f"{UNET_PREFIX}middle_block.{2 * index}.{_rename(rest, RESNET_TO_LDM)}")
        return LdmKey(f"{UNET_PREFIX}middle_block.1.{rest}")
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # downsamplers.0.conv.weight -> input_blocks.N.0.op.weight
            return LdmKey(f"{UNET_PREFIX}input_blocks.{1 + block * (L + 1) + L}.0.op.{rest.removeprefix('conv.')}")
        slot = 0 if kind == "resnets" else 1
        rest = _rename(rest, RESNET_TO_LDM) if kind == "resnets" else rest
        return LdmKey(f"{UNET_PREFIX}input_blocks.{1 + block * (L + 1) + index}.{slot}.{rest}")
    if parts[0] == "up_blocks":
        if kind == "upsamplers":
            slot = 2 if block in up_blocks_with_attention else 1
            return LdmKey(f"{UNET_PREFIX}output_blocks.{block * (L + 1) + L}.{slot}.{rest}")
        slot = 0 if kind == "resnets" else 1
        rest = _rename(rest, RESNET_TO_LDM) if kind == "resnets" else rest
        return LdmKey(f"{UNET_PREFIX}output_blocks.{block * (L + 1) + index}.{slot}.{rest}")
    raise ValueError(f"no LDM rule for UNet key {key!r}")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> LdmKey:
    """VAE: down_blocks.i.resnets.j -> down.i.block.j; decoder up blocks are numbered in reverse in LDM."""
    side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    parts = rest.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        level = int(parts[1]) if parts[0] == "down_blocks" else num_up_blocks - 1 - int(parts[1])
        name = "down" if parts[0] == "down_blocks" else "up"
        if parts[2] in ("downsamplers", "upsamplers"):  # downsamplers.0.conv.weight -> downsample.conv.weight
            rest = f"{name}.{level}.{name}sample.{'.'.join(parts[4:])}"
        else:
            rest = f"{name}.{level}.block.{parts[3]}.{'.'.join(parts[4:]).replace('conv_shortcut', 'nin_shortcut')}"
    elif parts[0] == "mid_block" and parts[1] == "resnets":
        rest = f"mid.block_{int(parts[2]) + 1}.{'.'.join(parts[3:]).replace('conv_shortcut', 'nin_shortcut')}"
    elif parts[0] == "mid_block":
        rest = "mid.attn_1." + _rename(".".join(parts[3:]), VAE_ATTENTION_TO_LDM)
    elif parts[0] == "conv_norm_out":
        rest = "norm_out." + ".".join(parts[1:])
    return LdmKey(VAE_PREFIX + (f"{side}.{rest}" if side else rest))


def text_key_to_ldm(key: str, openclip: bool) -> LdmKey:
    """CLIP (SD1): the transformers layout under ``cond_stage_model.transformer.text_model.``.
    OpenCLIP (SD2): resblocks with fused q/k/v (``attn.in_proj_*``, parts 0/1/2)."""
    if not openclip:
        return LdmKey(CLIP_PREFIX + "text_model." + key)
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding"}
    if key in fixed:
        return LdmKey(OPENCLIP_PREFIX + fixed[key])
    if key.startswith("final_layer_norm."):
        return LdmKey(OPENCLIP_PREFIX + "ln_final." + key.split(".", 1)[1])
    match = re.match(r"encoder\.layers\.(\d+)\.(.+)$", key)
    if not match:
        raise ValueError(f"no OpenCLIP rule for text encoder key {key!r}")
    layer, rest = match.groups()
    block = f"{OPENCLIP_PREFIX}transformer.resblocks.{layer}."
    qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
    if qkv:
        return LdmKey(f"{block}attn.in_proj_{qkv.group(2)}", "qkv".index(qkv.group(1)))
    return LdmKey(block + _rename(rest, OPENCLIP_TO_LDM))


# ---- reading ---------------------------------------------------------------------------------------------------
def _key_rule(component: str, model: torch.nn.Module, openclip: bool) -> Callable[[str], LdmKey]:
    if component == "unet":
        layers = model.config.layers_per_block
        if not isinstance(layers, int):
            raise ValueError(f"single-file UNets need an int layers_per_block, config has {layers!r}")
        with_attention = {int(k.split(".")[1]) for k in model.state_dict() if re.match(r"up_blocks\.\d+\.attentions", k)}
        return lambda key: unet_key_to_ldm(key, layers, with_attention)
    if component == "vae":
        return lambda key: vae_key_to_ldm(key, len(model.config.up_block_types))
    return lambda key: text_key_to_ldm(key, openclip)


def _fetch(checkpoint: dict[str, torch.Tensor], where: LdmKey, shape: torch.Size) -> torch.Tensor:
    tensor = checkpoint[where.key]
    if where.part is not None:
        tensor = tensor.chunk(3, dim=0)[where.part]
    if tensor.shape != shape and tensor.numel() == shape.numel():  # LDM 1x1 convs <-> diffusers linears
        tensor = tensor.reshape(shape)
    return tensor


def normalize_checkpoint(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old SD1 files store CLIP without the ``text_model.`` level: add it, so one rule serves both."""
    if any(k.startswith(CLIP_PREFIX + "text_model.") for k in checkpoint):
        return checkpoint
    return {CLIP_PREFIX + "text_model." + k[len(CLIP_PREFIX):] if k.startswith(CLIP_PREFIX) else k: v
            for k, v in checkpoint.items()}


def extract_component(checkpoint: dict[str, torch.Tensor], component: str, model: torch.nn.Module, source: str,
                      use_ema: bool = False, used: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (built from its config) gathered from a normalized LDM ``checkpoint``;
    the LDM keys read are added to ``used``."""
    rule = _key_rule(component, model, any(k.startswith(OPENCLIP_PREFIX) for k in checkpoint))
    state, missing = {}, []
    for key, expected in model.state_dict().items():
        where = rule(key)
        if use_ema and where.key.startswith(UNET_PREFIX):
            where = LdmKey(EMA_PREFIX + "diffusion_model" + where.key[len(UNET_PREFIX):].replace(".", ""), where.part)
        if where.key not in checkpoint:
            missing.append(where.key)
            continue
        tensor = _fetch(checkpoint, where, expected.shape)
        if used is not None:
            used.add(where.key)
        if tensor.shape != expected.shape:
            raise ValueError(f"{source}: {where.key} has shape {tuple(tensor.shape)}, {component} expects "
                             f"{tuple(expected.shape)} for {key} (is the config right for this checkpoint?)")
        state[key] = tensor
    if component == "text_encoder" and used is not None:  # SD2 keeps 23 of OpenCLIP's 24 layers (penultimate)
        deeper = re.compile(re.escape(OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
        used |= {k for k in checkpoint if (m := deeper.match(k)) and int(m.group(1)) >= model.config.num_hidden_layers}
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{source} lacks {len(missing)} {component} tensor(s): {shown}")
    return state


def unused_keys(checkpoint: dict[str, torch.Tensor], used: set[str]) -> list[str]:
    return sorted(k for k in checkpoint if k not in used and not SKIPPED.match(k))


# ---- writing ---------------------------------------------------------------------------------------------------
def to_ldm_state_dict(unet=None, vae=None, text_encoder=None, openclip: bool | None = None) -> dict[str, torch.Tensor]:
    """One flat LDM-layout state dict from minidiff (or diffusers/transformers) models; q/k/v fused for OpenCLIP,
    VAE attention linears stored as 1x1 convs as the original files do."""
    if openclip is None:
        openclip = text_encoder is not None and text_encoder.config.hidden_act == "gelu"
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    for component, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        if model is None:
            continue
        rule = _key_rule(component, model, openclip)
        for key, tensor in model.state_dict().items():
            key = key.removeprefix("text_model.")
            if key.endswith("position_ids"):
                continue
            where = rule(key)
            if where.part is not None:
                fused.setdefault(where.key, [None, None, None])[where.part] = tensor
            elif component == "vae" and ".mid.attn_1." in where.key and tensor.ndim == 2:
                out[where.key] = tensor[:, :, None, None]  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
            else:
                out[where.key] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat(parts, dim=0)
    return out


def save_single_file(path: str | os.PathLike, unet=None, vae=None, text_encoder=None, openclip: bool | None = None) -> None:
    """Write the models to one ``.safetensors`` file in the original LDM layout."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_single_file writes .safetensors only, got {path}")
    save_safetensors(to_ldm_state_dict(unet, vae, text_encoder, openclip), path)


# ---- whole checkpoints -----------------------------------------------------------------------------------------
def detect_variant(checkpoint: dict[str, torch.Tensor], source: str) -> str:
    """``sd1``, ``sd2`` or with ``-inpaint``: from conv_in's input channels and the cross-attention width."""
    conv_in = checkpoint.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ValueError(f"{source} has no {UNET_PREFIX}input_blocks.0.0.weight: not a Stable Diffusion LDM checkpoint")
    to_k = checkpoint.get(UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight")
    version = "sd2" if to_k is not None and to_k.shape[-1] == 1024 else "sd1"
    return version + ("-inpaint" if conv_in.shape[1] == 9 else "")


def load_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None, prediction_type: str | None = None,
                     use_ema: bool = False, torch_dtype: Any = None, components=("unet", "vae", "text_encoder")) -> dict:
    """Build UNet, VAE, text encoder, tokenizer and scheduler from one LDM checkpoint file.

    ``config`` is a local diffusers pipeline folder whose component configs (and tokenizer) to use; without it the
    built-in SD1 / SD2 / inpainting configs are picked from the tensor shapes. ``prediction_type`` overrides what
    weights cannot tell (SD2 768-v checkpoints predict v; default: ``global_step == 875000`` -> epsilon, as diffusers).
    """
    from minidiff.loading import builtin_configs
    from minidiff.models.modeling import parse_dtype, skip_weight_init

    source = os.fspath(path)
    require_regular_file(source, "checkpoint")
    dtype = parse_dtype(torch_dtype)
    checkpoint = normalize_checkpoint(load_checkpoint_file(source))
    configs = builtin_configs.component_configs(detect_variant(checkpoint, source), config, prediction_type)
    built: dict[str, Any] = {}
    used: set[str] = set()
    for component in components:
        with skip_weight_init():
            model = builtin_configs.model_class(component)(**configs[component])
        state = extract_component(checkpoint, component, model, source, use_ema, used)
        model.load_weights(state, source=f"{source} ({component})")
        built[component] = (model.to(dtype) if dtype is not None else model).eval()
    if use_ema:  # the non-EMA UNet copy is deliberately left unread
        used |= {k for k in checkpoint if k.startswith(UNET_PREFIX)}
    leftover = unused_keys(checkpoint, used) if set(components) == {"unet", "vae", "text_encoder"} else []
    if leftover:
        shown = ", ".join(leftover[:5]) + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else "")
        raise ValueError(f"{source} has {len(leftover)} tensor(s) no model uses: {shown}")
    built["tokenizer"] = configs["tokenizer"]
    built["scheduler"] = configs["scheduler"]
    return built


load_pipeline_components = load_single_file
