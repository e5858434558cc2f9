"""K-LMS: the probability-flow ODE ``dx/dsigma = (x - x0(x, sigma)) / sigma`` (Karras et al. 2022, with
sigma(t) = t) solved by a linear multistep method: each step integrates the Lagrange polynomial through the last
(up to 4) derivatives over [sigma_i, sigma_{i+1}] (k-diffusion ``sample_lms``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.polynomial import Polynomial

from minidiff.configuration import Config
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options, check_num_inference_steps
from minidiff.schedulers.sigmas import (
    SigmaSchedulerMixin,
    float_timesteps,
    interpolate_sigmas,
    check_sigma_spacing,
    respaced_sigmas,
    sigma_predicted_x0,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    with_final_sigma,
)


@dataclass
class LMSDiscreteSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0


def lms_coefficients(sigmas: torch.Tensor, index: int, order: int) -> list[float]:
    """Linear multistep weights for the step sigma_i -> sigma_{i+1} from the derivatives at sigma_i, sigma_{i-1}, ...:
    ``c_k = integral over [sigma_i, sigma_{i+1}] of l_k``, with l_k the Lagrange basis polynomial through those
    ``order`` nodes that is 1 at sigma_{i-k}. l_k has degree order - 1 <= 3, so the integral is exact (in the
    variable tau - sigma_i, which keeps the polynomial well conditioned)."""
    origin = float(sigmas[index])
    nodes = [float(sigmas[index - j]) - origin for j in range(order)]
    width = float(sigmas[index + 1]) - origin
    coefficients = []
    for k in range(order):
        basis = Polynomial([1.0])  # l_k(tau) = prod_{j != k} (tau - s_j) / (s_k - s_j)
        for j, node in enumerate(nodes):
            if j != k:
                basis = basis * Polynomial([-node, 1.0]) / (nodes[k] - node)
        antiderivative = basis.integ()
        coefficients.append(float(antiderivative(width) - antiderivative(0.0)))
    return coefficients


def lms_update(sample: torch.Tensor, derivatives: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """``x_{i+1} = x_i + sum_k c_k d_{i-k}``, newest derivative first. ``zip`` stops at the shorter list, as in
    diffusers: a run started mid-schedule has fewer stored derivatives than the order its step index implies."""
    return sample + sum(c * d for c, d in zip(coefficients, reversed(derivatives)))


class LMSDiscreteScheduler(SigmaSchedulerMixin):
    """Linear multistep sampler on the sigma grid (diffusers' ``LMSDiscreteScheduler``, k-diffusion's K-LMS)."""

    config_class = LMSDiscreteSchedulerConfig
    order = 1

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        check_common_options(config)
        check_sigma_spacing(config)
        self._init_noise_schedule()
        self.derivatives: list[torch.Tensor] = []
        # as diffusers: set_timesteps(T) builds the full training schedule, which step() walks until set_timesteps(N)
        self.set_timesteps(config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """N timesteps spaced per ``timestep_spacing`` (fractional for linspace); sigmas interpolated at them, or
        Karras (Eq. 5), exponential or beta sigmas with their timesteps found by log-sigma interpolation; a final sigma of 0."""
        config = self.config
        self._begin_run()
        N = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
        self.num_inference_steps = N
        timesteps = float_timesteps(config.timestep_spacing, config.num_train_timesteps, N, config.steps_offset)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
        respaced = respaced_sigmas(config, sigmas, N)
        if respaced is not None:
            sigmas, timesteps = respaced, sigma_to_t(respaced, np.log(train_sigmas))
        self.sigmas = with_final_sigma(sigmas, 0.0)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.float32)
        self._reset_step_index()
        self.derivatives = []

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One LMS step: x0 from the model output, the ODE derivative ``d = (x - x0) / sigma``, then the multistep
        update over the last ``min(step_index + 1, order)`` derivatives."""
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order={order!r} must be a positive int (the number of derivatives LMS combines)")
        i = self._begin_step(model_output, timestep, sample)
        sigma = self.sigmas[i]
        pred_original_sample = sigma_predicted_x0(model_output, sample, sigma, self.config.prediction_type)

        self.derivatives.append((sample - pred_original_sample) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(i + 1, order)  # from the position, not from len(derivatives) (diffusers)
        prev_sample = lms_update(sample, self.derivatives, lms_coefficients(self.sigmas, i, order))

        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
