"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

The "transfer" phi (PNDM Eq. 9) moves x_t to x_{t-delta} given a noise estimate eps; it is DDIM's deterministic
step. PNDM feeds it better eps estimates, as classical ODE solvers would (Eqs. 12-13):

- pseudo Runge-Kutta (PRK): the first 3 steps take 4 model calls each, eps' = (e1 + 2 e2 + 2 e3 + e4) / 6;
- pseudo linear multi-step (PLMS): every later step takes 1 call and blends the last 4 eps with the 4th-order
  Adams-Bashforth weights (55, -59, 37, -9) / 24.

With ``skip_prk_steps=True`` (Stable Diffusion's default) PLMS starts at once: the first step is redone as a
pseudo improved-Euler (Heun) step, which is why the second timestep appears twice, then the history grows 2, 3, 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from minidiff.configuration import Config
from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput, check_in_schedule, check_timestep
from minidiff.schedulers.betas import (
    check_num_inference_steps,
    integer_timesteps,
    predicted_x0_and_eps,
)


@dataclass
class PNDMSchedulerConfig(Config):
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0


def pndm_transfer(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor):
    """The transfer phi(x_t, eps, t, t - delta) (PNDM Eq. 9):
    ``sqrt(abar_prev / abar_t) x_t - (abar_prev - abar_t) eps / d`` with
    ``d = abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev)``; algebraically DDIM's eta = 0 step.
    """
    sample_coeff = (alpha_bar_prev / alpha_bar_t) ** 0.5
    eps_denominator = (
        alpha_bar_t * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar_t * (1 - alpha_bar_t) * alpha_bar_prev) ** 0.5
    )
    return sample_coeff * x_t - (alpha_bar_prev - alpha_bar_t) * eps / eps_denominator


def runge_kutta_eps(stage_eps: list[torch.Tensor]) -> torch.Tensor:
    """The classical 4th-order Runge-Kutta weights (1, 2, 2, 1) / 6 over the 4 stage estimates (PNDM Eq. 12)."""
    e1, e2, e3, e4 = stage_eps
    return 1 / 6 * e1 + 1 / 3 * e2 + 1 / 3 * e3 + 1 / 6 * e4


def linear_multistep_eps(ets: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth blend of the last 1-4 eps, newest last (PNDM Eq. 13; orders 1-3 while the history fills)."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


class PNDMScheduler(SchedulerMixin):
    """diffusers' ``PNDMScheduler``: same config keys, timesteps (PRK then PLMS), state machine and numbers."""

    config_class = PNDMSchedulerConfig
    pndm_order = 4  # Runge-Kutta stages per PRK step, and the length of the PLMS history

    def __init__(self, **kwargs: Any) -> None:
        config = self._init_alpha_bar_schedule(kwargs)
        # alpha_bar "before" t = 0, used by a step that lands below 0 (1: clean x0).
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None
        self.timesteps = None
        self._reset_history()

    def _reset_history(self) -> None:
        self.counter = 0  # model calls consumed since set_timesteps
        self.ets: list[torch.Tensor] = []  # eps at the full steps so far (the PLMS history)
        self.cur_sample: torch.Tensor | None = None  # x at the start of the current PRK step / first PLMS step
        self._stage_eps: list[torch.Tensor] = []  # eps of the current PRK step's stages

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """PRK evaluation points for the first 3 steps (unless skipped), then the PLMS timesteps."""
        config = self.config
        self._begin_run()
        steps = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
        if not config.skip_prk_steps and steps < self.pndm_order:
            raise ValueError(
                f"num_inference_steps={steps} is too few for the Runge-Kutta start: with skip_prk_steps=False "
                f"`num_inference_steps` must be >= {self.pndm_order}"
            )
        self.num_inference_steps = steps
        descending = integer_timesteps(config.timestep_spacing, config.num_train_timesteps, steps, config.steps_offset)
        if config.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            # t_1, t_2, t_2, t_3, ...: the repeated t_2 is the Heun correction of the first step
            self.plms_timesteps = np.concatenate([descending[:2], descending[1:]])
        else:
            half = config.num_train_timesteps // steps // 2
            # per step t -> t_next of the first three: stages at t, t_next + half (twice), t_next
            pairs = zip(descending[:3], descending[1:4])
            self.prk_timesteps = np.array(
                [s for t, t_next in pairs for s in (t, t_next + half, t_next + half, t_next)], dtype=np.int64
            )
            self.plms_timesteps = descending[3:].copy()
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, self.plms_timesteps])).to(device)
        self._reset_history()

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One model call's worth of progress: a PRK stage during the first 3 steps, else a PLMS step."""
        self._check_step_args(model_output, sample)
        t = check_timestep(timestep, self.config.num_train_timesteps)
        check_in_schedule(t, self.timesteps)
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, t, sample, return_dict)
        return self.step_plms(model_output, t, sample, return_dict)

    def _transfer(self, sample: torch.Tensor, model_output: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """phi from t to t_prev, after turning a v-prediction into eps at (sample, t)."""
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        eps = predicted_x0_and_eps(model_output, sample, alpha_bar_t, self.config.prediction_type)[1]
        return pndm_transfer(sample, eps, alpha_bar_t, alpha_bar_prev)

    def step_prk(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True):
        """Stage ``counter % 4`` of a Runge-Kutta step from t to t - delta: stages 0-2 return the intermediate points
        phi(x_t, e_k, t, .) where the next model call happens; stage 3 returns phi(x_t, eps', t, t - delta)."""
        stage = self.counter % 4
        t_start = int(self.prk_timesteps[self.counter - stage])
        # Target as diffusers computes it: half a step below the given timestep at even stages, at it at odd ones.
        t_target = timestep - (self.config.num_train_timesteps // self.num_inference_steps // 2 if stage % 2 == 0 else 0)
        if stage == 0:
            self.cur_sample = sample
            self.ets.append(model_output)  # only the full-step estimate enters the PLMS history
            self._stage_eps = []
        self._stage_eps.append(model_output)
        eps = runge_kutta_eps(self._stage_eps) if stage == 3 else model_output
        prev_sample = self._transfer(self.cur_sample, eps, t_start, t_target)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_plms(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True):
        """A linear multi-step update from t to t - T//N; without PRK, the second call redoes the first step
        from the same x with the mean of its two eps (the repeated timestep)."""
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("step_plms needs the 3 Runge-Kutta steps first (skip_prk_steps=False): call step()")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        if self.counter == 1 and len(self.ets) == 1:
            eps = (model_output + self.ets[-1]) / 2
            t_start, t_target = timestep + stride, timestep
            sample, self.cur_sample = self.cur_sample, None
        else:
            if self.counter == 0:
                self.cur_sample = sample
            self.ets = [*self.ets[-3:], model_output]
            eps = linear_multistep_eps(self.ets)
            t_start, t_target = timestep, timestep - stride
        prev_sample = self._transfer(sample, eps, t_start, t_target)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
