"""DPM-Solver-2 on the sigma grid (k-diffusion's ``sample_dpm_2``; Lu et al. 2022a, "DPM-Solver", Algorithm 1 with
the midpoint in log sigma): an Euler step to the geometric midpoint ``sigma_mid = sqrt(sigma sigma_next)``, a second
model call there, and the whole step taken with the midpoint's slope. Two model calls per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minidiff.configuration import Config, check_choice
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options
from minidiff.schedulers.sigmas import check_sigma_spacing, sigma_predicted_x0, sigma_to_t, with_final_sigma
from minidiff.schedulers.two_stage import TwoStageSchedulerMixin, doubled


@dataclass
class KDPM2DiscreteSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0


def log_midpoints(sigmas: torch.Tensor, towards: torch.Tensor) -> torch.Tensor:
    """``exp((log a + log b) / 2)`` elementwise: the midpoint of each step in log sigma (``torch.lerp`` at 1/2)."""
    return sigmas.log().lerp(towards.log(), 0.5).exp()


def midpoint_timesteps(timesteps: torch.Tensor, midpoints: torch.Tensor, log_train_sigmas: np.ndarray,
                       first: int) -> torch.Tensor:
    """The schedule of the two-call loop: t_0, then for each step its midpoint's (fractional) timestep and the next
    level's timestep. ``midpoints[first:]`` are the midpoints in step order."""
    mid_t = torch.from_numpy(sigma_to_t(midpoints.numpy(), log_train_sigmas, in_float32=True)).to(timesteps.dtype)
    n = len(timesteps) - 1
    pairs = torch.stack((mid_t[first:first + n, None], timesteps[1:, None]), dim=-1).flatten()  # (N-1, 1, 2) -> flat
    return torch.cat([timesteps[:1], pairs])


class KDPM2DiscreteScheduler(TwoStageSchedulerMixin):
    """diffusers' ``KDPM2DiscreteScheduler`` (A1111 "DPM2", "DPM2 Karras")."""

    config_class = KDPM2DiscreteSchedulerConfig
    round_karras_timesteps = True

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        check_common_options(config)
        # diffusers accepts "sample" here but raises NotImplementedError at the first step
        check_choice("prediction_type", config.prediction_type, ("epsilon", "v_prediction"))
        check_sigma_spacing(config)
        self._init_noise_schedule()
        self.set_timesteps(config.num_train_timesteps)  # as diffusers: step() walks it until set_timesteps(N)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The base schedule with a final 0, its log-midpoints ``sigmas_interpol`` (each level with the one before),
        both listed twice, and the timesteps interleaved with the midpoints' timesteps."""
        self._begin_run()
        timesteps, sigmas, log_train_sigmas = self._base_schedule(num_inference_steps)
        sigmas = with_final_sigma(sigmas, 0.0)
        midpoints = log_midpoints(sigmas, sigmas.roll(1))  # midpoints[k]: between sigma_{k-1} and sigma_k
        self.sigmas = torch.cat([doubled(sigmas), sigmas[-1:]])
        self.sigmas_interpol = torch.cat([doubled(midpoints), midpoints[-1:]])
        self.timesteps = midpoint_timesteps(torch.from_numpy(timesteps), midpoints, log_train_sigmas, 1).to(device)
        self._reset_stage()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """``x / sqrt(sigma^2 + 1)`` at the level of this call: the step's sigma, or its midpoint."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index] if self.state_in_first_order else self.sigmas_interpol[self.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """First call: Euler to the midpoint with the slope at sigma. Second call: the slope at the midpoint, and
        the step from the held sample to sigma_next with it (``sample_dpm_2``, lines d_2 and x + d_2 dt)."""
        i = self._begin_step(model_output, timestep, sample)
        first = self.state_in_first_order
        if first:
            sigma, sigma_mid, sigma_next = self.sigmas[i], self.sigmas_interpol[i + 1], self.sigmas[i + 1]
        else:
            sigma, sigma_mid, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
        x0 = sigma_predicted_x0(model_output, sample, sigma if first else sigma_mid, self.config.prediction_type)
        if first:
            derivative, dt = (sample - x0) / sigma, sigma_mid - sigma
            self.sample = sample
        else:
            derivative, dt = (sample - x0) / sigma_mid, sigma_next - sigma
            sample, self.sample = self.sample, None
        self._step_index += 1
        prev_sample = sample + derivative * dt
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
