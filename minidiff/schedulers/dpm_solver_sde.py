"""DPM-Solver++(2S) with SDE noise on the sigma grid (A1111 "DPM++ SDE"; k-diffusion ``sample_dpmpp_sde`` with
eta = 1, r = 1/2; Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 1 made stochastic by ancestral noise). In ``t = -log sigma`` each step sigma -> sigma_next takes

1. a first-order DPM-Solver++ step from sigma to the midpoint ``sigma_mid = exp(-(t + t_next) / 2)``, split into a
   deterministic move down to ``sigma_down`` and Brownian noise of scale ``sigma_up`` (the ancestral split),
2. a second model call at sigma_mid, and the step redone from the held sample to sigma_next with the midpoint's x0
   (with r = 1/2 the 2S blend ``(1 - 1/(2r)) x0 + 1/(2r) x0_mid`` is x0_mid alone), again with ancestral noise.

The last step (to sigma = 0) is one Euler step. The noise comes from one Brownian path over [sigma_min, sigma_max]
(:mod:`minidiff.schedulers.brownian`, equal to the torchsde path diffusers draws), seeded by ``noise_sampler_seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minidiff.configuration import Config, check_choice
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options
from minidiff.schedulers.brownian import BrownianTreeNoiseSampler
from minidiff.schedulers.euler_ancestral import ancestral_sigmas
from minidiff.schedulers.sigmas import (
    check_sigma_spacing,
    sigma_predicted_x0,
    sigma_to_t,
    with_final_sigma,
)
from minidiff.schedulers.two_stage import TwoStageSchedulerMixin, doubled, doubled_sigmas


@dataclass
class DPMSolverSDESchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    noise_sampler_seed: int | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0


def log_sigma_midpoints(sigmas: np.ndarray) -> np.ndarray:
    """The midpoint of each step in ``t = -log sigma``: ``exp(-(t_k + (t_{k+1} - t_k) / 2))``, k = 0..N-2."""
    t = -np.log(sigmas)
    return np.exp(-(t[:-1] + np.diff(t) * 0.5))


def dpmpp_first_order_update(sample, pred_original_sample, t, t_down) -> torch.Tensor:
    """First-order DPM-Solver++ (Lu et al. 2022b, Eq. 9 with alpha = 1, i.e. DDIM in x0 form) from ``t`` to
    ``t_down`` (t = -log sigma): ``x' = (sigma_down / sigma) x - expm1(-(t_down - t)) x0``."""
    return (t_down.neg().exp() / t.neg().exp()) * sample - (t - t_down).expm1() * pred_original_sample


class DPMSolverSDEScheduler(TwoStageSchedulerMixin):
    """diffusers' ``DPMSolverSDEScheduler`` (A1111 "DPM++ SDE", "DPM++ SDE Karras")."""

    config_class = DPMSolverSDESchedulerConfig
    timestep_dtype = np.float64

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        check_common_options(config)
        # diffusers accepts "sample" here but raises NotImplementedError at the first step
        check_choice("prediction_type", config.prediction_type, ("epsilon", "v_prediction"))
        check_sigma_spacing(config)
        seed = config.noise_sampler_seed
        if seed is not None and seed < 0:
            raise ValueError(f"noise_sampler_seed={seed!r} must be None or an int >= 0 (the Brownian path's entropy)")
        self.noise_sampler_seed = seed
        self._init_noise_schedule()
        self.set_timesteps(config.num_train_timesteps)  # as diffusers: step() walks it until set_timesteps(N)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The base schedule (float64 timesteps, as diffusers) with a final sigma of 0, each level after the first
        listed twice; the second call of each step sits at the log-sigma midpoint's (fractional) timestep."""
        self._begin_run()
        timesteps, sigmas, log_train_sigmas = self._base_schedule(num_inference_steps)
        midpoint_t = sigma_to_t(log_sigma_midpoints(sigmas), log_train_sigmas)  # (N - 1,)
        timesteps = doubled(torch.from_numpy(timesteps))  # (2N - 1,): t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}
        timesteps[1::2] = torch.from_numpy(midpoint_t)
        self.timesteps = timesteps.to(device=device)
        self.sigmas = doubled_sigmas(with_final_sigma(sigmas, 0.0))
        self.mid_point_sigma = None
        self.noise_sampler = None
        self._reset_stage()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """``x / sqrt(sigma^2 + 1)`` at the level of this call: the step's sigma, or its midpoint."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index] if self.state_in_first_order else self.mid_point_sigma
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
    ) -> SchedulerOutput | tuple:
        """First call: DPM-Solver++ step with noise to the midpoint (held as the sample for the second call). Second
        call: x0 at the midpoint, and the step from the held sample to sigma_next with it. ``s_noise`` scales the
        noise. The Brownian path is built on the first call, shaped like ``sample``."""
        i = self._begin_step(model_output, timestep, sample)
        if self.noise_sampler is None:
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(sample, positive.min().item(), self.sigmas.max().item(),
                                                          self.noise_sampler_seed)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        t_mid = t + (t_next - t) * 0.5
        x0 = sigma_predicted_x0(model_output, sample, sigma if first else t_mid.neg().exp(),
                                self.config.prediction_type)
        if sigma_next == 0:  # the last step: Euler
            prev_sample = sample + (sample - x0) / sigma * (sigma_next - sigma)
        else:
            if first:
                t_next = t_mid
            else:
                sample = self.sample
            sigma_from, sigma_to = t.neg().exp(), t_next.neg().exp()
            sigma_down, sigma_up = ancestral_sigmas(sigma_from, sigma_to)
            sigma_up = torch.minimum(sigma_to, sigma_up)
            prev_sample = dpmpp_first_order_update(sample, x0, t, sigma_down.log().neg())
            prev_sample = prev_sample + self.noise_sampler(sigma_from, sigma_to) * s_noise * sigma_up
            self.sample, self.mid_point_sigma = (sample, sigma_to) if first else (None, None)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
