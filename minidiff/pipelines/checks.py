"""Argument and value checks shared by every pipeline: one place, one message style.

Each check raises TypeError (wrong kind of value) or ValueError (right kind, bad value) naming the argument, what
was passed, and what is accepted. ``check_finite`` guards the tensors between stages (text encoder, every UNet step,
every scheduler step, VAE decode) so a NaN/Inf never becomes an image: it costs one ``isfinite(...).all()``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

from minidiff.random import check_generator

# Guidance scales in use are 0-30 (some UIs allow up to ~100). Past 1e4 the guided prediction
# eps_u + w (eps_c - eps_u) is dominated by w times the (tiny) difference of two network outputs: numeric noise.
MAX_GUIDANCE_SCALE = 1e4
SIZE_MULTIPLE = 8  # height and width must be multiples of 8, as diffusers requires


class NonFiniteError(ValueError):
    """A NaN or Inf appeared in a pipeline stage; the message names the stage."""


def check_finite(tensor: torch.Tensor, stage: str,
                 hint: str = "check the weights, guidance_scale and latents") -> torch.Tensor:
    """``tensor`` unchanged if every value is finite; otherwise NonFiniteError naming ``stage`` and the count."""
    if bool(torch.isfinite(tensor).all()):
        return tensor
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    raise NonFiniteError(f"{stage} has {nan} NaN and {inf} Inf values (of {tensor.numel()}); {hint}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An int (not a bool, not a float such as 32.0) that is at least ``minimum``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number (not a bool) within [low, high] where given."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if low is None and high is None:
        accepted = "a finite number"
    else:
        accepted = f"in [{'-inf' if low is None else f'{low:g}'}, {'inf)' if high is None else f'{high:g}]'}"
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


def check_guidance_scale(value: Any, name: str = "guidance_scale") -> float:
    accepted = (f"a finite number with |{name}| <= {MAX_GUIDANCE_SCALE:g} (typical values are 1-30; "
                "<= 1 turns classifier-free guidance off)")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or abs(value) > MAX_GUIDANCE_SCALE:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


def check_size(name: str, value: Any) -> None:
    """``height`` / ``width``: None (the default size) or a positive int multiple of 8."""
    if value is None:
        return
    if not _is_int(value):
        raise TypeError(f"{name} must be an int (a positive multiple of {SIZE_MULTIPLE}) or None for the default, "
                        f"got {type(value).__name__} {value!r}")
    if value <= 0 or value % SIZE_MULTIPLE:
        raise ValueError(f"{name}={value}: height and width must be positive multiples of {SIZE_MULTIPLE} "
                         "(None means the model's default size)")


def check_latents(name: str, latents: Any) -> None:
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(latents).__name__}")
    check_finite(latents, name, hint=f"pass finite {name}")


def check_embeds(name: str, embeds: Any, width: int) -> None:
    """Precomputed text embeddings: a finite (B, tokens, width) tensor, width = the UNet's cross_attention_dim."""
    if embeds is None:
        return
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, tokens, {width}), got {type(embeds).__name__}")
    if embeds.ndim != 3 or embeds.shape[-1] != width:
        raise ValueError(f"{name} has shape {tuple(embeds.shape)}; expected (batch, tokens, {width}): "
                         f"{width} is the UNet's cross_attention_dim")
    check_finite(embeds, name, hint=f"pass finite {name}")


def check_clip_skip(clip_skip: Any, num_layers: int) -> None:
    """None, or 0 <= clip_skip < num_layers (diffusers' meaning: 1 = the penultimate layer, 0 = the last one)."""
    if clip_skip is None:
        return
    accepted = f"None or an int in [0, {num_layers - 1}] (layers of the text encoder to skip; 1 = penultimate)"
    if not _is_int(clip_skip):
        raise TypeError(f"clip_skip must be {accepted}, got {type(clip_skip).__name__} {clip_skip!r}")
    if not 0 <= clip_skip < num_layers:
        raise ValueError(f"clip_skip must be {accepted}, got {clip_skip}")


def check_prompt_text(name: str, value: Any, allow_none: bool = True) -> None:
    """A str or a non-empty list of str (``None`` where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{name} is an empty list; pass a str or a non-empty list of str")
        return
    raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__}")


def check_sampling_arguments(num_inference_steps: Any = 1, guidance_scale: Any = 1.0, num_images_per_prompt: Any = 1,
                             eta: Any = 0.0, guidance_rescale: Any = 0.0, generator: Any = None) -> None:
    """The arguments every Stable Diffusion sampling call shares (``guidance_scale`` NaN would act like 1.0:
    ``nan > 1.0`` is False)."""
    check_int("num_inference_steps", num_inference_steps)
    check_guidance_scale(guidance_scale)
    check_int("num_images_per_prompt", num_images_per_prompt)
    check_number("eta", eta, low=0.0)
    check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
    check_generator(generator)


def check_callback_result(result: Any, latents: torch.Tensor, step: int) -> torch.Tensor:
    """The latents a ``callback_on_step_end`` returns (its dict's "latents", else the current ones)."""
    if not isinstance(result, dict):
        raise TypeError(f"callback_on_step_end must return a dict (e.g. the callback_kwargs it was given), "
                        f"got {type(result).__name__} at step {step}")
    new = result.get("latents", latents)
    if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(f"callback_on_step_end returned latents of {got} at step {step}; "
                         f"expected a tensor of shape {tuple(latents.shape)}")
    return check_finite(new, f"latents returned by callback_on_step_end at step {step}")


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A UserWarning the first time ``key`` comes up in this process (an option a run ignores is worth saying once,
    not at every call of a loop)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)
