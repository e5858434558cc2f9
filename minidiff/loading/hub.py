"""Turn what a user passes to ``from_pretrained`` into a local folder, without any network access.

A local path is used as is. A hub-style id (``"runwayml/stable-diffusion-v1-5"``) is looked up in the local
Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``); if it is not there the
error says how to get the files. minidiff never downloads.
"""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a commit hash; never a path that leaves snapshots/


def hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(hf_home, "hub")


def cached_snapshot(repo_id: str, revision: str = "main") -> str | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache, or None."""
    repo_dir = os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo_dir, "snapshots")
    ref_file = os.path.join(repo_dir, "refs", revision)
    if os.path.isfile(ref_file):
        candidate = os.path.join(snapshots, _read_ref(ref_file))
        if os.path.isdir(candidate):
            return candidate
    candidate = os.path.join(snapshots, revision)  # a commit hash given as revision
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(snapshots):
        entries = sorted(os.listdir(snapshots))
        if len(entries) == 1:
            return os.path.join(snapshots, entries[0])
    return None


def _read_ref(ref_file: str) -> str:
    """The commit a cache ref file (``refs/main``) names, or a ValueError saying the file is damaged."""
    try:
        with open(ref_file, encoding="utf-8") as handle:
            commit = handle.read(200).strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = f"Hugging Face cache ref {ref_file} cannot be read ({error})"
        raise ValueError(f"{reason}; delete it and re-download the model") from None
    if not _SNAPSHOT_NAME.match(commit):
        raise ValueError(f"Hugging Face cache ref {ref_file} holds {commit[:60]!r}, not a commit hash; "
                         "delete it and re-download the model")
    return commit


def resolve_folder(name_or_path: str | os.PathLike) -> str:
    """A local folder for ``name_or_path`` or a FileNotFoundError saying how to obtain one."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(f"{path} is a folder this user cannot read (check its permissions)")
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file, not a folder; single-file checkpoints load with from_single_file")
    if _HUB_ID.match(path):
        snapshot = cached_snapshot(path)
        if snapshot is not None:
            return snapshot
        raise FileNotFoundError(
            f"{path!r} is not a local folder and is not in the Hugging Face cache at {hub_cache_dir()}. "
            "minidiff does not download: fetch it once with `huggingface-cli download "
            f"{path}` (or save it with diffusers' save_pretrained) and pass the local folder."
        )
    raise FileNotFoundError(
        f"{path} does not exist: pass a local diffusers folder or a hub id that is in the local Hugging Face cache"
    )
