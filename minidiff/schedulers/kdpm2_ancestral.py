"""Ancestral DPM-Solver-2 (k-diffusion's ``sample_dpm_2_ancestral``): each move sigma -> sigma_next is split into a
deterministic DPM-Solver-2 step down to ``sigma_down`` (midpoint in log sigma between sigma and sigma_down) and
fresh noise of scale ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2`` (eta = 1). Two model calls per
step; the noise is drawn after the second."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.random import randn_tensor
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.euler_ancestral import ancestral_sigmas
from minidiff.schedulers.kdpm2 import (
    KDPM2DiscreteScheduler,
    KDPM2DiscreteSchedulerConfig,
    log_midpoints,
    midpoint_timesteps,
)
from minidiff.schedulers.sigmas import sigma_predicted_x0, with_final_sigma
from minidiff.schedulers.two_stage import doubled


@dataclass
class KDPM2AncestralDiscreteSchedulerConfig(KDPM2DiscreteSchedulerConfig):
    """The same options as KDPM2DiscreteScheduler."""


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """diffusers' ``KDPM2AncestralDiscreteScheduler`` (A1111 "DPM2 a", "DPM2 a Karras")."""

    config_class = KDPM2AncestralDiscreteSchedulerConfig

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The base schedule with a final 0; per level its ancestral split (sigma_up, sigma_down towards the next
        level) and the log-midpoint between the level and its sigma_down; all listed twice; the timesteps
        interleaved with the midpoints' timesteps."""
        self._begin_run()
        timesteps, sigmas, log_train_sigmas = self._base_schedule(num_inference_steps)
        sigmas = with_final_sigma(sigmas, 0.0)
        sigmas_next = sigmas.roll(-1)
        sigmas_next[-1] = 0.0
        sigmas_down, sigmas_up = ancestral_sigmas(sigmas, sigmas_next)
        sigmas_down[-1] = 0.0  # 0/0 at the final level
        midpoints = log_midpoints(sigmas, sigmas_down)  # midpoints[k]: between sigma_k and its sigma_down
        midpoints[-2:] = 0.0
        self.sigmas = torch.cat([doubled(sigmas), sigmas[-1:]])
        self.sigmas_interpol = torch.cat([doubled(midpoints), midpoints[-1:]])
        self.sigmas_up = torch.cat([doubled(sigmas_up), sigmas_up[-1:]])
        self.sigmas_down = torch.cat([doubled(sigmas_down), sigmas_down[-1:]])
        self.timesteps = midpoint_timesteps(torch.from_numpy(timesteps), midpoints, log_train_sigmas, 0).to(device)
        self._reset_stage()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """``x / sqrt(sigma^2 + 1)`` at the level of this call: the step's sigma, or its midpoint."""
        if self.step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        sigma = self.sigmas[self.step_index] if first else self.sigmas_interpol[self.step_index - 1]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """First call: Euler to the midpoint. Second call: the midpoint's slope carries the held sample down to
        sigma_down, then ``sigma_up * randn_tensor(shape, generator)`` is added."""
        i = self._begin_step(model_output, timestep, sample)
        first = self.state_in_first_order
        k = i if first else i - 1
        sigma, sigma_mid = self.sigmas[k], self.sigmas_interpol[k]
        sigma_up, sigma_down = self.sigmas_up[k], self.sigmas_down[i - 1]
        x0 = sigma_predicted_x0(model_output, sample, sigma if first else sigma_mid, self.config.prediction_type)
        if first:
            self.sample = sample
            prev_sample = sample + (sample - x0) / sigma * (sigma_mid - sigma)
        else:
            derivative = (sample - x0) / sigma_mid
            prev_sample = self.sample + derivative * (sigma_down - sigma)
            self.sample = None
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
