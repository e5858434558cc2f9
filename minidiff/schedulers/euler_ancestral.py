"""Euler ancestral: an Euler step down to a lower noise level, then fresh noise back up to the next sigma, so each
step samples the reverse chain instead of following the deterministic ODE (k-diffusion ``sample_euler_ancestral``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.configuration import Config, check_choice
from minidiff.random import randn_tensor
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options, check_num_inference_steps
from minidiff.schedulers.sigmas import (
    SigmaSchedulerMixin,
    float_timesteps,
    interpolate_sigmas,
    reject_integer_timestep,
    sigma_predicted_x0,
    sigmas_from_alphas_cumprod,
    with_final_sigma,
)


@dataclass
class EulerAncestralDiscreteSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False


def ancestral_sigmas(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the move sigma_from -> sigma_to into a deterministic part down to ``sigma_down`` and fresh noise of
    scale ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_to^2`` and
    ``sigma_up = sigma_to * sqrt((sigma_from^2 - sigma_to^2) / sigma_from^2)``
    (k-diffusion ``get_ancestral_step`` with eta = 1), so ``sigma_down = sigma_to^2 / sigma_from``."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    square = sigma_to**2 - sigma_up**2
    # = sigma_to^4 / sigma_from^2; where float32 rounds the difference to <= 0 (huge sigma ranges), take that form
    sigma_down = torch.where(square > 0, square.clamp(min=0) ** 0.5, sigma_to**2 / sigma_from)
    return sigma_down, sigma_up


def euler_ancestral_update(sample, pred_original_sample, sigma, sigma_down, sigma_up, noise) -> torch.Tensor:
    """``x_next = x + (sigma_down - sigma) (x - x0) / sigma + sigma_up * z``, z ~ N(0, I)."""
    derivative = (sample - pred_original_sample) / sigma
    return sample + derivative * (sigma_down - sigma) + noise * sigma_up


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin):
    """Ancestral Euler sampler ("Euler a"), diffusers' ``EulerAncestralDiscreteScheduler``."""

    config_class = EulerAncestralDiscreteSchedulerConfig
    steps_training_schedule = True
    order = 1

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        check_common_options(config)
        # diffusers accepts "sample" here but raises NotImplementedError at the first step
        check_choice("prediction_type", config.prediction_type, ("epsilon", "v_prediction"))
        self._init_noise_schedule()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """N timesteps spaced per ``timestep_spacing``, sigmas interpolated at them, and a final sigma of 0."""
        config = self.config
        self._begin_run()
        N = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
        self.num_inference_steps = N
        timesteps = float_timesteps(config.timestep_spacing, config.num_train_timesteps, N, config.steps_offset)
        sigmas = interpolate_sigmas(timesteps, sigmas_from_alphas_cumprod(self.alphas_cumprod))
        self.sigmas = with_final_sigma(sigmas, 0.0)
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._reset_step_index()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral step; draws ``randn_tensor(model_output.shape, generator)`` every step (also the last, where
        sigma_up = 0), as diffusers does, so seeded runs agree. Works in float32."""
        reject_integer_timestep(f"{type(self).__name__}.step()", timestep, self.timesteps)
        i = self._begin_step(model_output, timestep, sample)
        sigma = self.sigmas[i]
        sample = sample.to(torch.float32)
        pred_original_sample = sigma_predicted_x0(model_output, sample, sigma, self.config.prediction_type)

        sigma_down, sigma_up = ancestral_sigmas(self.sigmas[i], self.sigmas[i + 1])
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = euler_ancestral_update(sample, pred_original_sample, sigma, sigma_down, sigma_up, noise)
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
