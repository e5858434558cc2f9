"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"): sampling a DDPM-trained model in N << T steps.

Each step estimates x0 and eps from the model output, then jumps from x_t to x_{t-T/N} along DDIM Eq. 12. ``eta``
scales the fresh noise: 0 gives the deterministic sampler, 1 the DDPM posterior variance (Eq. 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.configuration import Config
from minidiff.random import Generator, randn_tensor
from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput, check_same_shape, check_timestep
from minidiff.schedulers.betas import (
    check_num_inference_steps,
    clip_or_threshold,
    integer_timesteps,
    predicted_x0_and_eps,
)


@dataclass
class DDIMSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False


def ddim_variance(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """sigma_t^2 at eta = 1 (DDIM Eq. 16): ``(1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)``,
    the variance of the DDPM posterior q(x_prev | x_t, x0)."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: torch.Tensor, std: Any = 0.0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM Eq. 12: ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z``.

    The first term is the predicted x0 rescaled to the new noise level, the second the "direction pointing to x_t",
    the last fresh noise (left out when ``noise`` is None). With ``std = 0`` this is the deterministic map that
    DDIM inversion runs the other way."""
    direction = (1 - alpha_bar_prev - std**2) ** 0.5 * eps
    prev_sample = alpha_bar_prev**0.5 * x0 + direction
    if noise is not None:
        prev_sample = prev_sample + std * noise
    return prev_sample


class DDIMScheduler(SchedulerMixin):
    """diffusers' ``DDIMScheduler``: same config keys, timesteps, quirks and numbers."""

    config_class = DDIMSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        config = self._init_alpha_bar_schedule(kwargs)
        # alpha_bar "before" t = 0, used by the last step: 1 lands on a clean x0, else the first training alpha_bar.
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(config.num_train_timesteps - 1, -1, -1)  # T-1 ... 0 until set_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the N descending timesteps of the sampling run (``timestep_spacing``, ``steps_offset``)."""
        config = self.config
        self._begin_run()
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
        timesteps = integer_timesteps(
            config.timestep_spacing, config.num_train_timesteps, self.num_inference_steps, config.steps_offset
        )
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """sigma_t^2 at eta = 1 for the step timestep -> prev_timestep (diffusers' name; see ``ddim_variance``)."""
        alpha_bar_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return ddim_variance(self.alphas_cumprod[timestep], alpha_bar_prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generator = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_t -> x_{t - T//N}. ``variance_noise`` replaces the generator's draw (CycleDiffusion);
        ``use_clipped_model_output`` recomputes eps from the clipped x0."""
        self._check_step_args(model_output, sample)
        config = self.config
        t = check_timestep(timestep, config.num_train_timesteps)
        if not 0 <= eta < float("inf"):
            raise ValueError(f"eta={eta} must be >= 0 and finite (0: deterministic DDIM, 1: DDPM posterior variance)")
        # Kept from diffusers (huggingface/diffusers#12633): the step lands on t - T//N whatever the spacing, so with
        # "linspace"/"trailing" it need not be the next entry of self.timesteps.
        prev_t = t - config.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        x0, eps = predicted_x0_and_eps(model_output, sample, alpha_bar_t, config.prediction_type)
        x0 = clip_or_threshold(x0, config)
        std = eta * ddim_variance(alpha_bar_t, alpha_bar_prev) ** 0.5
        if eta > 1 and std**2 > 1 - alpha_bar_prev:  # Eq. 12's sqrt(1 - abar_prev - sigma_t^2) would be NaN
            raise ValueError(f"eta={eta} is too large for the step from timestep {t}: sigma_t^2 exceeds "
                             "1 - alpha_bar_prev (DDIM Eq. 12); use eta <= 1")
        if use_clipped_model_output:  # the eps that, with the clipped x0, reproduces x_t
            eps = predicted_x0_and_eps(x0, sample, alpha_bar_t, "sample")[1]

        noise = None
        if eta > 0:  # drawn at every step, the last one included, so generators advance as in diffusers
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise to step(), not both")
            if variance_noise is None:
                noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            else:
                check_same_shape("variance_noise", variance_noise, "sample", sample)
                noise = variance_noise
        prev_sample = ddim_update(x0, eps, alpha_bar_prev, std, noise)
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
