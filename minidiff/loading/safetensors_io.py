"""Reading and writing weight files: safetensors (single or sharded, with variants) and, safely, pickled .ckpt.

Every failure names the file and what is wrong with it. Pickled files are opened only with
``torch.load(weights_only=True)``, which refuses to run code.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def with_variant(filename: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` + ``fp16`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if variant is None:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def load_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or (safely) a pickled ``.ckpt``/``.pt``/``.bin``."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported GLOBAL" in line), lines[0] if lines else "")
        raise ValueError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({type(error).__name__}: {reason}); "
            "minidiff never runs pickled code: convert the file to .safetensors"
        ) from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict):
        raise ValueError(f"{path} holds a {type(payload).__name__}, not a state dict")
    return {key: value for key, value in payload.items() if isinstance(value, torch.Tensor)}


def load_folder_weights(folder: str, weights_name: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Weights of one model folder: ``weights_name`` (with ``variant``) or its sharded form with an index json."""
    single = os.path.join(folder, with_variant(weights_name, variant))
    if os.path.isfile(single):
        return load_safetensors(single)
    index_path = os.path.join(folder, with_variant(weights_name + ".index.json", variant))
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path} is not a valid shard index (needs a 'weight_map' object): {error}") from None
        state_dict: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(load_safetensors(os.path.join(folder, shard)))
        return state_dict
    present = sorted(name for name in os.listdir(folder) if name.endswith((".safetensors", ".json", ".bin", ".ckpt")))
    hint = " (try variant=... for files such as *.fp16.safetensors)" if any(".fp16." in p for p in present) else ""
    if any(name.endswith(".bin") for name in present) and not any(name.endswith(".safetensors") for name in present):
        hint = "; only pickled .bin weights are present: convert them to safetensors (minidiff never unpickles)"
    raise FileNotFoundError(
        f"no {with_variant(weights_name, variant)} (or sharded index) in {folder}; found {present or 'nothing'}{hint}"
    )


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous, unshared tensors (safetensors refuses aliases), atomically via a temporary file."""
    tensors = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)
