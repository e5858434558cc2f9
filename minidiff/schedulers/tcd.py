"""Trajectory Consistency Distillation (Zheng et al. 2024, "Trajectory Consistency Distillation: Improved Latent
Consistency Distillation by Semi-Linear Consistency Function with Trajectory Mapping").

The TCD model maps x_t to any earlier point x_s of its trajectory, not only to x0. Its sampler, strategic
stochastic sampling (TCD, "Strategic Stochastic Sampling"), moves from t to ``s = floor((1 - gamma) * t_prev)``
below the next timestep t_prev with the model (a DDIM jump), then forward-diffuses back up to t_prev with fresh
noise. ``eta`` (gamma) sets the share of stochasticity: 0 is deterministic DDIM-like sampling,
1 jumps to x0 and re-noises (LCM's multistep sampling).

The schedule is LCM's (see :mod:`minidiff.schedulers.lcm`), except that an explicit ``original_inference_steps``
makes every training timestep eligible (diffusers' "customised option"). diffusers' TCD never clips or thresholds
x0 and ignores ``clip_sample`` and ``thresholding``; so does minidiff, with a warning, since another scheduler's
config (``TCDScheduler.from_config(ddpm.config)``) may carry them. ``timestep_scaling`` is a key it does not use.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minidiff.outputs import BaseOutput
from minidiff.random import Generator, randn_tensor
from minidiff.schedulers.base import check_timestep
from minidiff.schedulers.betas import check_range, predicted_x0_and_eps
from minidiff.schedulers.ddim import ddim_update
from minidiff.schedulers.lcm import LCMScheduler, LCMSchedulerConfig, renoise


@dataclass
class TCDSchedulerConfig(LCMSchedulerConfig):
    """The same keys and defaults as ``LCMSchedulerConfig`` (as in diffusers)."""


@dataclass
class TCDSchedulerOutput(BaseOutput):
    """``prev_sample`` is the input of the next step; ``pred_noised_sample`` the model's x_s at this step."""

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None


def strategic_timestep(prev_timestep: int, gamma: float) -> int:
    """The intermediate timestep of strategic stochastic sampling, ``s = floor((1 - gamma) * t_prev)``, computed in
    float32 on an int64 tensor as diffusers does (in float64 ``0.7 * 700`` floors to 489, in float32 to 490)."""
    return int(torch.floor((1 - gamma) * torch.tensor(prev_timestep)).to(torch.long))


class TCDScheduler(LCMScheduler):
    """diffusers' ``TCDScheduler``: LCM's schedule with strategic stochastic sampling in ``step``."""

    config_class = TCDSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        ignored = [option for option in ("clip_sample", "thresholding") if getattr(self.config, option)]
        if ignored:
            options = " and ".join(f"{option}=True" for option in ignored)
            warnings.warn(f"TCDScheduler ignores {options} (as diffusers' TCD does): its x0 is never clipped or "
                          "thresholded", stacklevel=2)

    def _distillation_grid(self, original_inference_steps: int | None, strength: float) -> tuple[np.ndarray, int]:
        """Without ``original_inference_steps``: LCM's grid. With it: every timestep below ``int(T * strength)``,
        from which at most ``original_inference_steps`` steps are taken."""
        if original_inference_steps is None:
            return super()._distillation_grid(None, strength)
        steps = self._check_original_steps(original_inference_steps, "original_inference_steps", upper=False)
        T = self.config.num_train_timesteps
        return np.arange(0, int(T * strength), dtype=np.int64), steps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.3,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> TCDSchedulerOutput | tuple:
        """x_t -> x_s with the model's x0 and eps (DDIM Eq. 12, sigma = 0), then, when ``eta`` > 0 and this is not
        the last step, forward noise from s up to the next timestep with ``randn_tensor(model_output.shape,
        generator)``. The last step ends at s = 0."""
        check_range("eta", eta, 0, 1, low_closed=True, high_closed=True)
        i = self._begin_step(model_output, timestep, sample)
        config = self.config
        t = check_timestep(timestep, config.num_train_timesteps)
        prev_t = self._next_timestep(i, 0)
        s = strategic_timestep(prev_t, eta)
        alpha_bar_prev, alpha_bar_s = self.alphas_cumprod[prev_t], self.alphas_cumprod[s]
        x0, eps = predicted_x0_and_eps(model_output, sample, self.alphas_cumprod[t], config.prediction_type)
        pred_noised_sample = ddim_update(x0, eps, alpha_bar_s)  # x_s
        if eta > 0 and i != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator, model_output.device, pred_noised_sample.dtype)
            prev_sample = renoise(pred_noised_sample, alpha_bar_prev / alpha_bar_s, noise)
        else:
            prev_sample = pred_noised_sample
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_noised_sample
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised_sample)
