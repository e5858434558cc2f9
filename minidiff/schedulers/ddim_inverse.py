"""DDIM inversion: the deterministic DDIM map (Song et al. 2021, Eq. 12 with sigma = 0, an Euler step of the ODE of
Sec. 4.3) run from clean to noisy, so an image becomes the noise that DDIM sampling maps back to it.
Timesteps ascend; ``step(eps, t, x)`` moves x from t - T//N up to t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from minidiff.configuration import Config
from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput, check_timestep
from minidiff.schedulers.betas import (
    check_num_inference_steps,
    clip_or_threshold,
    integer_timesteps,
    predicted_x0_and_eps,
)
from minidiff.schedulers.ddim import ddim_update


@dataclass
class DDIMInverseSchedulerConfig(Config):
    timestep_spacings: ClassVar[tuple[str, ...]] = ("leading", "trailing")

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False


class DDIMInverseScheduler(SchedulerMixin):
    """diffusers' ``DDIMInverseScheduler``: same config keys, ascending timesteps and numbers."""

    config_class = DDIMInverseSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        config = self._init_alpha_bar_schedule(kwargs)
        # alpha_bar of the clean start (below the first timestep): 1, or the first training alpha_bar.
        self.initial_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(config.num_train_timesteps)  # 0 ... T-1 until set_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """DDIMScheduler's timesteps in ascending order."""
        config = self.config
        self._begin_run()
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
        descending = integer_timesteps(
            config.timestep_spacing, config.num_train_timesteps, self.num_inference_steps, config.steps_offset
        )
        self.timesteps = torch.from_numpy(descending[::-1].copy()).to(device)

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """x_{t - T//N} -> x_t, with the model output computed at ``timestep`` t (as inversion loops call it).
        ``pred_original_sample`` is the x0 estimate at the source level."""
        self._check_step_args(model_output, sample)
        config = self.config
        target_t = check_timestep(timestep, config.num_train_timesteps)
        source_t = target_t - config.num_train_timesteps // self.num_inference_steps
        alpha_bar_source = self.alphas_cumprod[source_t] if source_t >= 0 else self.initial_alpha_cumprod
        alpha_bar_target = self.alphas_cumprod[target_t]

        x0, eps = predicted_x0_and_eps(model_output, sample, alpha_bar_source, config.prediction_type)
        x0 = clip_or_threshold(x0, config)
        next_sample = ddim_update(x0, eps, alpha_bar_target)
        if not return_dict:
            return next_sample, x0
        return SchedulerOutput(prev_sample=next_sample, pred_original_sample=x0)
