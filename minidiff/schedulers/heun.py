"""Heun's method on the sigma grid (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 1): an Euler step to the next noise level, then a second model call there and the step redone
with the average of the two slopes. Two model calls per step, except the last (to sigma = 0): one call and a plain
Euler step, as in Karras' algorithm (line 6) and diffusers, whose schedule ends on that step's first call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from minidiff.configuration import Config
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import BETA_SCHEDULES, check_common_options
from minidiff.schedulers.sigmas import check_sigma_spacing, sigma_predicted_x0, with_final_sigma
from minidiff.schedulers.two_stage import TwoStageSchedulerMixin, doubled, doubled_sigmas


@dataclass
class HeunDiscreteSchedulerConfig(Config):
    beta_schedules: ClassVar[tuple[str, ...]] = (*BETA_SCHEDULES, "exp")
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0


def heun_update(sample, slope_start, slope_end, dt) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1, line 8: ``x_next = x + dt (d_start + d_end) / 2``, the trapezoidal rule."""
    return sample + (slope_start + slope_end) / 2 * dt


class HeunDiscreteScheduler(TwoStageSchedulerMixin):
    """diffusers' ``HeunDiscreteScheduler`` (A1111 "Heun", k-diffusion ``sample_heun``)."""

    config_class = HeunDiscreteSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        check_common_options(config)
        check_sigma_spacing(config)
        self._init_noise_schedule()
        self.set_timesteps(config.num_train_timesteps)  # as diffusers: step() walks it until set_timesteps(N)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None) -> None:
        """The base schedule (or custom descending ``timesteps``, as in diffusers) with a final sigma of 0, each
        level after the first listed twice (one per call)."""
        self._begin_run()
        timesteps, sigmas, _ = self._base_schedule(num_inference_steps, timesteps)
        self.sigmas = doubled_sigmas(with_final_sigma(sigmas, 0.0))
        self.timesteps = doubled(torch.from_numpy(timesteps)).to(device=device, dtype=torch.float32)
        self.prev_derivative = self.dt = None
        self._reset_stage()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """First call: the Euler slope at sigma and a step to sigma_next (held, not final). Second call: the slope
        at sigma_next from the new model output, then the step redone from the held sample with the mean slope."""
        i = self._begin_step(model_output, timestep, sample)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = sigma_predicted_x0(model_output, sample, sigma if first else sigma_next, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            derivative = (sample - x0) / sigma  # Algorithm 1, line 4 (line 5: the Euler step below)
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            prev_sample = sample + derivative * self.dt
        else:
            derivative = (sample - x0) / sigma_next  # line 7, at the Euler step's end point
            prev_sample = heun_update(self.sample, self.prev_derivative, derivative, self.dt)
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
