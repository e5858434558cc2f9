"""What the exponential-integrator solvers share: DPM-Solver (multistep and singlestep), DEIS and UniPC.

They all work on the VP chain ``x_t = alpha_t x0 + sigma_t eps`` in the half log-SNR ``lambda_t = log(alpha_t /
sigma_t)``: the linear part of the diffusion ODE is integrated exactly and the model term is approximated by a
polynomial through recent model outputs (Lu et al. 2022a, Eq. 3.4). So the model input is not rescaled, the
starting noise has unit scale, and what differs between the solvers is only how they combine the stored outputs.

This module holds the schedule (integer timesteps, sigmas interpolated or respaced, the ``lambda_min_clipped`` cut),
the conversion of a model output to the x0 or eps the solver integrates, and the forward process in VP form.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from minidiff.schedulers.base import check_same_shape
from minidiff.schedulers.betas import (
    check_custom_timesteps,
    check_num_inference_steps,
    integer_timesteps,
    threshold_sample,
)
from minidiff.schedulers.sigmas import (
    SigmaSchedulerMixin,
    check_schedule_arguments,
    check_sigma_spacing,
    interpolate_sigmas,
    respaced_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    with_final_sigma,
)


class NoiseLevel(NamedTuple):
    """A point of the VP chain ``x_t = alpha_t x0 + sigma_t eps`` and its half log-SNR ``lambda_t``."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor


def noise_level(sigma: torch.Tensor) -> NoiseLevel:
    """From the sigma grid (``x = x0 + sigma eps``) to VP form: ``alpha_t = 1 / sqrt(sigma^2 + 1)``,
    ``sigma_t = sigma alpha_t``, ``lambda_t = log alpha_t - log sigma_t``."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    return NoiseLevel(alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t))


def solver_timesteps(config, num_inference_steps: int, last_timestep: int) -> np.ndarray:
    """N integer timesteps below ``last_timestep``: the spacing of N + 1 points with the final one (t = 0) dropped,
    except ``trailing``, which steps down from ``last_timestep`` by T / N."""
    spacing = getattr(config, "timestep_spacing", "linspace")
    if spacing == "trailing":
        step = config.num_train_timesteps / num_inference_steps
        return np.arange(last_timestep, 0, -step).round().astype(np.int64) - 1
    offset = getattr(config, "steps_offset", 0)
    return integer_timesteps(spacing, last_timestep, num_inference_steps + 1, offset, beyond_last_ok=True)[:-1]


class VPSolverMixin(SigmaSchedulerMixin):
    """Schedule, model-output conversion and forward process of the VP exponential-integrator solvers."""

    init_noise_sigma = 1.0  # VP chain: x_T ~ N(0, I)
    order = 1
    round_karras_timesteps = True  # diffusers rounds the timesteps of Karras sigmas (DPM multistep: not for cosine)

    def _init_solver(self) -> None:
        """After ``register_config`` and the option checks: the noise schedule, its VP coefficients per training
        step and an empty history."""
        check_sigma_spacing(self.config)
        self._init_noise_schedule()
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    # ---- the schedule ---------------------------------------------------------------------------------------------
    def _solver_schedule(self, num_inference_steps: int | None,
                         timesteps: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """N integer timesteps (spacing per config, ending above t = 0, below any ``lambda_min_clipped`` cut; or the
        custom ``timesteps``) and their sigmas: interpolated at them, or respaced (Karras, exponential, beta) with
        the timesteps found back by log-sigma interpolation. Returns (timesteps, sigmas) without the final sigma,
        which each solver chooses."""
        config = self.config
        check_schedule_arguments(type(self).__name__, config, num_inference_steps, timesteps, None)
        lambda_min = getattr(config, "lambda_min_clipped", -float("inf"))
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), lambda_min))
        if clipped >= config.num_train_timesteps:
            raise ValueError(f"lambda_min_clipped={lambda_min} clips away every training timestep "
                             f"(the largest lambda is {float(self.lambda_t.max()):.4g}); use a smaller value")
        if timesteps is None:
            N = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
            timesteps = solver_timesteps(config, N, config.num_train_timesteps - clipped)
        else:
            timesteps = check_custom_timesteps(timesteps, config.num_train_timesteps)
            N = len(timesteps)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sigmas = respaced_sigmas(config, train_sigmas[::-1], N)
        if sigmas is None:
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
        else:
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if (config.use_karras_sigmas and self.round_karras_timesteps) or getattr(config, "use_lu_lambdas", False):
                timesteps = timesteps.round()
        if np.any(np.diff(sigmas) >= 0):  # a repeated noise level: h = 0 and the multistep update divides by it
            raise ValueError(
                f"num_inference_steps={N} repeats a timestep (NaN steps, in diffusers too): {type(self).__name__} "
                f"spaces N + 1 points over the {config.num_train_timesteps - clipped} usable training timesteps "
                f"(num_train_timesteps={config.num_train_timesteps}, lambda_min_clipped={lambda_min}); "
                "use fewer steps or use_karras_sigmas=True"
            )
        return timesteps, sigmas

    def _smallest_training_sigma(self) -> float:
        """sigma at t = 0, ``sqrt((1 - abar_0) / abar_0)``: a final noise level the solvers can end on."""
        return (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()

    def _store_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, final_sigma: float, device) -> None:
        """Keep the run's schedule (int64 timesteps; float32 sigmas with the final level appended) and start with
        an empty history at the first step."""
        self.sigmas = with_final_sigma(sigmas, final_sigma)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()
        self._reset_step_index()

    # ---- model input and forward process ---------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The solver works on x_t directly: the model input is not rescaled."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process in VP form: ``x_t = alpha_t x0 + sigma_t eps``."""
        check_same_shape("noise", noise, "original_samples", original_samples)
        level = noise_level(self._sigmas_for(timesteps, original_samples))
        return level.alpha * original_samples + level.sigma * noise

    # ---- what the solver integrates --------------------------------------------------------------------------------
    def data_prediction(self, model_output: torch.Tensor, sample: torch.Tensor, s: NoiseLevel) -> torch.Tensor:
        """x0 from the model output via ``x = alpha x0 + sigma eps`` (and ``v = alpha eps - sigma x0``);
        dynamic thresholding (Imagen, Sec. 2.3) clips it if the config asks."""
        config = self.config
        if config.prediction_type == "epsilon":
            x0 = (sample - s.sigma * model_output) / s.alpha
        elif config.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = s.alpha * sample - s.sigma * model_output
        if config.thresholding:
            x0 = threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
        return x0

    def noise_prediction(self, model_output: torch.Tensor, sample: torch.Tensor, s: NoiseLevel) -> torch.Tensor:
        """eps from the model output; with thresholding, eps is recomputed from the thresholded x0."""
        config = self.config
        if config.prediction_type == "epsilon":
            eps = model_output
        elif config.prediction_type == "sample":
            eps = (sample - s.alpha * model_output) / s.sigma
        else:
            eps = s.alpha * model_output + s.sigma * sample
        if config.thresholding:
            x0 = threshold_sample((sample - s.sigma * eps) / s.alpha, config.dynamic_thresholding_ratio,
                                  config.sample_max_value)
            eps = (sample - s.alpha * x0) / s.sigma
        return eps
