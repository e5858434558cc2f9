"""Checkpoints: diffusers folders plus the training state, written atomically so a crash never leaves a broken one.

``<output_dir>/checkpoints/checkpoint-000500/``::

    model_index.json, unet/, scheduler/   the model as diffusers lays it out (a DDPMPipeline folder in pixel space)
    unet_ema/                             the EMA weights (a UNet folder)
    training_state/optimizer.safetensors  AdamW moments (tensors)
    training_state/rng.safetensors        torch RNG state(s)
    training_state/state.json             step, per-step losses, EMA update count, optimizer hyper-parameters, config
    loss.png, samples.png

A checkpoint is written into ``checkpoints/.tmp-checkpoint-000500`` and renamed into place once complete (rename is
atomic), so the newest ``checkpoint-*`` folder is always whole. Nothing is unpickled: tensors go through
safetensors, scalars through JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from typing import Any, Callable

import torch

from minidiff.loading.safetensors_io import load_safetensors, save_safetensors

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = os.path.join("training_state", "state.json")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE))


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run folder, oldest first (temporary folders of interrupted writes are ignored)."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := CHECKPOINT_NAME.match(name)) and is_checkpoint(os.path.join(folder, name))]
    return [path for _, path in sorted(found)]


def find_checkpoint(resume: str, output_dir: str) -> str:
    """``resume`` is "latest" (the newest checkpoint of ``output_dir``), a checkpoint folder, or a run folder."""
    where = output_dir if resume == "latest" else resume
    if is_checkpoint(where):
        return where
    if not os.path.exists(where):
        raise FileNotFoundError(f"resume path {where} does not exist")
    found = list_checkpoints(where)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {where} (looked for checkpoints/checkpoint-NNNNNN "
                                f"with {STATE_FILE}); start without --resume")
    return found[-1]


# ---- optimizer state as tensors + JSON ----------------------------------------------------------------------------
def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> tensors ``{"<param>.<name>": tensor}`` and JSON (param_groups, other scalars)."""
    tensors, scalars = {}, {}
    for param, state in state_dict["state"].items():
        for name, value in state.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{param}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict] = defaultdict(dict)
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param, name = key.split(".", 1)
        state[int(param)][name] = value
    return {"state": dict(state), "param_groups": meta["param_groups"]}


# ---- writing ------------------------------------------------------------------------------------------------------
def _fsync_tree(folder: str) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(run_dir: str, step: int, write_models: Callable[[str], None], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int | None = None) -> str:
    """Write checkpoint ``step`` atomically. ``write_models(folder)`` writes the model folders and pictures into the
    temporary folder; then the training state; then one rename publishes it. Keeps the newest ``keep``."""
    folder = os.path.join(run_dir, "checkpoints")
    final = os.path.join(folder, checkpoint_name(step))
    tmp = os.path.join(folder, ".tmp-" + checkpoint_name(step))
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
    os.makedirs(os.path.join(tmp, "training_state"))
    write_models(tmp)
    tensors, meta = split_optimizer_state(optimizer.state_dict())
    save_safetensors(tensors, os.path.join(tmp, "training_state", "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_safetensors(rng, os.path.join(tmp, "training_state", "rng.safetensors"))
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump({**state, "step": step, "optimizer": meta}, handle)
    _fsync_tree(tmp)
    if os.path.exists(final):  # re-reaching a step after resuming from an older checkpoint
        stale = os.path.join(folder, ".old-" + checkpoint_name(step))
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    _fsync_dir(folder)
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


# ---- reading ------------------------------------------------------------------------------------------------------
def load_training_state(checkpoint: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and the RNG state; return state.json (step, losses, ...)."""
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    tensors = load_safetensors(os.path.join(checkpoint, "training_state", "optimizer.safetensors"))
    optimizer.load_state_dict(join_optimizer_state(tensors, state.pop("optimizer")))
    rng = load_safetensors(os.path.join(checkpoint, "training_state", "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
    if cuda_states and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def load_model_weights(model, folder: str) -> None:
    """Load a UNet folder's safetensors weights into ``model`` (strict, clear errors)."""
    model.load_weights(load_safetensors(os.path.join(folder, model.weights_name)), source=folder)
