"""Checks shared by the UNets, the VAE and the text encoder: semantic checks of configs, and the dtype of inputs.

``build_config`` has already checked each value's type against its field's annotation; these check what a type
cannot say (a channel count >= 1, a finite eps > 0, one entry per block, a group count dividing the channels), so a
bad config fails at construction with a one-line ValueError naming the config.json key, the value, the rule and
the fix, instead of a torch error deep inside a layer or a NaN at the first forward.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NoReturn

import torch

from minidiff.configuration import Config


def fail(key: str, value: Any, rule: str, fix: str) -> NoReturn:
    """Raise the one-line ValueError of an invalid config value: key, value, rule, fix."""
    raise ValueError(f"{key}={_shown(value)} is invalid: {rule}; {fix}")


def _shown(value: Any) -> str:
    """A value as config.json spells it: tuples (nested too) as lists."""
    def as_lists(item):
        return [as_lists(entry) for entry in item] if isinstance(item, (list, tuple)) else item
    return repr(as_lists(value))


def _entries(value: Any) -> Iterator[Any]:
    """The numbers in a setting: itself, or the entries of a (nested) per-block list; None entries are skipped."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _entries(item)
    elif value is not None:
        yield value


def check_ints(config: Config, *keys: str, minimum: int = 1) -> None:
    """Every number in each of ``keys`` (an int, a per-block list of ints, or None) is an int >= ``minimum``."""
    for key in keys:
        value = config[key]
        for entry in _entries(value):
            if isinstance(entry, bool) or not isinstance(entry, int) or entry < minimum:
                rule = "every entry must be" if isinstance(value, (list, tuple)) else "must be"
                fail(key, value, f"{rule} an int >= {minimum}", f"use ints >= {minimum} in {key}")


def check_positive_floats(config: Config, *keys: str) -> None:
    """Each of ``keys`` (a number or None) is finite and > 0."""
    for key in keys:
        value = config[key]
        if value is not None and not (math.isfinite(value) and value > 0):
            fail(key, value, "must be a finite number > 0", f"set {key} to a positive number")


def check_output_scale(config: Config, *keys: str) -> None:
    """Each of ``keys`` divides a block's output: in [0.01, 100] (checkpoints use 1 or sqrt(2)); a scale near 0
    overflows to inf within a few blocks."""
    for key in keys:
        value = config[key]
        if not 0.01 <= value <= 100:
            fail(key, value, "must be in [0.01, 100] (block outputs are divided by it)",
                 f"set {key} to 1.0 unless the checkpoint says otherwise")


def check_dropout(config: Config, key: str = "dropout") -> None:
    value = config[key]
    if not 0 <= value < 1:
        fail(key, value, "a dropout probability must be in [0, 1)", f"set {key} to 0.0")


def check_sample_size(config: Config) -> None:
    """``sample_size``: None, a side >= 1, or [height, width] of sides >= 1."""
    value = config.sample_size
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    if value is not None and (len(sides) not in (1, 2) or any(side < 1 for side in sides)):
        fail("sample_size", value, "must be a size >= 1 or [height, width] of sizes >= 1",
             "set sample_size to the training resolution, e.g. 64")


def check_not_empty(config: Config, key: str) -> None:
    if len(config[key]) == 0:
        fail(key, config[key], "needs at least one entry (one per resolution level)", f"give {key} one entry per level")


def check_groups_divide(config: Config, channels_key: str = "block_out_channels",
                        groups_key: str = "norm_num_groups") -> None:
    """Every GroupNorm splits its channels into ``groups_key`` groups, so the group count divides each level."""
    groups, channels = config[groups_key], list(config[channels_key])
    bad = [count for count in channels if count % groups]
    if bad:
        raise ValueError(
            f"{groups_key}={groups} does not divide {channels_key} {bad} (each GroupNorm splits the channels into "
            f"{groups_key} groups); use a {groups_key} that divides every entry of {channels_key} {channels}"
        )


def check_per_block(config: Config, count: int, *keys: str) -> None:
    """Per-block settings given as lists must have one entry per down block."""
    for key in keys:
        value = config[key]
        if isinstance(value, (list, tuple)) and len(value) != count:
            raise ValueError(f"{key} has {len(value)} entries but there are {count} down_block_types "
                             f"{list(config.down_block_types)}; give one entry per block or a single value")


def check_heads(key: str, value: Any, level: int, heads: int, channels: int, what: str) -> None:
    """An attention at ``level`` over ``channels`` channels gets ``heads`` heads: at least 1, and at least one
    channel per head."""
    if not 1 <= heads <= channels:
        fail(key, value, f"{what} gives {heads} attention head(s) for the {channels} channels of level {level}; "
                         "each level needs 1 to channels heads", f"set {key} so that 1 <= heads <= {channels}")


def check_input_dtype(name: str, tensor: torch.Tensor, model_dtype: torch.dtype) -> None:
    """A model input must be a floating tensor of the model's dtype (autocast converts on its own)."""
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}; pass {name}.float()")
    if tensor.dtype != model_dtype and not torch.is_autocast_enabled(tensor.device.type):
        raise ValueError(f"{name} has dtype {tensor.dtype} but the model's weights are {model_dtype}; "
                         f"pass {name}.to({model_dtype})")
