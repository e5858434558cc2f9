"""DPM-Solver multistep (Lu et al. 2022a "DPM-Solver", 2022b "DPM-Solver++"): exact integration of the linear part
of the diffusion ODE in the half log-SNR ``lambda = log(alpha_t / sigma_t)``, with the model term approximated by
a polynomial through the current and previous model outputs (multistep: one model call per step).

DPM-Solver++ ("dpmsolver++", the Stable Diffusion default) integrates the data prediction x0; DPM-Solver
("dpmsolver") the noise prediction eps. The solver works on the VP chain ``x_t = alpha_t x0 + sigma_t eps``, so the
model input is not rescaled and the starting noise has unit scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from minidiff.configuration import Config, check_choice
from minidiff.schedulers.base import SchedulerOutput, check_same_shape
from minidiff.schedulers.betas import (
    check_common_options,
    check_num_inference_steps,
    integer_timesteps,
    threshold_sample,
)
from minidiff.schedulers.sigmas import (
    UNSUPPORTED_SIGMA_SPACINGS,
    SigmaSchedulerMixin,
    check_supported_defaults,
    interpolate_sigmas,
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    with_final_sigma,
)


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
# Names other multistep solvers use for the same thing; diffusers maps them so configs can be swapped.
ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def dpm_timesteps(config, num_inference_steps: int, last_timestep: int) -> np.ndarray:
    """N integer timesteps below ``last_timestep``: the spacing of N + 1 points with the final one (t = 0) dropped,
    except ``trailing``, which steps down from ``last_timestep`` by T / N."""
    if config.timestep_spacing == "trailing":
        step = config.num_train_timesteps / num_inference_steps
        return np.arange(last_timestep, 0, -step).round().astype(np.int64) - 1
    spacing, offset = config.timestep_spacing, config.steps_offset
    return integer_timesteps(spacing, last_timestep, num_inference_steps + 1, offset, beyond_last_ok=True)[:-1]


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


def first_order_update(algorithm: str, sample, m0, s0: NoiseLevel, t: NoiseLevel) -> torch.Tensor:
    """One step s -> t from the current model output, h = lambda_t - lambda_s.
    DPM-Solver++(1) (Lu et al. 2022b, = DDIM): ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0``;
    DPM-Solver-1 (Lu et al. 2022a): ``x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps``."""
    h = t.lam - s0.lam
    if algorithm == "dpmsolver++":
        return (t.sigma / s0.sigma) * sample - (t.alpha * (torch.exp(-h) - 1.0)) * m0
    return (t.alpha / s0.alpha) * sample - (t.sigma * (torch.exp(h) - 1.0)) * m0


def second_order_update(algorithm: str, solver_type: str, sample, m0, m1, s0, s1, t) -> torch.Tensor:
    """Multistep second order: the previous output m1 (at s1) gives the slope ``D1 = (m0 - m1) / r0`` with
    ``r0 = (lambda_s0 - lambda_s1) / h``. DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) with the "midpoint"
    weight 1/2 on D1, or the "heun" weight from exact integration of the linear term."""
    h, h_0 = t.lam - s0.lam, s0.lam - s1.lam
    r0 = h_0 / h
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    if algorithm == "dpmsolver++":
        x = (t.sigma / s0.sigma) * sample - (t.alpha * (torch.exp(-h) - 1.0)) * D0
        if solver_type == "midpoint":
            return x - 0.5 * (t.alpha * (torch.exp(-h) - 1.0)) * D1
        return x + (t.alpha * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
    x = (t.alpha / s0.alpha) * sample - (t.sigma * (torch.exp(h) - 1.0)) * D0
    if solver_type == "midpoint":
        return x - 0.5 * (t.sigma * (torch.exp(h) - 1.0)) * D1
    return x - (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0)) * D1


def third_order_update(algorithm: str, sample, m0, m1, m2, s0, s1, s2, t) -> torch.Tensor:
    """Multistep third order (DPM-Solver++(3M) / DPM-Solver-3 multistep): first and second divided differences
    D1, D2 of the last three outputs in lambda, each weighted by the exact integral of its Taylor term."""
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
    return (
        (t.alpha / s0.alpha) * sample
        - (t.sigma * (torch.exp(h) - 1.0)) * D0
        - (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        - (t.sigma * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
    )


class DPMSolverMultistepScheduler(SigmaSchedulerMixin):
    """diffusers' ``DPMSolverMultistepScheduler`` ("DPM++ 2M", "DPM++ 2M Karras" with ``use_karras_sigmas``)."""

    config_class = DPMSolverMultistepSchedulerConfig
    order = 1
    init_noise_sigma = 1.0  # VP chain: x_T ~ N(0, I)

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        config.algorithm_type = ALGORITHM_ALIASES.get(config.algorithm_type, config.algorithm_type)
        config.solver_type = SOLVER_TYPE_ALIASES.get(config.solver_type, config.solver_type)
        check_common_options(config)
        check_choice("algorithm_type", config.algorithm_type, ("dpmsolver++", "dpmsolver"))
        check_choice("solver_type", config.solver_type, ("midpoint", "heun"))
        check_choice("solver_order", config.solver_order, (1, 2, 3))
        check_choice("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
        if config.algorithm_type == "dpmsolver" and config.final_sigmas_type == "zero":
            raise ValueError(
                "final_sigmas_type='zero' needs algorithm_type='dpmsolver++'; use final_sigmas_type='sigma_min'"
            )
        # A DDPM config's fixed variance types mean "no learned variance" here too (diffusers ignores them);
        # a learned variance (extra output channels) is not implemented.
        if config.variance_type is not None and config.variance_type not in FIXED_VARIANCE_TYPES:
            raise ValueError(f"{type(self).__name__}: variance_type={config.variance_type!r} is not supported by "
                             f"minidiff; accepted: None or one of {FIXED_VARIANCE_TYPES} (no learned variance)")
        unsupported = dict(UNSUPPORTED_SIGMA_SPACINGS, use_lu_lambdas=False, use_flow_sigmas=False,
                           use_dynamic_shifting=False)
        check_supported_defaults(type(self).__name__, config, unsupported)
        self._init_noise_schedule()
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.model_outputs: list[torch.Tensor | None] = [None] * config.solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """N integer timesteps (spacing per config, ending above t = 0, below any ``lambda_min_clipped`` cut);
        sigmas interpolated at them, or Karras sigmas (Eq. 5) with rounded timesteps; then the final sigma."""
        config = self.config
        self._begin_run()
        N = check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), config.lambda_min_clipped))
        if clipped >= config.num_train_timesteps:
            raise ValueError(f"lambda_min_clipped={config.lambda_min_clipped} clips away every training timestep "
                             f"(the largest lambda is {float(self.lambda_t.max()):.4g}); use a smaller value")
        timesteps = dpm_timesteps(config, N, config.num_train_timesteps - clipped)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        if config.use_karras_sigmas:
            sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), N)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
        if np.any(np.diff(sigmas) >= 0):  # a repeated noise level: h = 0 and the multistep update divides by it
            raise ValueError(
                f"num_inference_steps={N} repeats a timestep (NaN steps, in diffusers too): DPM-Solver spaces N + 1 "
                f"points over the {config.num_train_timesteps - clipped} usable training timesteps "
                f"(num_train_timesteps={config.num_train_timesteps}, lambda_min_clipped={config.lambda_min_clipped}); "
                "use fewer steps or use_karras_sigmas=True"
            )
        final_sigma = train_sigmas[0].item() if config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = with_final_sigma(sigmas, final_sigma)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._reset_step_index()

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The solver works on x_t directly: the model input is not rescaled."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process in VP form: ``x_t = alpha_t x0 + sigma_t eps``."""
        check_same_shape("noise", noise, "original_samples", original_samples)
        level = noise_level(self._sigmas_for(timesteps, original_samples))
        return level.alpha * original_samples + level.sigma * noise

    def _convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor, s: NoiseLevel) -> torch.Tensor:
        """What the solver integrates: x0 for DPM-Solver++, eps for DPM-Solver, from ``x = alpha x0 + sigma eps``
        (v = alpha eps - sigma x0). Dynamic thresholding (Imagen, Sec. 2.3) clips the x0 estimate."""
        config = self.config
        if config.algorithm_type == "dpmsolver++":
            if config.prediction_type == "epsilon":
                x0 = (sample - s.sigma * model_output) / s.alpha
            elif config.prediction_type == "sample":
                x0 = model_output
            else:
                x0 = s.alpha * sample - s.sigma * model_output
            if config.thresholding:
                x0 = threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
            return x0
        if config.prediction_type == "epsilon":
            eps = model_output
        elif config.prediction_type == "sample":
            eps = (sample - s.alpha * model_output) / s.sigma
        else:
            eps = s.alpha * model_output + s.sigma * sample
        if config.thresholding:
            x0 = (sample - s.sigma * eps) / s.alpha
            x0 = threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
            eps = (sample - s.alpha * x0) / s.sigma
        return eps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep update of the chosen order; the first steps (no history yet) and, with
        ``lower_order_final`` and fewer than 15 steps, the last ones drop to lower order. ``generator`` is accepted
        for pipeline compatibility: these ODE solvers draw no noise. Works in float32."""
        config = self.config
        i = self._begin_step(model_output, timestep, sample)
        N = len(self.timesteps)
        final_first_order = i == N - 1 and (
            config.euler_at_final or (config.lower_order_final and N < 15) or config.final_sigmas_type == "zero"
        )
        final_second_order = i == N - 2 and config.lower_order_final and N < 15

        converted = self._convert_model_output(model_output, sample, noise_level(self.sigmas[i]))
        self.model_outputs = self.model_outputs[1:] + [converted]
        sample_f32 = sample.to(torch.float32)
        t, s0 = noise_level(self.sigmas[i + 1]), noise_level(self.sigmas[i])
        m = self.model_outputs
        if config.solver_order == 1 or self.lower_order_nums < 1 or final_first_order:
            prev_sample = first_order_update(config.algorithm_type, sample_f32, m[-1], s0, t)
        elif config.solver_order == 2 or self.lower_order_nums < 2 or final_second_order:
            s1 = noise_level(self.sigmas[i - 1])
            prev_sample = second_order_update(
                config.algorithm_type, config.solver_type, sample_f32, m[-1], m[-2], s0, s1, t
            )
        else:
            s1, s2 = noise_level(self.sigmas[i - 1]), noise_level(self.sigmas[i - 2])
            prev_sample = third_order_update(config.algorithm_type, sample_f32, m[-1], m[-2], m[-3], s0, s1, s2, t)
        self.lower_order_nums = min(self.lower_order_nums + 1, config.solver_order)
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)  # diffusers returns a 1-tuple here
        x0 = converted if config.algorithm_type == "dpmsolver++" else (sample - s0.sigma * converted) / s0.alpha
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
