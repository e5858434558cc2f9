"""Original Stable Diffusion checkpoints: one file in the LDM (CompVis) key layout, read and written by rules.

One function per model maps a diffusers/minidiff key to its LDM key (``unet_key_to_ldm``, ``vae_key_to_ldm``,
``text_key_to_ldm``). Reading builds the model from its config and fetches each of its keys from the file through
that function; writing runs the same function the other way. So there is no per-tensor table, and a key that is
missing or left over is reported by name.

LDM layout, by prefix: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE), ``cond_stage_model.transformer.``
(SD1 CLIP ViT-L) or ``cond_stage_model.model.`` (SD2 OpenCLIP ViT-H, q/k/v fused as ``in_proj``). SDXL files
(Stability's SGM layout) keep the UNet and VAE prefixes and put the text towers under ``conditioner.embedders.N.``:
base 1.0 has CLIP
ViT-L at ``0.transformer.`` (text_encoder) and OpenCLIP ViT-bigG at ``1.model.`` (text_encoder_2, with its
``text_projection`` stored transposed); the refiner has bigG alone at ``0.model.``. The UNet's added-conditioning MLP is
``label_emb.0.0`` / ``label_emb.0.2``. A tower's layout follows from its prefix: ``.transformer.`` holds transformers'
CLIP keys, ``.model.`` OpenCLIP's. The schedule buffers (betas, alphas_cumprod, posterior_*), EMA copies
(``model_ema.``), ``position_ids`` and OpenCLIP's ``logit_scale`` are not weights of any model and are skipped.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from minidiff.loading.safetensors_io import (
    load_checkpoint_file, read_json_object, require_regular_file, save_safetensors,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
EMA_PREFIX = "model_ema."
# variant family -> where each text tower of the file sits
TEXT_PREFIXES = {
    "sd1": {"text_encoder": CLIP_PREFIX},
    "sd2": {"text_encoder": OPENCLIP_PREFIX},
    "sdxl": {"text_encoder": SDXL_CLIP_PREFIX, "text_encoder_2": SDXL_OPENCLIP_PREFIX},
    "sdxl-refiner": {"text_encoder_2": REFINER_OPENCLIP_PREFIX},
}
REFINER_ADM_WIDTH = 2560  # the refiner UNet's label_emb input: pooled 1280 + 5 time ids x 256
COMPONENT_OF_CLASS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder",
                      "CLIPTextModelWithProjection": "text_encoder_2"}
SKIPPED = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar|model_ema\..*"
    r"|(cond_stage_model|conditioner\.embedders\.\d+)\..*position_ids"
    r"|(cond_stage_model|conditioner\.embedders\.\d+)\.model\.(logit_scale|attn_mask)"
    r"|cond_stage_model\.model\.text_projection)$"
)

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_TO_LDM = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


@dataclass(frozen=True)
class LdmKey:
    """Where a model tensor lives in the file: ``key``; ``part`` = index into a q/k/v fusion (``in_proj``);
    ``transposed``: stored as the transpose (OpenCLIP's ``text_projection`` is ``x @ P``, a Linear holds ``P.T``)."""

    key: str
    part: int | None = None
    transposed: bool = False


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
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL text_time
           "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
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


def is_openclip(prefix: str) -> bool:
    return prefix.endswith(".model.")


def text_key_to_ldm(key: str, prefix: str) -> LdmKey:
    """A text encoder key (with or without transformers' ``text_model.`` level) under the tower's ``prefix``.
    CLIP (``.transformer.``): the transformers layout under ``<prefix>text_model.``. OpenCLIP (``.model.``):
    resblocks with fused q/k/v (``attn.in_proj_*``, parts 0/1/2) and the projection stored transposed."""
    key = key.removeprefix("text_model.")
    if not is_openclip(prefix):
        return LdmKey(prefix + "text_model." + key)
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding"}
    if key in fixed:
        return LdmKey(prefix + fixed[key])
    if key == "text_projection.weight":
        return LdmKey(prefix + "text_projection", transposed=True)
    if key.startswith("final_layer_norm."):
        return LdmKey(prefix + "ln_final." + key.split(".", 1)[1])
    match = re.match(r"encoder\.layers\.(\d+)\.(.+)$", key)
    if not match:
        raise ValueError(f"no OpenCLIP rule for text encoder key {key!r}")
    layer, rest = match.groups()
    block = f"{prefix}transformer.resblocks.{layer}."
    qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
    if qkv:
        return LdmKey(f"{block}attn.in_proj_{qkv.group(2)}", "qkv".index(qkv.group(1)))
    return LdmKey(block + _rename(rest, OPENCLIP_TO_LDM))


# ---- reading ---------------------------------------------------------------------------------------------------
def variant_family(variant: str) -> str:
    """``sdxl-inpaint`` -> ``sdxl``: the variant without its inpainting suffix (the text towers it has)."""
    return variant.removesuffix("-inpaint")


def variant_components(variant: str) -> tuple[str, ...]:
    """The models a checkpoint of ``variant`` holds: UNet, VAE and its text encoder(s)."""
    return ("unet", "vae", *TEXT_PREFIXES[variant_family(variant)])


def text_prefix(checkpoint: dict[str, torch.Tensor], component: str) -> str:
    """Where ``component``'s tower sits in ``checkpoint``: the first of its known prefixes with keys (the first
    known one when none has, so the missing keys are reported under it)."""
    known = [prefixes[component] for prefixes in TEXT_PREFIXES.values() if component in prefixes]
    return next((prefix for prefix in known if any(key.startswith(prefix) for key in checkpoint)), known[0])


def _key_rule(component: str, model: torch.nn.Module, prefix: str | None = None) -> Callable[[str], LdmKey]:
    """The key function of ``component``; ``prefix``: where a text encoder's tower sits in the file."""
    if component == "unet":
        layers = model.config.layers_per_block
        if not isinstance(layers, int):
            raise ValueError(f"single-file UNets need an int layers_per_block, config has {layers!r}")
        with_attention = {int(k.split(".")[1]) for k in model.state_dict() if re.match(r"up_blocks\.\d+\.attentions", k)}
        return lambda key: unet_key_to_ldm(key, layers, with_attention)
    if component == "vae":
        return lambda key: vae_key_to_ldm(key, len(model.config.up_block_types))
    return lambda key: text_key_to_ldm(key, prefix)


def unet_module_to_ldm(unet: torch.nn.Module) -> Callable[[str], str]:
    """UNet module path -> its LDM/SGM module path without ``model.diffusion_model.``
    (``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``): the names kohya's SDXL LoRA use."""
    rule = _key_rule("unet", unet)
    return lambda path: rule(path + ".weight").key[len(UNET_PREFIX):].removesuffix(".weight")


def _fetch(checkpoint: dict[str, torch.Tensor], where: LdmKey, shape: torch.Size) -> torch.Tensor:
    tensor = checkpoint[where.key]
    if where.part is not None:
        tensor = tensor.chunk(3, dim=0)[where.part]
    if where.transposed:
        tensor = tensor.T
    if tensor.shape != shape and _same_but_unit_dims(tensor.shape, shape):  # LDM 1x1 convs <-> diffusers linears
        tensor = tensor.reshape(shape)
    return tensor


def _same_but_unit_dims(a: torch.Size, b: torch.Size) -> bool:
    """Whether shapes ``a`` and ``b`` differ only by trailing size-1 dimensions, as a 1x1 conv's (O, I, 1, 1) and a
    linear's (O, I): the only reshape a checkpoint may need (any other element-count match is a wrong tensor)."""
    return a[:2] == b[:2] and all(d == 1 for d in a[2:]) and all(d == 1 for d in b[2:])


def normalize_checkpoint(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old SD1 files store CLIP without the ``text_model.`` level: add it, so one rule serves both."""
    for prefix in (CLIP_PREFIX, SDXL_CLIP_PREFIX):
        keys = [k for k in checkpoint if k.startswith(prefix)]
        if keys and not any(k.startswith(prefix + "text_model.") for k in keys):
            checkpoint = {prefix + "text_model." + k[len(prefix):] if k.startswith(prefix) else k: v
                          for k, v in checkpoint.items()}
    return checkpoint


def extract_component(checkpoint: dict[str, torch.Tensor], component: str, model: torch.nn.Module, source: str,
                      use_ema: bool = False, used: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (built from its config) gathered from a normalized LDM ``checkpoint``;
    the LDM keys read are added to ``used``."""
    prefix = text_prefix(checkpoint, component) if component.startswith("text_encoder") else None
    base_rule = _key_rule(component, model, prefix)

    def rule(key: str) -> LdmKey:
        where = base_rule(key)
        if use_ema and where.key.startswith(UNET_PREFIX):
            where = LdmKey(EMA_PREFIX + "diffusion_model" + where.key[len(UNET_PREFIX):].replace(".", ""), where.part)
        return where

    state = gather_state(checkpoint, model, rule, component, source, used)
    if prefix == OPENCLIP_PREFIX and used is not None:  # SD2 keeps 23 of OpenCLIP's 24 layers (penultimate)
        deeper = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        used |= {k for k in checkpoint if (m := deeper.match(k)) and int(m.group(1)) >= model.config.num_hidden_layers}
    return state


def gather_state(checkpoint: dict[str, torch.Tensor], model: torch.nn.Module, rule: Callable[[str], LdmKey],
                 component: str, source: str, used: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model``: each of its keys fetched from ``checkpoint`` at ``rule(key)``; the LDM keys
    read are added to ``used``. A missing key (all listed, by LDM name) or a wrong shape is a ValueError."""
    state, missing = {}, []
    for key, expected in model.state_dict().items():
        where = rule(key)
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
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{source} lacks {len(missing)} {component} tensor(s): {shown}")
    return state


def unused_keys(checkpoint: dict[str, torch.Tensor], used: set[str]) -> list[str]:
    return sorted(k for k in checkpoint if k not in used and not SKIPPED.match(k))


# ---- writing ---------------------------------------------------------------------------------------------------
def _writing_prefixes(text_encoder, text_encoder_2, openclip: bool | None) -> dict[str, str]:
    """Where the given text encoders go: SDXL base (both), refiner (text_encoder_2 alone), SD2 (OpenCLIP: exact gelu
    or ``openclip=True``) or SD1."""
    if text_encoder_2 is not None:
        return TEXT_PREFIXES["sdxl" if text_encoder is not None else "sdxl-refiner"]
    if openclip is None:
        openclip = text_encoder is not None and text_encoder.config.hidden_act == "gelu"
    return TEXT_PREFIXES["sd2" if openclip else "sd1"]


def to_ldm_state_dict(unet=None, vae=None, text_encoder=None, openclip: bool | None = None,
                      text_encoder_2=None) -> dict[str, torch.Tensor]:
    """One flat LDM-layout state dict from minidiff (or diffusers/transformers) models; q/k/v fused for OpenCLIP,
    VAE attention linears stored as 1x1 convs as the original files do. With ``text_encoder_2`` the file is SDXL's
    (base with both towers, refiner with text_encoder_2 alone)."""
    prefixes = _writing_prefixes(text_encoder, text_encoder_2, openclip)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    models = (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    for component, model in models:
        if model is None:
            continue
        rule = _key_rule(component, model, prefixes.get(component))
        for key, tensor in model.state_dict().items():
            if key.endswith("position_ids"):
                continue
            where = rule(key)
            if where.part is not None:
                fused.setdefault(where.key, [None, None, None])[where.part] = tensor
            elif where.transposed:
                out[where.key] = tensor.T.contiguous()  # Linear (out, in) -> OpenCLIP's (in, out) projection
            elif component == "vae" and ".mid.attn_1." in where.key and tensor.ndim == 2:
                out[where.key] = tensor[:, :, None, None]  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
            else:
                out[where.key] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat(parts, dim=0)
    return out


def save_single_file(path: str | os.PathLike, unet=None, vae=None, text_encoder=None, openclip: bool | None = None,
                     text_encoder_2=None) -> None:
    """Write the models to one ``.safetensors`` file in the original LDM (SDXL: SGM) layout."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_single_file writes .safetensors only, got {path}")
    save_safetensors(to_ldm_state_dict(unet, vae, text_encoder, openclip, text_encoder_2), path)


# ---- whole checkpoints -----------------------------------------------------------------------------------------
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
SD2_TO_K_KEY = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
ADM_KEY = UNET_PREFIX + "label_emb.0.0.weight"


def _family(checkpoint: dict[str, torch.Tensor]) -> str:
    """SDXL base / refiner by their text towers (or, in a UNet-only file, by the added-conditioning MLP's input
    width); else SD2 by its 1024-wide cross-attention, else SD1."""
    has = lambda prefix: any(key.startswith(prefix) for key in checkpoint)  # noqa: E731
    if has(SDXL_OPENCLIP_PREFIX):
        return "sdxl"
    if has(REFINER_OPENCLIP_PREFIX):
        return "sdxl-refiner"
    if ADM_KEY in checkpoint and not has(CLIP_PREFIX) and not has(OPENCLIP_PREFIX):
        return "sdxl-refiner" if checkpoint[ADM_KEY].shape[-1] == REFINER_ADM_WIDTH else "sdxl"
    to_k = checkpoint.get(SD2_TO_K_KEY)
    return "sd2" if to_k is not None and to_k.shape[-1] == 1024 else "sd1"


def detect_variant(checkpoint: dict[str, torch.Tensor], source: str) -> str:
    """``sd1``, ``sd2``, ``sdxl`` or ``sdxl-refiner``, with ``-inpaint`` for a 9-channel conv_in, from keys and
    shapes."""
    conv_in = checkpoint.get(CONV_IN_KEY)
    if conv_in is None:
        roots = sorted({".".join(key.split(".")[:2]) for key in checkpoint})
        raise ValueError(
            f"{source} has no {CONV_IN_KEY}: not a Stable Diffusion LDM checkpoint. Looked for the UNet's conv_in "
            f"there, then the text towers under {CLIP_PREFIX}/{OPENCLIP_PREFIX} (SD1/SD2) or "
            f"{SDXL_CLIP_PREFIX}/{SDXL_OPENCLIP_PREFIX}/{REFINER_OPENCLIP_PREFIX} (SDXL base/refiner); the file's "
            f"keys start with {roots[:6]}")
    return _family(checkpoint) + ("-inpaint" if conv_in.shape[1] == 9 else "")


def is_sdxl_variant(variant: str) -> bool:
    return variant.startswith("sdxl")


def read_checkpoint_shapes(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as meta tensors (names and shapes, no data): a safetensors file's header
    alone is read; other formats are loaded (safely, as by ``load_checkpoint_file``)."""
    if not path.endswith(".safetensors"):
        return load_checkpoint_file(path)
    require_regular_file(path, "checkpoint")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def is_sdxl_model(path: str | os.PathLike) -> bool:
    """Whether a diffusers folder or a checkpoint file is an SDXL model: a folder by its model_index.json
    (``_class_name`` StableDiffusionXL...) or a ``text_encoder_2`` subfolder, a file by its variant (keys, shapes);
    a hub id by its snapshot in the local Hugging Face cache (False if it is not there: loading reports that)."""
    from minidiff.loading.hub import resolve_folder

    path = os.fspath(path)
    if not os.path.exists(path):
        try:
            path = resolve_folder(path)
        except FileNotFoundError:
            return False
    if os.path.isfile(path):  # a .ckpt is loaded whole here (safely); a .safetensors only has its header read
        if not path.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
            return False
        return is_sdxl_variant(detect_variant(normalize_checkpoint(read_checkpoint_shapes(path)), path))
    index_path = os.path.join(path, "model_index.json")
    if os.path.isfile(index_path):
        if str(read_json_object(index_path, "model_index.json").get("_class_name", "")).startswith("StableDiffusionXL"):
            return True
    return os.path.isdir(os.path.join(path, "text_encoder_2"))


def check_pipeline_class(variant: str, pipeline_class: type, source: str) -> None:
    """An SDXL checkpoint needs an SDXL pipeline (it has text_encoder_2) and an SD 1/2 one the SD pipelines; the
    error names the class to use (``StableDiffusionPipeline`` <-> ``StableDiffusionXLPipeline`` and so on)."""
    name = pipeline_class.__name__
    takes_sdxl = "text_encoder_2" in getattr(pipeline_class, "component_names", ())
    if is_sdxl_variant(variant) == takes_sdxl:
        return
    if is_sdxl_variant(variant):
        usable = name.replace("StableDiffusion", "StableDiffusionXL", 1) if name.startswith("StableDiffusion") else ""
        kind = "an SDXL"
    else:
        usable = name.replace("StableDiffusionXL", "StableDiffusion", 1) if name.startswith("StableDiffusionXL") else ""
        kind = "an SD 1.x/2.x"
    fix = f"load it with {usable}.from_single_file" if usable else "use a pipeline of that model family"
    raise ValueError(f"{source} is {kind} checkpoint ({variant}), which {name} cannot run: {fix}")


def _pipeline_options(options: dict[str, Any], pipeline_class: type | None) -> dict[str, Any]:
    """The model_index.json options (force_zeros_for_empty_prompt, requires_aesthetics_score) the pipeline's
    constructor takes."""
    if pipeline_class is None:
        return dict(options)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    return {key: value for key, value in options.items() if key in accepted}


def _check_components(components: tuple[str, ...], variant: str, source: str) -> None:
    absent = [component for component in components if component not in variant_components(variant)]
    if absent:
        raise ValueError(f"{source} is a {variant} checkpoint, which has no {', '.join(absent)}; it holds "
                         f"{', '.join(variant_components(variant))}")


def load_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None,
                     prediction_type: str | None = None, use_ema: bool = False, torch_dtype: Any = None,
                     components: tuple[str, ...] | None = None, pipeline_class: type | None = None) -> dict:
    """Build the models, tokenizer(s) and scheduler of one LDM (SD 1/2) or SGM (SDXL) checkpoint file.

    ``config`` is a local diffusers pipeline folder whose component configs (and tokenizers) to use; without it the
    built-in SD1 / SD2 / SDXL base / refiner / inpainting configs are picked from the tensor shapes.
    ``prediction_type`` overrides what weights cannot tell (SD2 768-v checkpoints predict v; default:
    ``global_step == 875000`` -> epsilon, as diffusers). ``components``: the models to build (default: all the file
    holds). ``pipeline_class``: the class the result is for; a checkpoint of the other family is refused, and the
    SDXL model_index options it takes (force_zeros_for_empty_prompt, requires_aesthetics_score) are added.
    """
    from minidiff.loading import builtin_configs
    from minidiff.models.modeling import parse_dtype, skip_weight_init

    source = os.fspath(path)
    require_regular_file(source, "checkpoint")
    dtype = parse_dtype(torch_dtype)
    checkpoint = normalize_checkpoint(load_checkpoint_file(source))
    variant = detect_variant(checkpoint, source)
    if pipeline_class is not None:
        check_pipeline_class(variant, pipeline_class, source)
    components = variant_components(variant) if components is None else tuple(components)
    _check_components(components, variant, source)
    configs = builtin_configs.component_configs(variant, config, prediction_type, components)
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
    leftover = unused_keys(checkpoint, used) if set(components) == set(variant_components(variant)) else []
    if leftover:
        shown = ", ".join(leftover[:5]) + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else "")
        raise ValueError(f"{source} has {len(leftover)} tensor(s) no model uses: {shown}")
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if tokenizer in configs:
            built[tokenizer] = configs[tokenizer]
    built["scheduler"] = configs["scheduler"]
    if is_sdxl_variant(variant):  # the pipeline's own components: a refiner has no first text encoder
        built.setdefault("text_encoder", None)
        built.setdefault("tokenizer", None)
        built.update(_pipeline_options(configs["pipeline"], pipeline_class))
    return built


load_pipeline_components = load_single_file
