"""DPM-Solver multistep (Lu et al. 2022a "DPM-Solver", 2022b "DPM-Solver++"): exact integration of the linear part
of the diffusion ODE in the half log-SNR ``lambda = log(alpha_t / sigma_t)``, with the model term approximated by
a polynomial through the current and previous model outputs (multistep: one model call per step).

DPM-Solver++ ("dpmsolver++", the Stable Diffusion default, A1111's "DPM++ 2M") integrates the data prediction x0;
DPM-Solver ("dpmsolver") the noise prediction eps. Their SDE variants ("sde-dpmsolver++", A1111's "DPM++ 2M SDE";
"sde-dpmsolver") integrate the reverse SDE instead (Lu et al. 2022b, Appendix: SDE-DPM-Solver++), adding fresh noise
every step. The schedule and conversions are shared with the other VP solvers (vp_solver.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.configuration import Config, check_choice
from minidiff.random import randn_tensor
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options
from minidiff.schedulers.sigmas import check_supported_defaults
from minidiff.schedulers.vp_solver import NoiseLevel, VPSolverMixin, noise_level


@dataclass
class DPMSolverMultistepSchedulerConfig(Config):
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
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"


FIXED_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
# Names other multistep solvers use for the same thing; diffusers maps them so configs can be swapped.
ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def first_order_update(algorithm: str, sample, m0, s0: NoiseLevel, t: NoiseLevel, noise=None) -> torch.Tensor:
    """One step s -> t from the current model output, h = lambda_t - lambda_s.
    DPM-Solver++(1) (Lu et al. 2022b, = DDIM): ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0``;
    DPM-Solver-1 (Lu et al. 2022a): ``x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps``;
    SDE-DPM-Solver++(1): ``x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) x0 + sigma_t sqrt(1 - e^-2h) z``;
    SDE-DPM-Solver-1: ``x_t = (alpha_t / alpha_s) x_s - 2 sigma_t (e^h - 1) eps + sigma_t sqrt(e^2h - 1) z``."""
    h = t.lam - s0.lam
    if algorithm == "dpmsolver++":
        return (t.sigma / s0.sigma) * sample - (t.alpha * (torch.exp(-h) - 1.0)) * m0
    if algorithm == "dpmsolver":
        return (t.alpha / s0.alpha) * sample - (t.sigma * (torch.exp(h) - 1.0)) * m0
    if algorithm == "sde-dpmsolver++":
        return ((t.sigma / s0.sigma * torch.exp(-h)) * sample + (t.alpha * (1 - torch.exp(-2.0 * h))) * m0
                + t.sigma * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)
    return ((t.alpha / s0.alpha) * sample - 2.0 * (t.sigma * (torch.exp(h) - 1.0)) * m0
            + t.sigma * torch.sqrt(torch.exp(2 * h) - 1.0) * noise)


def second_order_update(algorithm: str, solver_type: str, sample, m0, m1, s0, s1, t, noise=None) -> torch.Tensor:
    """Multistep second order: the previous output m1 (at s1) gives the slope ``D1 = (m0 - m1) / r0`` with
    ``r0 = (lambda_s0 - lambda_s1) / h``. DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) with the "midpoint"
    weight on D1 (half the D0 weight), or the "heun" weight from exact integration of the linear Taylor term.
    The SDE variants double the eps terms (DPM-Solver) or use e^-2h (DPM-Solver++) and add
    ``sigma_t sqrt(...) z`` as in :func:`first_order_update`."""
    h, h_0 = t.lam - s0.lam, s0.lam - s1.lam
    r0 = h_0 / h
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    if algorithm == "dpmsolver++":
        x = (t.sigma / s0.sigma) * sample - (t.alpha * (torch.exp(-h) - 1.0)) * D0
        if solver_type == "midpoint":
            return x - 0.5 * (t.alpha * (torch.exp(-h) - 1.0)) * D1
        return x + (t.alpha * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
    if algorithm == "dpmsolver":
        x = (t.alpha / s0.alpha) * sample - (t.sigma * (torch.exp(h) - 1.0)) * D0
        if solver_type == "midpoint":
            return x - 0.5 * (t.sigma * (torch.exp(h) - 1.0)) * D1
        return x - (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
    # the SDE variants: summed in diffusers' order (x, D0, D1, noise), so rounding agrees
    if algorithm == "sde-dpmsolver++":
        decay = t.alpha * (1 - torch.exp(-2.0 * h))
        heun_weight = t.alpha * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        d1_weight = 0.5 * decay if solver_type == "midpoint" else heun_weight
        return ((t.sigma / s0.sigma * torch.exp(-h)) * sample + decay * D0 + d1_weight * D1
                + t.sigma * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)
    growth = t.sigma * (torch.exp(h) - 1.0)
    d1_weight = growth if solver_type == "midpoint" else 2.0 * (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0))
    return ((t.alpha / s0.alpha) * sample - 2.0 * growth * D0 - d1_weight * D1
            + t.sigma * torch.sqrt(torch.exp(2 * h) - 1.0) * noise)


def third_order_update(algorithm: str, sample, m0, m1, m2, s0, s1, s2, t, noise=None) -> torch.Tensor:
    """Multistep third order (DPM-Solver++(3M) / DPM-Solver-3 multistep / SDE-DPM-Solver++(3M)): first and second
    divided differences D1, D2 of the last three outputs in lambda, each weighted by the exact integral of its
    Taylor term."""
    h, h_0, h_1 = t.lam - s0.lam, s0.lam - s1.lam, s1.lam - s2.lam
    r0, r1 = h_0 / h, h_1 / h
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    if algorithm == "dpmsolver++":
        return (
            (t.sigma / s0.sigma) * sample
            - (t.alpha * (torch.exp(-h) - 1.0)) * D0
            + (t.alpha * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
            - (t.alpha * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
        )
    if algorithm == "dpmsolver":
        return (
            (t.alpha / s0.alpha) * sample
            - (t.sigma * (torch.exp(h) - 1.0)) * D0
            - (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            - (t.sigma * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
        )
    return (
        (t.sigma / s0.sigma * torch.exp(-h)) * sample
        + (t.alpha * (1.0 - torch.exp(-2.0 * h))) * D0
        + (t.alpha * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        + (t.alpha * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
        + t.sigma * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    )


class DPMSolverMultistepScheduler(VPSolverMixin):
    """diffusers' ``DPMSolverMultistepScheduler`` ("DPM++ 2M", "DPM++ 2M Karras" with ``use_karras_sigmas``,
    "DPM++ 2M SDE" with ``algorithm_type="sde-dpmsolver++"``)."""

    config_class = DPMSolverMultistepSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        config.algorithm_type = ALGORITHM_ALIASES.get(config.algorithm_type, config.algorithm_type)
        config.solver_type = SOLVER_TYPE_ALIASES.get(config.solver_type, config.solver_type)
        check_common_options(config)
        check_choice("algorithm_type", config.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", config.solver_type, ("midpoint", "heun"))
        check_choice("solver_order", config.solver_order, (1, 2, 3))
        check_choice("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
        if config.algorithm_type in ("dpmsolver", "sde-dpmsolver") and config.final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' needs algorithm_type='dpmsolver++' or 'sde-dpmsolver++' "
                             f"(got {config.algorithm_type!r}); use final_sigmas_type='sigma_min'")
        if config.algorithm_type == "sde-dpmsolver" and config.solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver' has no third-order update (diffusers fails on it too); "
                             "use solver_order 1 or 2, or algorithm_type='sde-dpmsolver++'")
        # A DDPM config's fixed variance types mean "no learned variance" here too (diffusers ignores them);
        # a learned variance (extra output channels) is not implemented.
        if config.variance_type is not None and config.variance_type not in FIXED_VARIANCE_TYPES:
            raise ValueError(f"{type(self).__name__}: variance_type={config.variance_type!r} is not supported by "
                             f"minidiff; accepted: None or one of {FIXED_VARIANCE_TYPES} (no learned variance)")
        unsupported = dict(use_flow_sigmas=False, use_dynamic_shifting=False)
        check_supported_defaults(type(self).__name__, config, unsupported)
        self.round_karras_timesteps = config.beta_schedule != "squaredcos_cap_v2"
        self._init_solver()

    @property
    def _predicts_data(self) -> bool:
        return self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """The shared VP-solver schedule (:meth:`VPSolverMixin._solver_schedule`; or custom descending integer
        ``timesteps``, as in diffusers), then the final sigma: 0 or the smallest training sigma
        (``final_sigmas_type``)."""
        config = self.config
        self._begin_run()
        timesteps, sigmas = self._solver_schedule(num_inference_steps, timesteps)
        final_sigma = self._smallest_training_sigma() if config.final_sigmas_type == "sigma_min" else 0.0
        self._store_schedule(timesteps, sigmas, final_sigma, device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep update of the chosen order; the first steps (no history yet) and, with
        ``lower_order_final`` and fewer than 15 steps, the last ones drop to lower order. The SDE variants draw
        ``randn_tensor(shape, generator, dtype=float32)`` every step (or take ``variance_noise``); the ODE variants
        draw nothing. Works in float32."""
        config = self.config
        i = self._begin_step(model_output, timestep, sample)
        N = len(self.timesteps)
        final_first_order = i == N - 1 and (
            config.euler_at_final or (config.lower_order_final and N < 15) or config.final_sigmas_type == "zero"
        )
        final_second_order = i == N - 2 and config.lower_order_final and N < 15

        s0, t = noise_level(self.sigmas[i]), noise_level(self.sigmas[i + 1])
        convert = self.data_prediction if self._predicts_data else self.noise_prediction
        converted = convert(model_output, sample, s0)
        self.model_outputs = self.model_outputs[1:] + [converted]
        sample_f32 = sample.to(torch.float32)
        noise = None
        if config.algorithm_type.startswith("sde-"):
            noise = (randn_tensor(model_output.shape, generator, model_output.device, torch.float32)
                     if variance_noise is None else variance_noise.to(model_output.device, torch.float32))
        m, algorithm = self.model_outputs, config.algorithm_type
        if config.solver_order == 1 or self.lower_order_nums < 1 or final_first_order:
            prev_sample = first_order_update(algorithm, sample_f32, m[-1], s0, t, noise)
        elif config.solver_order == 2 or self.lower_order_nums < 2 or final_second_order:
            s1 = noise_level(self.sigmas[i - 1])
            prev_sample = second_order_update(algorithm, config.solver_type, sample_f32, m[-1], m[-2], s0, s1, t, noise)
        else:
            s1, s2 = noise_level(self.sigmas[i - 1]), noise_level(self.sigmas[i - 2])
            prev_sample = third_order_update(algorithm, sample_f32, m[-1], m[-2], m[-3], s0, s1, s2, t, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, config.solver_order)
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)  # diffusers returns a 1-tuple here
        x0 = converted if self._predicts_data else (sample - s0.sigma * converted) / s0.alpha
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
