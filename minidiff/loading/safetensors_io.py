"""Reading and writing weight files: safetensors (single or sharded, with variants) and, safely, pickled .ckpt.

Every failure names the file and what is wrong with it. Pickled files are opened only with
``torch.load(weights_only=True)``, which refuses to run code.
"""

from __future__ import annotations

import json
import os
import stat

from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def with_variant(filename: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` + ``fp16`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if variant is None:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _kind_of_file(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def require_regular_file(path: str, what: str = "file", allow_empty: bool = False) -> None:
    """Refuse, before opening anything, a ``path`` that is missing, not a regular file (a directory, a FIFO that
    would block, /dev/zero that never ends) or empty; ``what`` names the file's role in the message."""
    try:
        info = os.stat(path)  # follows symlinks: a link to /dev/zero is a character device
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise ValueError(f"{what} {path} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} {path} is {_kind_of_file(info.st_mode)}, not a regular file")
    if info.st_size == 0 and not allow_empty:
        raise ValueError(f"{what} {path} is empty (0 bytes): re-save or re-download it")


def read_json(path: str, what: str) -> Any:
    """The parsed JSON of ``path``, a regular file (see require_regular_file); invalid JSON names the file."""
    require_regular_file(path, what)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or re-download it") from None


def read_json_object(path: str, what: str, expected: str = "a JSON object") -> dict:
    """``read_json`` for files that must hold an object (configs, indexes, vocabularies)."""
    values = read_json(path, what)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold {expected}, found a {type(values).__name__}")
    return values


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # names torch.save / pickle files go by


def looks_like_pickle(path: str) -> bool:
    """Whether a file starts as torch.save writes (a zip archive, or its legacy pickle with torch's magic number) or
    as a bare pickle of protocol 2-5 does: checked only for files safetensors could not parse."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start == b"PK\x03\x04" or (start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _format_hint(path: str) -> str:
    """Why a file that safetensors cannot parse may have that name."""
    if looks_like_pickle(path):
        return "; it looks like a pickled (torch.save) checkpoint: rename it to .ckpt (loaded with weights_only=True)"
    return " (truncated or corrupt?)"


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    require_regular_file(path, "weight file")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file{_format_hint(path)}: {error}") from None


def load_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or (safely) a pickled ``.ckpt``/``.pt``/``.bin``."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    require_regular_file(path, "checkpoint file")
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
    tensors = {key: value for key, value in payload.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        keys = sorted(map(str, payload))[:5]
        raise ValueError(f"{path} holds a dict with no tensors (keys: {keys}), not a state dict")
    return tensors


def read_shard_index(index_path: str, folder: str) -> dict[str, str]:
    """The ``weight_map`` of a shard index (tensor name -> shard file), each shard checked to lie inside ``folder``
    (``..``, absolute paths and symlinks leading out of it are refused)."""
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} is not a valid shard index: it needs a 'weight_map' object of "
                         "tensor name -> shard file name (strings)")
    roots = _trusted_roots(folder)
    for key, shard in weight_map.items():
        resolved = os.path.realpath(os.path.join(folder, shard))
        if not any(os.path.commonpath([root, resolved]) == root != resolved for root in roots):
            raise ValueError(f"{index_path}: weight_map[{key!r}] = {shard!r} points outside the model folder {folder}; "
                             "shards must be files inside it")
    return weight_map


def _trusted_roots(folder: str) -> list[str]:
    """Where a shard may really live: inside ``folder`` or, for a Hugging Face cache snapshot
    (``models--owner--name/snapshots/<rev>/...``, whose files are symlinks to ``../blobs``), that repo's blobs."""
    root = os.path.realpath(folder)
    parent = root
    while os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
        repo = os.path.dirname(parent)
        if os.path.basename(parent) == "snapshots" and os.path.basename(repo).startswith("models--"):
            return [root, os.path.join(repo, "blobs")]
    return [root]


def load_sharded(index_path: str, folder: str) -> dict[str, torch.Tensor]:
    """All tensors of the shards an index names; a tensor the index puts in a shard must be in that shard (tensors
    a shard holds beyond the index are kept: the strict state-dict check reports any the model does not have)."""
    weight_map = read_shard_index(index_path, folder)
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_safetensors(os.path.join(folder, shard))
        absent = sorted(key for key, name in weight_map.items() if name == shard and key not in tensors)
        if absent:
            raise ValueError(f"{index_path} puts {len(absent)} tensor(s) in {shard} that it lacks: {absent[:5]}")
        state_dict.update(tensors)
    return state_dict


def load_folder_weights(folder: str, weights_name: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Weights of one model folder: ``weights_name`` (with ``variant``) or its sharded form with an index json."""
    return load_weights_path(find_folder_weights(folder, weights_name, variant), folder)


def load_weights_path(path: str, folder: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or, for a shard index (``*.index.json``, ``*.index.<variant>.json``), of every
    shard it names in ``folder``."""
    return load_sharded(path, folder) if is_shard_index(path) else load_safetensors(path)


def is_shard_index(path: str) -> bool:
    return path.endswith(".json") and ".safetensors.index." in os.path.basename(path)


def find_folder_weights(folder: str, weights_name: str, variant: str | None = None) -> str:
    """The weights file of a model folder (or its shard index), or a FileNotFoundError listing what is there."""
    single = os.path.join(folder, with_variant(weights_name, variant))
    index_path = os.path.join(folder, with_variant(weights_name + ".index.json", variant))
    for path in (single, index_path):
        if os.path.lexists(path):  # lexists: a directory or FIFO of that name is reported as such, not as missing
            return path
    present = sorted(name for name in os.listdir(folder) if name.endswith((".safetensors", ".json", ".bin", ".ckpt")))
    hint = " (try variant=... for files such as *.fp16.safetensors)" if any(".fp16." in p for p in present) else ""
    if any(name.endswith(".bin") for name in present) and not any(name.endswith(".safetensors") for name in present):
        hint = "; only pickled .bin weights are present: convert them to safetensors (minidiff never unpickles)"
    pickle_name = with_variant(weights_name.replace(".safetensors", ".bin"), variant)
    raise FileNotFoundError(
        f"Error no file named {with_variant(weights_name, variant)} (or its shard index) found in directory {folder}; "
        f"found {present or 'nothing'}{hint}. (diffusers would go on to look for {pickle_name}, which minidiff never "
        f"unpickles: Error no file named {pickle_name} found in directory {folder}.)"
    )


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous, unshared tensors (safetensors refuses aliases), atomically via a temporary file."""
    tensors = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_shard_size(max_shard_size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or a string such as ``"10GB"`` or ``"750KB"`` (decimal units, as the
    hub's ``parse_size_to_int``)."""
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    elif isinstance(max_shard_size, str) and max_shard_size.strip()[-2:].upper() in SIZE_UNITS:
        text = max_shard_size.strip()
        try:
            size = int(float(text[:-2]) * SIZE_UNITS[text[-2:].upper()])
        except ValueError:
            size = 0
    else:
        size = 0
    if size <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r} is not a size: pass bytes as a positive int or a string "
                         f"such as '10GB' (units {', '.join(SIZE_UNITS)})")
    return size


def save_weights(state_dict: dict[str, torch.Tensor], folder: str, weights_name: str, variant: str | None = None,
                 max_shard_size: int | str = "10GB") -> list[str]:
    """Write ``state_dict`` as ``weights_name`` (with ``variant``), or, when it exceeds ``max_shard_size``, as shards
    ``<stem>-00001-of-0000N.safetensors`` with a ``<name>.index.json`` (the hub's layout: tensors in order, a new shard
    when the next would pass the limit, a tensor larger than the limit alone). Stale weights of the same name, single
    or sharded, are removed first so the folder holds one copy. Returns the files written."""
    limit = parse_shard_size(max_shard_size)
    name = with_variant(weights_name, variant)
    index_name = with_variant(weights_name + ".index.json", variant)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    stem = name[: -len(".safetensors")]
    for old in os.listdir(folder):  # an earlier save of this model: one copy of its weights stays
        if old in (name, index_name) or (old.startswith(stem + "-") and old.endswith("safetensors")):
            os.remove(os.path.join(folder, old))
    if len(shards) == 1:
        save_safetensors(shards[0], os.path.join(folder, name))
        return [name]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard_name, shard in zip(names, shards):
        save_safetensors(shard, os.path.join(folder, shard_name))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {key: shard_name for shard_name, shard in zip(names, shards) for key in shard}}
    with open(os.path.join(folder, index_name), "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2)
        handle.write("\n")
    return [*names, index_name]
