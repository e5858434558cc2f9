"""Latent Consistency Models (Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with
Few-Step Inference"): a model distilled so that one call maps x_t straight to the x0 of its PF-ODE trajectory.

Sampling is multistep consistency sampling (LCM Algorithm 1): at each of N timesteps, taken from the
``original_inference_steps``-point distillation grid ("skipping-step" schedule), denoise with the consistency
function, then re-noise the result to the next timestep with fresh noise; the last step returns the denoised sample.

``set_alpha_to_one``, ``steps_offset`` and ``timestep_spacing`` are config keys of diffusers' class that its
sampler never reads (the last step re-noises nothing, the grid is fixed); they are kept, checked and ignored.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minidiff.configuration import Config
from minidiff.outputs import BaseOutput
from minidiff.random import Generator, randn_tensor
from minidiff.schedulers.base import StepIndexMixin, check_timestep
from minidiff.schedulers.betas import (
    check_custom_timesteps,
    check_num_inference_steps,
    check_range,
    clip_or_threshold,
    predicted_x0_and_eps,
)

SIGMA_DATA = 0.5  # the data standard deviation the LCM boundary condition assumes (diffusers' sigma_data)


@dataclass
class LCMSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: list[float] | None = None
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False


@dataclass
class LCMSchedulerOutput(BaseOutput):
    """``prev_sample`` is the input of the next step; ``denoised`` the consistency function's x0 at this step."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


# ---- the schedule ----------------------------------------------------------------------------------------------------
def distillation_timesteps(num_train_timesteps: int, original_steps: int, strength: float = 1.0) -> np.ndarray:
    """The ascending grid the model was distilled on: ``k, 2k, ..., n k`` minus 1 with ``k = T // original_steps``
    and ``n = int(original_steps * strength)`` (strength < 1 keeps only the low-noise part, for img2img)."""
    k = num_train_timesteps // original_steps
    return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1


def skipping_step_timesteps(grid: np.ndarray, num_inference_steps: int) -> np.ndarray:
    """N timesteps taken from the descending ``grid`` at evenly spaced positions ``floor(i * len / N)``, starting
    at its noisiest point (LCM Sec. 4.2, the skipping-step schedule)."""
    descending = grid[::-1].copy()
    positions = np.floor(np.linspace(0, len(descending), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return descending[positions]


def warn_about_custom_timesteps(timesteps: np.ndarray, grid: np.ndarray, max_length: int, num_train_timesteps: int):
    """diffusers' warnings for a custom schedule the model may not handle well."""
    if timesteps[0] != num_train_timesteps - 1:
        warnings.warn(f"the first custom timestep is {timesteps[0]}, not num_train_timesteps - 1 = "
                      f"{num_train_timesteps - 1}; the result may be unexpected", stacklevel=3)
    off_grid = sorted(set(timesteps[1:].tolist()) - set(grid.tolist()), reverse=True)
    if off_grid:
        warnings.warn(f"custom timesteps {off_grid} are not on the distillation grid; the result may be unexpected",
                      stacklevel=3)
    if len(timesteps) > max_length:
        warnings.warn(f"{len(timesteps)} custom timesteps exceed the {max_length} of the distillation schedule; "
                      "the result may be unexpected", stacklevel=3)


# ---- the update ------------------------------------------------------------------------------------------------------
def consistency_scalings(timestep: int, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary-condition weights of the consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)``
    (Song et al. 2023, "Consistency Models", Sec. 3 / Appendix C; LCM Eq. 3), with ``s = t * timestep_scaling``:
    ``c_skip = sigma_data^2 / (s^2 + sigma_data^2)``, ``c_out = s / sqrt(s^2 + sigma_data^2)``, so f(x, 0) = x.
    float32 tensor arithmetic from an int64 timestep, as diffusers."""
    scaled = torch.as_tensor(timestep) * timestep_scaling  # int64 * float -> float32
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def renoise(sample: torch.Tensor, alpha_bar_ratio: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw from the forward process q(x_to | x_from) = N(sqrt(r) x_from, (1 - r) I) with ``r = abar_to / abar_from``
    (DDPM Eq. 4 between two noise levels): LCM Algorithm 1's re-noising (x_from = x0, r = abar_to) and TCD's
    strategic stochastic sampling (x_from = x_s)."""
    return alpha_bar_ratio**0.5 * sample + (1 - alpha_bar_ratio) ** 0.5 * noise


# ---- the scheduler ---------------------------------------------------------------------------------------------------
class LCMScheduler(StepIndexMixin):
    """diffusers' ``LCMScheduler``: same config keys, schedule, noise draws and numbers."""

    config_class = LCMSchedulerConfig
    order = 1

    def __init__(self, **kwargs: Any) -> None:
        config = self._init_alpha_bar_schedule(kwargs)
        self._check_original_steps(config.original_inference_steps, "original_inference_steps")
        check_range("timestep_scaling", config.timestep_scaling, 0, math.inf)
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.sigma_data = SIGMA_DATA
        T = config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.arange(0, T)[::-1].copy().astype(np.int64))
        self.custom_timesteps = False
        self._reset_step_index()

    def _check_original_steps(self, value: Any, option: str, upper: bool = True) -> int:
        T = self.config.num_train_timesteps
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{option} must be an int, got {value!r}")
        if value < 1 or (upper and value > T):
            bound = f"between 1 and num_train_timesteps={T}" if upper else "at least 1"
            raise ValueError(f"{option}={value} must be {bound}: it is the length of the distillation grid")
        return int(value)

    def _distillation_grid(self, original_inference_steps: int | None, strength: float) -> tuple[np.ndarray, int]:
        """The grid the schedule is taken from and the largest number of steps it allows."""
        option = "original_inference_steps"
        steps = self.config.original_inference_steps if original_inference_steps is None else original_inference_steps
        steps = self._check_original_steps(steps, option)
        return distillation_timesteps(self.config.num_train_timesteps, steps, strength), steps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """N skipping-step timesteps from the distillation grid, or the caller's descending ``timesteps``;
        ``strength`` < 1 (img2img) restricts the grid to its first ``int(original_steps * strength)`` points."""
        self._begin_run()
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps to set_timesteps()")
        check_range("strength", strength, 0, 1, high_closed=True)
        grid, max_steps = self._distillation_grid(original_inference_steps, strength)
        T = self.config.num_train_timesteps
        if timesteps is not None:
            if strength != 1.0:
                # diffusers cuts such a schedule to its tail but still counts the full length, so its last step
                # re-noises the output instead of returning it.
                raise ValueError(f"strength={strength} cannot be combined with custom timesteps; pass the timesteps "
                                 "you want to run (the tail of your schedule) with strength=1.0")
            chosen = check_custom_timesteps(timesteps, T)
            warn_about_custom_timesteps(chosen, grid, max_steps, T)
            self.custom_timesteps = True
        else:
            N = check_num_inference_steps(num_inference_steps, T)
            if N > max_steps:
                raise ValueError(f"num_inference_steps={N} cannot exceed original_inference_steps={max_steps}: the "
                                 "schedule is a subset of the distillation grid")
            if len(grid) < N:
                raise ValueError(f"num_inference_steps={N} exceeds the {len(grid)} grid points left by strength="
                                 f"{strength} (original steps x strength = {max_steps} x {strength}); use fewer steps "
                                 f"or strength >= {N / max_steps}")
            chosen = skipping_step_timesteps(grid, N)
            self.custom_timesteps = False
        self.num_inference_steps = len(chosen)
        self.timesteps = torch.from_numpy(chosen).to(device=device, dtype=torch.long)
        self._reset_step_index()

    def get_scalings_for_boundary_condition_discrete(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at ``timestep``; see :func:`consistency_scalings`."""
        return consistency_scalings(timestep, self.config.timestep_scaling)

    def _next_timestep(self, index: int, at_end: int) -> int:
        """The timestep after position ``index``, or ``at_end`` after the last one."""
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else at_end

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple:
        """Denoise with the consistency function, then (all but the last step) re-noise to the next timestep with
        ``randn_tensor(model_output.shape, generator)`` (LCM Algorithm 1)."""
        i = self._begin_step(model_output, timestep, sample)
        config = self.config
        t = check_timestep(timestep, config.num_train_timesteps)
        x0, _ = predicted_x0_and_eps(model_output, sample, self.alphas_cumprod[t], config.prediction_type)
        x0 = clip_or_threshold(x0, config)
        c_skip, c_out = consistency_scalings(t, config.timestep_scaling)
        denoised = c_out * x0 + c_skip * sample
        if i != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = renoise(denoised, self.alphas_cumprod[self._next_timestep(i, t)], noise)
        else:
            prev_sample = denoised
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """The next entry of ``timesteps`` after ``timestep`` (-1 after the last); t - 1 before set_timesteps."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return torch.as_tensor(timestep) - 1
        return torch.tensor(self._next_timestep(self.index_for_timestep(timestep), -1))
