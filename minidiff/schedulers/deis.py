"""DEIS multistep (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"), the
log-rho variant diffusers implements: in ``rho = sigma_t / alpha_t`` the diffusion ODE reads
``d(x / alpha) = eps d rho``, so ``x_t / alpha_t = x_s / alpha_s + int_{rho_s}^{rho_t} eps(rho) d rho``. DEIS
extrapolates eps by the Lagrange polynomial in ``log rho`` through the last 1-3 noise predictions and integrates it
exactly (the paper's Eq. 15 with the log-rho time change; one model call per step).

Differences from DPM-Solver's schedule (vp_solver.py), as in diffusers: no ``lambda_min_clipped`` cut, and the
final sigma is the last respaced sigma repeated (Karras/exponential/beta; the last step then leaves x unchanged)
or else the smallest training sigma (no ``final_sigmas_type`` option). ``algorithm_type`` "dpmsolver"/"dpmsolver++"
and ``solver_type`` "midpoint"/"heun"/"bh1"/"bh2" are renamed to "deis"/"logrho" (configs swap between the
multistep solvers); anything else is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minidiff.configuration import Config, check_choice
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options
from minidiff.schedulers.dpm_solver import first_order_update
from minidiff.schedulers.sigmas import check_supported_defaults
from minidiff.schedulers.vp_solver import NoiseLevel, VPSolverMixin, noise_level


@dataclass
class DEISMultistepSchedulerConfig(Config):
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "deis"
    solver_type: str = "logrho"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"


# Names the other multistep solvers use; diffusers renames them so a config can be swapped between the solvers.
ALGORITHM_ALIASES = {"dpmsolver": "deis", "dpmsolver++": "deis"}
SOLVER_TYPE_ALIASES = {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"}


def _rho(level: NoiseLevel) -> torch.Tensor:
    return level.sigma / level.alpha


def _log(x: torch.Tensor) -> torch.Tensor:
    """numpy's float32 log of a (CPU, 0-d) noise level, as diffusers takes it: torch.log differs from it by an ulp
    for ~7% of inputs and the cancellation in the coefficients below amplifies that to ~1e-5 on the samples."""
    return torch.as_tensor(np.log(x.numpy()))


def second_order_update(sample, m0, m1, s0: NoiseLevel, s1: NoiseLevel, t: NoiseLevel) -> torch.Tensor:
    """DEIS-2 multistep, log-rho (Zhang & Chen 2023, Eq. 15 with ``tau = log rho``): eps is the line in log rho
    through (rho_s0, m0) and (rho_s1, m1); each Lagrange basis ``(log rho - log c) / (log b - log c)`` integrated
    in rho has the antiderivative ``F(rho; b, c) = rho (log rho - log c - 1) / (log b - log c)``, so
    ``x_t = alpha_t (x_s0 / alpha_s0 + [F]_{rho_s0}^{rho_t}(b=s0, c=s1) m0 + [F]_{rho_s0}^{rho_t}(b=s1, c=s0) m1)``."""
    rho_t, rho_s0, rho_s1 = _rho(t), _rho(s0), _rho(s1)

    def antiderivative(rho, b, c):
        return rho * (-_log(c) + _log(rho) - 1) / (_log(b) - _log(c))

    coef0 = antiderivative(rho_t, rho_s0, rho_s1) - antiderivative(rho_s0, rho_s0, rho_s1)
    coef1 = antiderivative(rho_t, rho_s1, rho_s0) - antiderivative(rho_s0, rho_s1, rho_s0)
    return t.alpha * (sample / s0.alpha + coef0 * m0 + coef1 * m1)


def third_order_update(sample, m0, m1, m2, s0: NoiseLevel, s1: NoiseLevel, s2: NoiseLevel,
                       t: NoiseLevel) -> torch.Tensor:
    """DEIS-3 multistep, log-rho (Zhang & Chen 2023, Eq. 15): the quadratic Lagrange basis in log rho through
    nodes b (its own), c, d, ``(L - log c)(L - log d) / ((log b - log c)(log b - log d))`` with ``L = log rho``,
    integrated exactly in rho: ``F = rho (log c (log d - L + 1) - log d L + log d + L^2 - 2 L + 2) / (...)``;
    ``x_t = alpha_t (x_s0 / alpha_s0 + sum_k [F_k]_{rho_s0}^{rho_t} m_k)``."""
    rho_t, rho_s0, rho_s1, rho_s2 = _rho(t), _rho(s0), _rho(s1), _rho(s2)

    def antiderivative(rho, b, c, d):
        log_rho, log_c, log_d = _log(rho), _log(c), _log(d)
        numerator = rho * (log_c * (log_d - log_rho + 1) - log_d * log_rho + log_d + log_rho**2 - 2 * log_rho + 2)
        return numerator / ((_log(b) - log_c) * (_log(b) - log_d))

    coef0 = antiderivative(rho_t, rho_s0, rho_s1, rho_s2) - antiderivative(rho_s0, rho_s0, rho_s1, rho_s2)
    coef1 = antiderivative(rho_t, rho_s1, rho_s2, rho_s0) - antiderivative(rho_s0, rho_s1, rho_s2, rho_s0)
    coef2 = antiderivative(rho_t, rho_s2, rho_s0, rho_s1) - antiderivative(rho_s0, rho_s2, rho_s0, rho_s1)
    return t.alpha * (sample / s0.alpha + coef0 * m0 + coef1 * m1 + coef2 * m2)


class DEISMultistepScheduler(VPSolverMixin):
    """diffusers' ``DEISMultistepScheduler`` (log-rho DEIS, orders 1-3; the first order is DDIM / DPM-Solver-1)."""

    config_class = DEISMultistepSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        config.algorithm_type = ALGORITHM_ALIASES.get(config.algorithm_type, config.algorithm_type)
        config.solver_type = SOLVER_TYPE_ALIASES.get(config.solver_type, config.solver_type)
        check_common_options(config)
        check_choice("algorithm_type", config.algorithm_type, ("deis",))
        check_choice("solver_type", config.solver_type, ("logrho",))
        check_choice("solver_order", config.solver_order, (1, 2, 3))
        unsupported = dict(use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False,
                           time_shift_type="exponential")
        check_supported_defaults(type(self).__name__, config, unsupported)
        self._init_solver()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The shared VP-solver schedule (:meth:`VPSolverMixin._solver_schedule`), then DEIS's final sigma: the last
        respaced sigma again, or the smallest training sigma."""
        config = self.config
        self._begin_run()
        timesteps, sigmas = self._solver_schedule(num_inference_steps)
        respaced = config.use_karras_sigmas or config.use_exponential_sigmas or config.use_beta_sigmas
        final_sigma = float(sigmas[-1]) if respaced else self._smallest_training_sigma()
        self._store_schedule(timesteps, sigmas, final_sigma, device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One DEIS multistep update; the first steps (no history yet) and, with ``lower_order_final`` and fewer
        than 15 steps, the last two drop to lower order. The solver integrates eps, recomputed from the (possibly
        thresholded) x0 as diffusers does. Computes in the sample's dtype, like diffusers."""
        config = self.config
        i = self._begin_step(model_output, timestep, sample)
        N = len(self.timesteps)
        final_first_order = i == N - 1 and config.lower_order_final and N < 15
        final_second_order = i == N - 2 and config.lower_order_final and N < 15

        s0, t = noise_level(self.sigmas[i]), noise_level(self.sigmas[i + 1])
        x0 = self.data_prediction(model_output, sample, s0)
        eps = (sample - s0.alpha * x0) / s0.sigma
        self.model_outputs = self.model_outputs[1:] + [eps]
        m = self.model_outputs
        if config.solver_order == 1 or self.lower_order_nums < 1 or final_first_order:
            prev_sample = first_order_update("dpmsolver", sample, m[-1], s0, t)
        elif config.solver_order == 2 or self.lower_order_nums < 2 or final_second_order:
            prev_sample = second_order_update(sample, m[-1], m[-2], s0, noise_level(self.sigmas[i - 1]), t)
        else:
            s1, s2 = noise_level(self.sigmas[i - 1]), noise_level(self.sigmas[i - 2])
            prev_sample = third_order_update(sample, m[-1], m[-2], m[-3], s0, s1, s2, t)
        self.lower_order_nums = min(self.lower_order_nums + 1, config.solver_order)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
