"""Original ControlNet checkpoints (lllyasviel/ControlNet, ControlNet 1.1): one file in the LDM key layout.

The ControlNet is a copy of the UNet's encoder half, so its keys are the UNet's LDM keys (``input_blocks``,
``middle_block``, ``time_embed``, ``label_emb``: ``unet_key_to_ldm`` of single_file.py) under ``control_model.``
instead of ``model.diffusion_model.``, plus its own three parts:

    controlnet_down_blocks.N        <-> zero_convs.N.0            (the zero convolutions of the skips)
    controlnet_mid_block            <-> middle_block_out.0
    controlnet_cond_embedding.*     <-> input_hint_block.K        (a Sequential: conv, SiLU, conv, SiLU, ...,
                                                                  so conv_in is K=0, blocks.i is K=2(i+1) and
                                                                  conv_out the last, K=2(n+1) for n blocks)

Files come with the ``control_model.`` prefix (the releases; the first ones also hold the whole SD model, whose keys
are not the ControlNet's and are ignored), without it (e.g. thibaud/controlnet-sd21), or already in diffusers'
layout (a ``diffusion_pytorch_model.safetensors`` renamed): all three load. Safetensors only: a pickled
``.ckpt``/``.pt``/``.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from minidiff.loading.safetensors_io import (
    PICKLE_SUFFIXES, load_safetensors, require_regular_file, save_safetensors,
)
from minidiff.loading.single_file import UNET_PREFIX, LdmKey, gather_state, unet_key_to_ldm

CONTROLNET_PREFIX = "control_model."
TIME_EMBED_KEY = "time_embed.0.weight"  # present in every LDM ControlNet (with or without the prefix)
DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"  # a file already in diffusers' layout
# the LDM ControlNet layer whose shape tells the model family: SD2's cross-attention reads 1024-wide OpenCLIP states
TO_K_KEY = CONTROLNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SD2_CROSS_ATTENTION_DIM = 1024
# encoder fields of the built-in UNet configs a ControlNet shares (not its up blocks, output or sample size)
UNET_ONLY_FIELDS = ("up_block_types", "out_channels", "sample_size")


# ---- the key rule: diffusers/minidiff key -> LDM key -------------------------------------------------------------
def controlnet_key_to_ldm(key: str, layers_per_block: int, hint_blocks: int) -> LdmKey:
    """A ControlNetModel key -> its key in an LDM ControlNet file; ``hint_blocks``: the number of convs in
    ``controlnet_cond_embedding.blocks`` (6 for the default (16, 32, 96, 256) widths, so conv_out is
    ``input_hint_block.14``)."""
    parts = key.split(".")
    if parts[0] == "controlnet_mid_block":  # controlnet_mid_block.weight
        ldm = f"middle_block_out.0.{parts[1]}"
    elif parts[0] == "controlnet_down_blocks":  # controlnet_down_blocks.3.weight
        ldm = f"zero_convs.{parts[1]}.0.{parts[2]}"
    elif parts[0] == "controlnet_cond_embedding":  # conv_in.weight, blocks.4.weight, conv_out.bias
        index = {"conv_in": 0, "conv_out": 2 * (hint_blocks + 1)}.get(parts[1])
        index = 2 * (int(parts[2]) + 1) if index is None else index  # the SiLUs sit between the convs
        ldm = f"input_hint_block.{index}.{parts[-1]}"
    else:  # the UNet's encoder half: the UNet's own rule (a ControlNet has no up blocks)
        ldm = unet_key_to_ldm(key, layers_per_block, set()).key.removeprefix(UNET_PREFIX)
    return LdmKey(CONTROLNET_PREFIX + ldm)


def controlnet_rule(controlnet: torch.nn.Module) -> Callable[[str], LdmKey]:
    """The key rule of this ControlNetModel (its layers_per_block and condition-encoder depth fixed)."""
    layers = controlnet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"single-file ControlNets need an int layers_per_block, config has {layers!r}")
    hint_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    return lambda key: controlnet_key_to_ldm(key, layers, hint_blocks)


# ---- writing -------------------------------------------------------------------------------------------------------
def to_ldm_controlnet_state_dict(controlnet: torch.nn.Module, prefix: str = CONTROLNET_PREFIX) -> dict:
    """The ControlNet's weights under their LDM keys (``prefix``: ``control_model.`` as the releases, or ``""``)."""
    rule = controlnet_rule(controlnet)
    return {prefix + rule(key).key.removeprefix(CONTROLNET_PREFIX): tensor
            for key, tensor in controlnet.state_dict().items()}


def save_single_file_controlnet(path: str | os.PathLike, controlnet: torch.nn.Module,
                                prefix: str = CONTROLNET_PREFIX) -> None:
    """Write a ControlNetModel to one ``.safetensors`` file in the original LDM ControlNet layout."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_single_file_controlnet writes .safetensors only, got {path}")
    save_safetensors({k: v.contiguous() for k, v in to_ldm_controlnet_state_dict(controlnet, prefix).items()}, path)


# ---- reading -------------------------------------------------------------------------------------------------------
def read_controlnet_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; a pickled checkpoint is refused with how to convert it."""
    require_regular_file(path, "ControlNet checkpoint")
    if not path.endswith(".safetensors"):
        pickled = path.endswith(PICKLE_SUFFIXES)
        kind = "a pickled checkpoint, which minidiff never unpickles" if pickled else "not a .safetensors file"
        raise ValueError(
            f"ControlNetModel.from_single_file reads .safetensors files only; {path} is {kind}: convert it to "
            ".safetensors first (in an environment you trust: safetensors.torch.save_file(state_dict, "
            "'control.safetensors')) or use the model's .safetensors release")
    return load_safetensors(path)


def controlnet_layout(checkpoint: dict[str, torch.Tensor], source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``("diffusers", state)`` for a file already in diffusers' layout, else ``("ldm", state)`` with every
    ControlNet tensor under ``control_model.`` (a prefix-less file gets it; other models' keys are dropped)."""
    if DIFFUSERS_KEY in checkpoint:
        return "diffusers", checkpoint
    if CONTROLNET_PREFIX + TIME_EMBED_KEY in checkpoint:
        return "ldm", {k: v for k, v in checkpoint.items() if k.startswith(CONTROLNET_PREFIX)}
    if TIME_EMBED_KEY in checkpoint:
        return "ldm", {CONTROLNET_PREFIX + k: v for k, v in checkpoint.items()}
    if any(k.startswith(UNET_PREFIX) for k in checkpoint):
        raise ValueError(
            f"{source} is a Stable Diffusion (UNet) checkpoint, not a ControlNet: it has {UNET_PREFIX}* keys but no "
            f"{CONTROLNET_PREFIX}{TIME_EMBED_KEY}. Load it with StableDiffusionPipeline.from_single_file or "
            "UNet2DConditionModel.from_single_file, and give ControlNetModel.from_single_file a ControlNet file "
            "(e.g. control_v11p_sd15_canny.safetensors)")
    roots = sorted({".".join(key.split(".")[:2]) for key in checkpoint})
    raise ValueError(
        f"{source} is not a ControlNet checkpoint: it has no {CONTROLNET_PREFIX}{TIME_EMBED_KEY} (LDM layout), "
        f"{TIME_EMBED_KEY} (LDM without prefix) or {DIFFUSERS_KEY} (diffusers layout); its keys start with "
        f"{roots[:6]}")


def detect_controlnet_config(checkpoint: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The built-in SD 1.x (768-wide cross-attention) or SD 2.x (1024, linear projections, heads per level)
    ControlNet config, picked from the width of the first cross-attention's to_k as the UNet loader does, with
    the input, hint channels and hint-encoder widths read from the shapes of an LDM ``checkpoint``."""
    from minidiff.loading import builtin_configs

    to_k = checkpoint.get(TO_K_KEY)
    if to_k is None:
        raise ValueError(f"{source} has no {TO_K_KEY}, so its model family (SD 1.x / 2.x) cannot be told from "
                         "shapes: pass config= (a ControlNet config dict or a local folder with its config.json)")
    unet = builtin_configs.SD2_UNET if to_k.shape[-1] == SD2_CROSS_ATTENTION_DIM else builtin_configs.SD1_UNET
    config = {k: v for k, v in unet.items() if k not in UNET_ONLY_FIELDS}
    config["in_channels"] = checkpoint[CONTROLNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    hint_convs = sorted(int(k.split(".")[2]) for k in checkpoint
                        if k.startswith(CONTROLNET_PREFIX + "input_hint_block.") and k.endswith(".weight"))
    if hint_convs:
        hint = lambda index: checkpoint[f"{CONTROLNET_PREFIX}input_hint_block.{index}.weight"]  # noqa: E731
        config["conditioning_channels"] = hint(0).shape[1]
        # conv_in's width, then each stride-2 conv's (input_hint_block 4, 8, ...); the last conv is conv_out
        config["conditioning_embedding_out_channels"] = tuple(
            hint(index).shape[0] for index in hint_convs[:-1] if index % 4 == 0)
    return config


def _config_values(config: Any, source: str) -> dict[str, Any]:
    """``config=`` as constructor kwargs: a dict / ControlNetConfig, or a local folder (or its config.json)."""
    from minidiff.configuration import Config
    from minidiff.models.controlnet import ControlNetModel

    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, dict):
        return ControlNetModel.config_from_file_values(dict(config), "config=")
    if isinstance(config, (str, os.PathLike)):
        folder = os.fspath(config)
        if os.path.isfile(folder) and os.path.basename(folder) == ControlNetModel.config_name:
            folder = os.path.dirname(folder) or "."
        path = os.path.join(folder, ControlNetModel.config_name)
        return ControlNetModel.config_from_file_values(ControlNetModel.load_config(folder), path)
    raise TypeError(f"config= for {source} must be a ControlNet config (dict, ControlNetConfig) or a local folder "
                    f"with its config.json, got {type(config).__name__}")


def load_single_file_controlnet(path: str | os.PathLike, config: Any = None, torch_dtype: Any = None):
    """A ControlNetModel from an original ControlNet ``.safetensors`` file (see the module docstring for the
    layouts). ``config``: the model's config (dict, ControlNetConfig or a local folder with config.json); without
    it the SD 1.x / 2.x config is detected from tensor shapes. Missing or left-over tensors and wrong shapes are
    a ValueError naming the LDM key and the shapes."""
    from minidiff.models.controlnet import ControlNetModel
    from minidiff.models.modeling import parse_dtype, skip_weight_init

    source = os.fspath(path)
    dtype = parse_dtype(torch_dtype)
    layout, checkpoint = controlnet_layout(read_controlnet_file(source), source)
    if config is not None:
        values = _config_values(config, source)
    elif layout == "ldm":
        values = detect_controlnet_config(checkpoint, source)
    else:
        raise ValueError(f"{source} is in diffusers' layout, whose config cannot be told from shapes: pass config= "
                         "the model's config, or load its folder with ControlNetModel.from_pretrained")
    with skip_weight_init():
        model = ControlNetModel(**values)
    if layout == "diffusers":
        state = checkpoint
    else:
        used: set[str] = set()
        state = gather_state(checkpoint, model, controlnet_rule(model), "ControlNetModel", source, used)
        leftover = sorted(set(checkpoint) - used)
        if leftover:
            shown = ", ".join(leftover[:5]) + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else "")
            raise ValueError(f"{source} has {len(leftover)} ControlNet tensor(s) this ControlNetModel does not use: "
                             f"{shown} (is the config right for this checkpoint?)")
    model.load_weights(state, source=source)
    return (model.to(dtype) if dtype is not None else model).eval()
