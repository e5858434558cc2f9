"""Euler: one Euler step of the probability-flow ODE ``dx/dsigma = (x - x0(x, sigma)) / sigma`` per noise level,
optionally with Karras et al.'s "churn" (Algorithm 2): add fresh noise to raise sigma to sigma_hat first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minidiff.configuration import Config, check_choice
from minidiff.random import randn_tensor
from minidiff.schedulers.base import SchedulerOutput, broadcast_to
from minidiff.schedulers.betas import check_common_options, check_custom_timesteps, check_num_inference_steps
from minidiff.schedulers.sigmas import (
    SigmaSchedulerMixin,
    check_custom_sigmas,
    check_schedule_arguments,
    float_timesteps,
    interpolate_sigmas,
    check_sigma_spacing,
    respaced_sigmas,
    reject_integer_timestep,
    sigma_predicted_x0,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    with_final_sigma,
)


@dataclass
class EulerDiscreteSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"


def euler_churn(sigma: torch.Tensor, s_churn: float, num_steps: int, s_tmin: float, s_tmax: float) -> float:
    """Karras et al. 2022, Algorithm 2, line 4: ``gamma = min(S_churn / N, sqrt(2) - 1)`` when
    ``S_tmin <= sigma <= S_tmax``, else 0. The step then starts from ``sigma_hat = (1 + gamma) sigma``."""
    return min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def euler_update(sample: torch.Tensor, pred_original_sample: torch.Tensor, sigma_hat, sigma_next) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2, lines 7-8:
    ``d = (x - x0) / sigma_hat``; ``x_next = x + (sigma_next - sigma_hat) d``."""
    derivative = (sample - pred_original_sample) / sigma_hat
    return sample + derivative * (sigma_next - sigma_hat)


class EulerDiscreteScheduler(SigmaSchedulerMixin):
    """Euler sampler on the sigma grid (diffusers' ``EulerDiscreteScheduler``, k-diffusion's ``sample_euler``)."""

    config_class = EulerDiscreteSchedulerConfig
    steps_training_schedule = True
    order = 1

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        check_common_options(config)
        check_choice("interpolation_type", config.interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_type", config.timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
        check_sigma_spacing(config)
        self._init_noise_schedule()
        if self._continuous_timesteps:
            self.timesteps = 0.25 * self.sigmas[:-1].log()

    @property
    def _continuous_timesteps(self) -> bool:
        """EDM-style v-prediction models (e.g. SVD) take ``t = log(sigma) / 4`` instead of a training step."""
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None) -> None:
        """N timesteps spaced per ``timestep_spacing``; sigmas interpolated at them (linearly, or evenly in log sigma
        for ``log_linear``), optionally replaced by Karras sigmas (Eq. 5); then the final sigma (0 or sigma_min).

        With ``log_linear`` the grid has N + 1 interpolated sigmas before the final one, as in diffusers, so the
        N steps end at the smallest training sigma rather than at 0. Instead of N: custom descending ``timesteps``
        (their sigmas interpolated as above), or custom ``sigmas`` including the final one (their timesteps found
        by ``sigma_to_t``), as in diffusers."""
        config = self.config
        self._begin_run()
        check_schedule_arguments(type(self).__name__, config, num_inference_steps, timesteps, sigmas, takes_sigmas=True)
        if timesteps is not None and self._continuous_timesteps:
            raise ValueError("custom timesteps cannot be combined with timestep_type='continuous' and v_prediction, "
                             "whose timesteps are log(sigma) / 4: pass sigmas= instead")
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        if sigmas is not None:
            self.sigmas = torch.from_numpy(check_custom_sigmas(sigmas))
            timesteps = sigma_to_t(self.sigmas[:-1].numpy(), np.log(train_sigmas))
            self.num_inference_steps = len(timesteps)
        else:
            if timesteps is None:
                N = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
                timesteps = float_timesteps(config.timestep_spacing, config.num_train_timesteps, N,
                                            config.steps_offset)
            else:
                timesteps = check_custom_timesteps(timesteps, config.num_train_timesteps, integers=False)
                N = len(timesteps)
            self.num_inference_steps = N
            if config.interpolation_type == "linear":
                run_sigmas = interpolate_sigmas(timesteps, train_sigmas)
            else:
                run_sigmas = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), N + 1).exp().numpy()
            respaced = respaced_sigmas(config, run_sigmas, N)
            if respaced is not None:
                run_sigmas, timesteps = respaced, sigma_to_t(respaced, np.log(train_sigmas))
            final_sigma = train_sigmas[0].item() if config.final_sigmas_type == "sigma_min" else 0.0
            self.sigmas = with_final_sigma(run_sigmas, final_sigma)
        if self._continuous_timesteps:
            self.timesteps = (0.25 * self.sigmas[:-1].log()).to(device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self._reset_step_index()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One step of Karras et al. 2022, Algorithm 2 without the second-order correction. With ``s_churn > 0``
        noise ``N(0, s_noise^2)`` lifts x from sigma to sigma_hat before the Euler step. Works in float32."""
        reject_integer_timestep(f"{type(self).__name__}.step()", timestep, self.timesteps)
        if not (0 <= s_churn < float("inf") and 0 <= s_noise < float("inf")):
            raise ValueError(f"s_churn={s_churn} and s_noise={s_noise} must be finite and >= 0")
        i = self._begin_step(model_output, timestep, sample)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]

        gamma = euler_churn(sigma, s_churn, len(self.sigmas) - 1, s_tmin, s_tmax)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:  # Algorithm 2, line 6: x_hat = x + sqrt(sigma_hat^2 - sigma^2) * eps
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        # diffusers evaluates x0 at sigma_hat for epsilon but at sigma for v-prediction
        x0_sigma = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        pred_original_sample = sigma_predicted_x0(model_output, sample, x0_sigma, self.config.prediction_type)
        prev_sample = euler_update(sample, pred_original_sample, sigma_hat, self.sigmas[i + 1]).to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(abar) eps - sqrt(1 - abar) x0`` as diffusers' Euler computes it: abar is read at each timestep's
        *position* in ``scheduler.timesteps`` (``alphas_cumprod[index]``), not at the timestep itself."""
        reject_integer_timestep(f"{type(self).__name__}.get_velocity()", timesteps, self.timesteps)
        schedule = self.timesteps.to(sample.device)
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        indices = [self.index_for_timestep(t, schedule) for t in timesteps]
        alpha_bar = self.alphas_cumprod.to(sample)[indices]
        return broadcast_to(alpha_bar**0.5, sample) * noise - broadcast_to((1 - alpha_bar) ** 0.5, sample) * sample
