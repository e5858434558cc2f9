"""DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): ancestral sampling of the reverse chain.

Each step estimates x0 from the model output (DDPM Eq. 15), clips it, and samples x_{t-1} from the Gaussian
posterior q(x_{t-1} | x_t, x0) (Eqs. 6-7). Without ``set_timesteps`` the scheduler walks all T training steps
(t -> t-1, as in training-time sampling loops); after it, each step lands on the next entry of ``timesteps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.configuration import Config, check_choice
from minidiff.random import Generator, randn_tensor
from minidiff.schedulers.base import (
    SchedulerMixin,
    SchedulerOutput,
    as_int_timestep,
    check_in_schedule,
    check_same_shape,
    check_timestep,
)
from minidiff.schedulers.betas import (
    check_custom_timesteps,
    check_num_inference_steps,
    clip_or_threshold,
    integer_timesteps,
    predicted_x0_and_eps,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


@dataclass
class DDPMSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    variance_type: str | None = "fixed_small"  # None (a DPM-Solver config's value) acts as fixed_small, as in diffusers
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False


def posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor):
    """Mean of q(x_prev | x_t, x0) (DDPM Eq. 7):
    ``sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t``,
    with ``alpha_t = abar_t / abar_prev`` so that a step may skip training timesteps."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0_coeff = (alpha_bar_prev**0.5 * beta_t) / (1 - alpha_bar_t)
    x_t_coeff = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return x0_coeff * x0 + x_t_coeff * x_t


def posterior_std(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, variance_type: str,
                  predicted_variance: torch.Tensor | None = None) -> torch.Tensor:
    """Standard deviation of the noise added by a step.

    ``fixed_small``: the posterior variance ``(1 - abar_prev) / (1 - abar_t) beta_t`` (DDPM Eq. 7), floored at 1e-20;
    ``fixed_large``: ``beta_t`` (DDPM Sec. 3.2: both choices give similar samples); ``fixed_small_log`` goes through
    log space; ``learned``: the model predicts the variance; ``learned_range``: the model's v in [-1, 1] interpolates
    ``exp(v' log beta_t + (1 - v') log posterior_variance)`` with v' = (v + 1) / 2 (Nichol & Dhariwal 2021, Eq. 15).
    """
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t, min=1e-20)
    if variance_type == "fixed_small":
        return variance**0.5
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type in ("fixed_large", "fixed_large_log"):
        # fixed_large_log is GLIDE's log-variance log(beta_t), the same std; diffusers takes sqrt(log beta_t) there (NaN).
        return beta_t**0.5
    if variance_type == "learned":
        return predicted_variance**0.5
    fraction = (predicted_variance + 1) / 2
    log_variance = fraction * torch.log(beta_t) + (1 - fraction) * torch.log(variance)
    return torch.exp(0.5 * log_variance)


class DDPMScheduler(SchedulerMixin):
    """diffusers' ``DDPMScheduler``: same config keys, timesteps, noise draws and numbers."""

    config_class = DDPMSchedulerConfig
    steps_training_schedule = True

    def __init__(self, **kwargs: Any) -> None:
        config = self._init_alpha_bar_schedule(kwargs)
        check_choice("variance_type", config.variance_type, (*VARIANCE_TYPES, None))
        self.custom_timesteps = False
        self.timesteps = torch.arange(config.num_train_timesteps - 1, -1, -1)  # all T steps: training mode

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Sample in N steps (``timestep_spacing``, ``steps_offset``), or along a custom descending ``timesteps`` list."""
        config = self.config
        self._begin_run()
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps takes exactly one of num_inference_steps or timesteps (a descending list)")
        if timesteps is not None:
            chosen = check_custom_timesteps(timesteps, config.num_train_timesteps)
            self.custom_timesteps = True
        else:
            steps = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
            chosen = integer_timesteps(config.timestep_spacing, config.num_train_timesteps, steps, config.steps_offset)
            self.custom_timesteps = False
        self.num_inference_steps = len(chosen)
        self.timesteps = torch.from_numpy(chosen).to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """Where a step from ``timestep`` lands, as a 0-d tensor (as in diffusers): t - 1 in training mode, else the
        next entry of ``timesteps`` (-1 after the last one, meaning x0)."""
        t = as_int_timestep(timestep)
        if self.num_inference_steps is None:
            return torch.tensor(t - 1)
        check_in_schedule(t, self.timesteps)
        index = int((self.timesteps == t).nonzero()[0])
        return torch.tensor(int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1)

    def _get_variance(self, t: int, predicted_variance: torch.Tensor | None = None,
                      variance_type: str | None = None) -> torch.Tensor:
        """The variance of the noise that ``step`` adds at ``t`` (diffusers' name): ``posterior_std`` squared, for
        ``variance_type`` (default: the config's). diffusers' method returns its step's intermediate instead for
        the log types (a std or a log variance); the fixed and learned variances agree."""
        variance_type = (variance_type or self.config.variance_type) or "fixed_small"
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        prev_t = int(self.previous_timestep(t))
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        return posterior_std(self.alphas_cumprod[t], alpha_bar_prev, variance_type, predicted_variance) ** 2

    def _split_predicted_variance(self, model_output: torch.Tensor, sample: torch.Tensor):
        """With a learned variance the model outputs 2C channels: the mean part (eps, x0 or v) then the variance."""
        if self.config.variance_type not in LEARNED_VARIANCE_TYPES:
            check_same_shape("model_output", model_output, "sample", sample)
            return model_output, None
        channels = sample.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"variance_type={self.config.variance_type!r} needs a model output with 2 x {channels} channels "
                f"(prediction and variance), got shape {tuple(model_output.shape)} "
                f"for a sample of shape {tuple(sample.shape)}"
            )
        prediction, predicted_variance = torch.split(model_output, channels, dim=1)
        check_same_shape("model_output (prediction half)", prediction, "sample", sample)
        return prediction, predicted_variance

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_t -> x_prev: the posterior mean around the predicted x0 plus noise, except at t = 0
        (DDPM Algorithm 2, where z = 0 for the last step)."""
        config = self.config
        self._check_run_owner()
        t = check_timestep(timestep, config.num_train_timesteps)
        model_output, predicted_variance = self._split_predicted_variance(model_output, sample)
        prev_t = int(self.previous_timestep(t))
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)

        x0 = predicted_x0_and_eps(model_output, sample, alpha_bar_t, config.prediction_type)[0]
        x0 = clip_or_threshold(x0, config)
        prev_sample = posterior_mean(x0, sample, alpha_bar_t, alpha_bar_prev)
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            std = posterior_std(alpha_bar_t, alpha_bar_prev, config.variance_type or "fixed_small", predicted_variance)
            prev_sample = prev_sample + std * noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
