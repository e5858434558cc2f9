"""What the two-evaluation samplers share (Heun, DPM2, DPM2 ancestral, DPM++ SDE): each step calls the model twice,
first at the step's noise level and then at a second point (the next level for Heun, a midpoint for DPM2), so the
schedule lists every timestep but the first twice and ``order = 2``. Between the two calls the scheduler holds the
step's starting sample; ``state_in_first_order`` says which call comes next.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.schedulers.betas import check_custom_timesteps, check_num_inference_steps
from minidiff.schedulers.sigmas import (
    SigmaSchedulerMixin,
    check_schedule_arguments,
    float_timesteps,
    interpolate_sigmas,
    respaced_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)


def doubled(values: torch.Tensor) -> torch.Tensor:
    """[v0, v1, v2, ...] -> [v0, v1, v1, v2, v2, ...]: every entry after the first, once per model call."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2)])


def doubled_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The sigma list with its final level (0) kept once: [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]."""
    return torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])


class TwoStageSchedulerMixin(SigmaSchedulerMixin):
    """The schedule and the between-calls state of the two-evaluation samplers."""

    order = 2
    round_karras_timesteps = False  # DPM2 rounds the timesteps of Karras sigmas, Heun does not (as diffusers)
    timestep_dtype = np.float32  # DPM++ SDE's are float64 (as diffusers), which also changes its sigmas' rounding
    sample: torch.Tensor | None = None  # the step's starting sample, held between its two calls

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a step's first model evaluation."""
        return self.sample is None

    def _base_schedule(self, num_inference_steps: int | None,
                       timesteps: list[float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """N float timesteps per ``timestep_spacing`` (or the custom ``timesteps``) and their sigmas (interpolated,
        or Karras / exponential / beta with the timesteps found back by log-sigma interpolation), plus the training
        log-sigmas."""
        config = self.config
        check_schedule_arguments(type(self).__name__, config, num_inference_steps, timesteps, None)
        if timesteps is None:
            N = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
            timesteps = float_timesteps(config.timestep_spacing, config.num_train_timesteps, N, config.steps_offset,
                                        self.timestep_dtype)
        else:
            timesteps = check_custom_timesteps(timesteps, config.num_train_timesteps, integers=False)
            timesteps = timesteps.astype(np.float32)
            N = len(timesteps)
        self.num_inference_steps = N
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        log_train_sigmas = np.log(train_sigmas)
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
        respaced = respaced_sigmas(config, sigmas, N)
        if respaced is not None:
            sigmas, timesteps = respaced, sigma_to_t(respaced, log_train_sigmas)
            if config.use_karras_sigmas and self.round_karras_timesteps:
                timesteps = timesteps.round()
        return timesteps, sigmas, log_train_sigmas

    def _reset_stage(self) -> None:
        self.sample = None
        self._reset_step_index()
