"""Checkpoints: diffusers folders plus the training state, written atomically so a crash never leaves a broken one.

``<output_dir>/checkpoints/checkpoint-000500/``::

    model_index.json, unet/, scheduler/   the model as diffusers lays it out (a DDPMPipeline folder in pixel space)
    unet_ema/                             the EMA weights (a UNet folder)
    training_state/optimizer.safetensors  AdamW moments (tensors)
    training_state/rng.safetensors        torch RNG state(s)
    training_state/state.json             step, per-step losses, EMA update count, optimizer hyper-parameters, config
    loss.png, samples.png

A checkpoint is written into ``checkpoints/.tmp-checkpoint-000500`` and renamed into place once complete (rename is
atomic), so the newest ``checkpoint-*`` folder is always whole; a failed write (a full disk) removes the temporary
folder and names the last good checkpoint. Nothing is unpickled: tensors go through safetensors, scalars through JSON.

Resuming checks the chosen checkpoint first (state.json's fields, every safetensors header, the optimizer tensors'
shapes against the model): a damaged one is an error that names the newest intact checkpoint to ``--resume`` from.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections import defaultdict
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from minidiff.fileio import fsync_dir
from minidiff.loading.safetensors_io import load_safetensors, read_json, save_safetensors

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = os.path.join("training_state", "state.json")
OPTIMIZER_FILE = os.path.join("training_state", "optimizer.safetensors")
RNG_FILE = os.path.join("training_state", "rng.safetensors")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # per-parameter tensors of Adam/AdamW, shaped like it
StateCheck = Callable[[dict, str], None]  # raises a ValueError naming the field of state.json (in the folder) at fault


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE))


def checkpoint_folders(run_dir: str) -> list[str]:
    """Every ``checkpoints/checkpoint-NNNNNN`` folder of a run, whole or damaged, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(folder, name))]
    return [path for _, path in sorted(found)]


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run folder, oldest first (temporary folders of interrupted writes are ignored)."""
    return [path for path in checkpoint_folders(run_dir) if is_checkpoint(path)]


def find_checkpoint(resume: str, output_dir: str, check_state: StateCheck | None = None) -> str:
    """``resume`` is "latest" (the newest checkpoint of ``output_dir``), a checkpoint folder, or a run folder (its
    newest checkpoint). The one chosen must be intact (:func:`check_intact`); if it is not, the error names the
    newest intact checkpoint beside it and how to resume from that one. Never falls back silently."""
    where = output_dir if resume == "latest" else resume
    if not os.path.exists(where):
        raise FileNotFoundError(f"resume path {where} does not exist")
    if is_checkpoint(where) or CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(where))):
        chosen, run_dir = where, os.path.dirname(os.path.dirname(os.path.abspath(where)))
    else:
        found = checkpoint_folders(where)
        if not found:
            raise FileNotFoundError(f"no checkpoint to resume from in {where} (looked for checkpoints/"
                                    f"checkpoint-NNNNNN with {STATE_FILE}); start without --resume")
        chosen, run_dir = found[-1], where
    try:
        check_intact(chosen, check_state)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{error}; {_fallback(run_dir, chosen, check_state)}") from None
    return chosen


def _fallback(run_dir: str, damaged: str, check_state: StateCheck | None) -> str:
    """What to do about a damaged checkpoint: resume from the newest other intact one, or start over."""
    for other in reversed(checkpoint_folders(run_dir)):
        if os.path.abspath(other) == os.path.abspath(damaged):
            continue
        try:
            check_intact(other, check_state)
        except (ValueError, FileNotFoundError):
            continue
        return f"resume from the newest intact checkpoint with --resume {other}"
    return f"no other intact checkpoint is left in {run_dir}; start over with --overwrite"


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
    fsync_dir(folder)


def save_checkpoint(run_dir: str, step: int, write_models: Callable[[str], None], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int | None = None) -> str:
    """Write checkpoint ``step`` atomically. ``write_models(folder)`` writes the model folders and pictures into the
    temporary folder; then the training state; then one rename publishes it. Keeps the newest ``keep``.

    A failed write (a full disk, ...) removes the temporary folder, leaves every existing checkpoint as it was, and
    raises an OSError that says why and names the last good checkpoint."""
    folder = os.path.join(run_dir, "checkpoints")
    final = os.path.join(folder, checkpoint_name(step))
    tmp = os.path.join(folder, ".tmp-" + checkpoint_name(step))
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
    try:
        _write_checkpoint(tmp, write_models, optimizer, {**state, "step": step})
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        reason, fix = write_error(error)
        good = list_checkpoints(run_dir)
        last = (f"the last good checkpoint is {good[-1]}: {fix} and resume with --resume {good[-1]}" if good else
                f"no checkpoint has been written yet: {fix} and start again")
        raise OSError(error.errno, f"{reason} while writing checkpoint {final} (nothing of it was kept); "
                                   f"{last}") from error
    if os.path.exists(final):  # re-reaching a step after resuming from an older checkpoint
        stale = os.path.join(folder, ".old-" + checkpoint_name(step))
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    fsync_dir(folder)
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def write_error(error: OSError) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed write: a full disk is named as such."""
    if error.errno == errno.ENOSPC:
        return "no space left on device", "free some space"
    return error.strerror or str(error), "fix that"


def _write_checkpoint(tmp: str, write_models: Callable[[str], None], optimizer: torch.optim.Optimizer,
                      state: dict[str, Any]) -> None:
    """Everything of a checkpoint into the folder ``tmp``, fsynced."""
    os.makedirs(os.path.join(tmp, "training_state"))
    write_models(tmp)
    tensors, meta = split_optimizer_state(optimizer.state_dict())
    save_safetensors(tensors, os.path.join(tmp, OPTIMIZER_FILE))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_safetensors(rng, os.path.join(tmp, RNG_FILE))
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump({**state, "optimizer": meta}, handle)
    _fsync_tree(tmp)


# ---- reading ------------------------------------------------------------------------------------------------------
def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _describe(value: Any) -> str:
    return f"{value!r:.40} ({type(value).__name__})"


def read_state(checkpoint: str) -> dict[str, Any]:
    """state.json of a checkpoint, with its common fields checked: ``step`` (int >= 0) and ``optimizer``
    (``param_groups``: objects with int ``params``; ``scalars``: an object). Errors name the file and the field."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    state = read_json(path, "training state")
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"state.json in {checkpoint}: {problem}")
    return state


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not an object"
    missing = [key for key in ("step", "optimizer") if key not in state]
    if missing:
        return f"{missing[0]!r} is missing"
    if not _is_int(state["step"]):
        return f"'step' must be an int >= 0, got {_describe(state['step'])}"
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("scalars"), dict) or not isinstance(
            optimizer.get("param_groups"), list):
        return "'optimizer' must be an object with 'param_groups' (a list) and 'scalars' (an object)"
    for number, group in enumerate(optimizer["param_groups"]):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(_is_int(p) for p in params):
            return f"'optimizer.param_groups[{number}]' must be an object whose 'params' is a list of ints"
    return None


def check_intact(checkpoint: str, check_state: StateCheck | None = None) -> None:
    """Raise a ValueError / FileNotFoundError naming what is damaged: state.json (its common fields, then
    ``check_state``'s), the training-state tensors, or any safetensors file (a truncated file fails its header)."""
    state = read_state(checkpoint)
    if check_state is not None:
        check_state(state, checkpoint)
    for required in (OPTIMIZER_FILE, RNG_FILE):
        if not os.path.isfile(os.path.join(checkpoint, required)):
            raise FileNotFoundError(f"{os.path.join(checkpoint, required)} is missing")
    for folder, _, names in os.walk(checkpoint):
        for name in names:
            if name.endswith(".safetensors"):
                _check_safetensors_header(os.path.join(folder, name))


def _check_safetensors_header(path: str) -> None:
    try:
        with safe_open(path, "pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def load_training_state(checkpoint: str, optimizer: torch.optim.Optimizer,
                        parameter_names: list[str] | None = None) -> dict[str, Any]:
    """Restore the optimizer and the RNG state; return state.json (step, losses, ...). The optimizer tensors are
    checked against ``optimizer``'s parameters first (``parameter_names``: their names, for the error)."""
    state = read_state(checkpoint)
    tensors = load_safetensors(os.path.join(checkpoint, OPTIMIZER_FILE))
    meta = state.pop("optimizer")
    _check_optimizer_state(tensors, meta, optimizer, parameter_names, os.path.join(checkpoint, OPTIMIZER_FILE))
    optimizer.load_state_dict(join_optimizer_state(tensors, meta))
    rng = load_safetensors(os.path.join(checkpoint, RNG_FILE))
    _check_rng_state(rng, os.path.join(checkpoint, RNG_FILE))
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
    if cuda_states and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def _check_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer,
                           names: list[str] | None, source: str) -> None:
    """Every saved tensor ``"<index>.<name>"`` must belong to a parameter of ``optimizer`` and, for Adam's
    moments, have its shape; the parameter groups must list the same parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = names or [f"#{i}" for i in range(len(params))]
    saved = [i for group in meta["param_groups"] for i in group["params"]]
    if saved != list(range(len(params))):
        raise ValueError(f"{source}: the optimizer state covers {len(saved)} parameters but the model has "
                         f"{len(params)}; the checkpoint belongs to another model")
    for key in [*tensors, *meta["scalars"]]:
        index, _, kind = key.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not kind:
            raise ValueError(f"{source}: key {key!r} is not '<parameter index < {len(params)}>.<name>'")
        if kind in ADAM_MOMENTS and key in tensors and tensors[key].shape != params[int(index)].shape:
            raise ValueError(f"{source}: {key!r} (of parameter {names[int(index)]}) has shape "
                             f"{tuple(tensors[key].shape)} but the parameter has {tuple(params[int(index)].shape)}")


def _check_rng_state(rng: dict[str, torch.Tensor], source: str) -> None:
    expected = torch.get_rng_state()
    state = rng.get("torch")
    if state is None or state.dtype != torch.uint8 or state.shape != expected.shape:
        found = "no 'torch' tensor" if state is None else f"'torch' of {state.dtype} {tuple(state.shape)}"
        raise ValueError(f"{source}: holds {found}, not the CPU generator state (uint8 {tuple(expected.shape)})")


def load_model_weights(model, folder: str) -> None:
    """Load a UNet folder's safetensors weights into ``model`` (strict, clear errors)."""
    model.load_weights(load_safetensors(os.path.join(folder, model.weights_name)), source=folder)
