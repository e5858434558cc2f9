"""DPM-Solver singlestep (Lu et al. 2022a "DPM-Solver", Algorithms 1-2; Lu et al. 2022b "DPM-Solver++",
Algorithm 1): a k-th order step from s to t evaluates the model at k - 1 intermediate points between them and
combines those outputs, all taken from the same starting sample. diffusers' ``DPMSolverSinglestepScheduler`` lays
the intermediate points on the inference grid itself: the timesteps are cut into groups of ``solver_order`` calls
(orders 1, 2, 3, 1, 2, 3, ...); the first call of a group caches its sample, and the k-th call finishes a k-th
order step from that cached sample to the next grid point. So every call moves the sample, and the last call of a
group has done a full DPM-Solver-k step over the whole group.

"dpmsolver++" (the default) integrates the data prediction x0 (DPM-Solver++(2S)/(3S)), "dpmsolver" the noise
prediction eps (DPM-Solver-2/3), "sde-dpmsolver++" the reverse SDE with fresh noise every call. A1111's
"DPM++ 2S a" is an ancestral sampler, not this one.

Differences from diffusers 0.42.1 (numbers agree; these are about the API):
- ``lower_order_final``: when the step count is not a multiple of ``solver_order`` or ``final_sigmas_type='zero'``,
  diffusers warns and rewrites ``lower_order_final=True`` into the config, where it stays for later
  ``set_timesteps`` calls. minidiff leaves the config alone and decides per ``set_timesteps`` (the same orders for
  that call; a later call with a step count that divides evenly follows the user's setting again).
- ``algorithm_type='dpmsolver'`` with ``thresholding=True`` fails inside diffusers' step (it indexes its
  per-timestep tables with None); minidiff rejects the combination at construction.
- A repeated noise level (more steps than usable training timesteps) or custom ``timesteps`` that are not strictly
  decreasing training timesteps raise ValueError instead of giving NaN steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from minidiff.configuration import Config, check_choice
from minidiff.random import randn_tensor
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options
from minidiff.schedulers.dpm_solver import (
    ALGORITHM_ALIASES,
    FIXED_VARIANCE_TYPES,
    SOLVER_TYPE_ALIASES,
    first_order_update,
)
from minidiff.schedulers.sigmas import check_supported_defaults
from minidiff.schedulers.vp_solver import VPSolverMixin, noise_level


@dataclass
class DPMSolverSinglestepSchedulerConfig(Config):
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
    lower_order_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    # diffusers' singlestep schedule is always linspace without offset (not config keys: nothing to save)
    timestep_spacing: ClassVar[str] = "linspace"
    steps_offset: ClassVar[int] = 0


ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


def get_order_list(num_steps: int, solver_order: int, lower_order_final: bool, final_sigmas_type: str) -> list[int]:
    """The order of each call: groups 1, 2, ..., solver_order, the last group cut short if the steps run out.
    Lower order at the end (``lower_order_final``, or forced when the steps do not divide into whole groups or the
    schedule ends at sigma = 0): a last call of full order drops to 1. Ending at sigma = 0 the last call is always
    first order (lambda = inf there)."""
    orders = [k % solver_order + 1 for k in range(num_steps)]
    lower = lower_order_final or num_steps % solver_order != 0 or final_sigmas_type == "zero"
    if (lower and orders[-1] == solver_order) or final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


def singlestep_second_order_update(algorithm: str, solver_type: str, sample, m0, m1, s0, s1, t, noise=None):
    """Second order from the group start s1 (where ``sample`` and the output m1 are) to t, with the output m0 at the
    intermediate point s0: ``D1 = (m0 - m1) / r0``, ``r0 = (lambda_s0 - lambda_s1) / h``, h = lambda_t - lambda_s1.
    "midpoint": DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1) / DPM-Solver-2 (Lu et al. 2022a, Algorithm 1),
    D1 weighted by half the D0 weight; "heun": the weight of the exactly integrated linear Taylor term. The SDE
    variant uses e^-2h and adds ``sigma_t sqrt(1 - e^-2h) z``. Summed in diffusers' order (fp32 rounding agrees)."""
    h, h_0 = t.lam - s1.lam, s0.lam - s1.lam
    r0 = h_0 / h
    D0, D1 = m1, (1.0 / r0) * (m0 - m1)
    if algorithm == "dpmsolver++":
        x = (t.sigma / s1.sigma) * sample - (t.alpha * (torch.exp(-h) - 1.0)) * D0
        if solver_type == "midpoint":
            return x - 0.5 * (t.alpha * (torch.exp(-h) - 1.0)) * D1
        return x + (t.alpha * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
    if algorithm == "dpmsolver":
        x = (t.alpha / s1.alpha) * sample - (t.sigma * (torch.exp(h) - 1.0)) * D0
        if solver_type == "midpoint":
            return x - 0.5 * (t.sigma * (torch.exp(h) - 1.0)) * D1
        return x - (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
    decay = t.alpha * (1 - torch.exp(-2.0 * h))
    d1_weight = 0.5 * decay if solver_type == "midpoint" else t.alpha * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
    return ((t.sigma / s1.sigma * torch.exp(-h)) * sample + decay * D0 + d1_weight * D1
            + t.sigma * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


def singlestep_third_order_update(algorithm: str, solver_type: str, sample, m0, m1, m2, s0, s1, s2, t, noise=None):
    """Third order from the group start s2 (``sample``, output m2) to t, with outputs m1 at s1 and m0 at s0:
    ``D1_0 = (m1 - m2) / r1``, ``D1_1 = (m0 - m2) / r0`` (r = lambda distance from s2 over h).
    "midpoint": DPM-Solver-3 / DPM-Solver++(3S) as in Lu et al. 2022a, Algorithm 2 (the final update uses only the
    slope to the second intermediate point, D1_1); "heun": D1 and D2, the first and second divided differences
    through all three outputs, each weighted by the exact integral of its Taylor term. The SDE variant uses e^-2h
    and adds ``sigma_t sqrt(1 - e^-2h) z``. Summed in diffusers' order (fp32 rounding agrees)."""
    h, h_0, h_1 = t.lam - s2.lam, s0.lam - s2.lam, s1.lam - s2.lam
    r0, r1 = h_0 / h, h_1 / h
    D0 = m2
    D1_0, D1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
    D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
    D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
    midpoint = solver_type == "midpoint"
    if algorithm == "dpmsolver++":
        x = (t.sigma / s2.sigma) * sample - (t.alpha * (torch.exp(-h) - 1.0)) * D0
        if midpoint:
            return x + (t.alpha * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1_1
        return (x + (t.alpha * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                - (t.alpha * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
    if algorithm == "dpmsolver":
        x = (t.alpha / s2.alpha) * sample - (t.sigma * (torch.exp(h) - 1.0)) * D0
        if midpoint:
            return x - (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0)) * D1_1
        return (x - (t.sigma * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
                - (t.sigma * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2)
    x = (t.sigma / s2.sigma * torch.exp(-h)) * sample + (t.alpha * (1.0 - torch.exp(-2.0 * h))) * D0
    d1_weight = t.alpha * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
    if midpoint:
        x = x + d1_weight * D1_1
    else:
        x = x + d1_weight * D1 + (t.alpha * ((1.0 - torch.exp(-2.0 * h) + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)) * D2
    return x + t.sigma * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise


class DPMSolverSinglestepScheduler(VPSolverMixin):
    """diffusers' ``DPMSolverSinglestepScheduler`` (DPM-Solver-2/3, DPM-Solver++(2S)/(3S), SDE-DPM-Solver++ single
    step). ``order`` is 1, as in diffusers: every call is one model evaluation and one move of the sample."""

    config_class = DPMSolverSinglestepSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        config.algorithm_type = ALGORITHM_ALIASES.get(config.algorithm_type, config.algorithm_type)
        config.solver_type = SOLVER_TYPE_ALIASES.get(config.solver_type, config.solver_type)
        check_common_options(config)
        check_choice("algorithm_type", config.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", config.solver_type, ("midpoint", "heun"))
        check_choice("solver_order", config.solver_order, (1, 2, 3))
        check_choice("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
        if config.algorithm_type == "dpmsolver" and config.final_sigmas_type == "zero":
            raise ValueError("final_sigmas_type='zero' needs algorithm_type='dpmsolver++' or 'sde-dpmsolver++' "
                             "(got 'dpmsolver'); use final_sigmas_type='sigma_min'")
        if config.algorithm_type == "dpmsolver" and config.thresholding:
            raise ValueError("thresholding=True with algorithm_type='dpmsolver' is not supported (diffusers' "
                             "singlestep scheduler fails on it); use algorithm_type='dpmsolver++' or "
                             "thresholding=False")
        if config.variance_type is not None and config.variance_type not in FIXED_VARIANCE_TYPES:
            raise ValueError(f"{type(self).__name__}: variance_type={config.variance_type!r} is not supported by "
                             f"minidiff; accepted: None or one of {FIXED_VARIANCE_TYPES} (no learned variance)")
        check_supported_defaults(type(self).__name__, config, dict(use_flow_sigmas=False, use_dynamic_shifting=False))
        self._init_solver()
        self.sample: torch.Tensor | None = None
        self.order_list: list[int] = []

    @property
    def _predicts_data(self) -> bool:
        return self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """The shared VP-solver schedule (linspace, :meth:`VPSolverMixin._solver_schedule`) or custom ``timesteps``
        (exactly one of the two), then the final sigma (0 or the smallest training sigma) and the order of each call
        (:func:`get_order_list`)."""
        config = self.config
        self._begin_run()
        steps, sigmas = self._solver_schedule(num_inference_steps, timesteps)
        final_sigma = self._smallest_training_sigma() if config.final_sigmas_type == "sigma_min" else 0.0
        self._store_schedule(steps, sigmas, final_sigma, device)
        self.order_list = get_order_list(len(steps), config.solver_order, config.lower_order_final,
                                         config.final_sigmas_type)
        self.sample = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One call of a singlestep group: order ``order_list[i]`` (lower while the history is too short, e.g.
        img2img starting mid-group). A first-order call caches ``sample`` as the group start; the k-th order call
        steps from that cached sample with the group's k outputs. "sde-dpmsolver++" draws
        ``randn_tensor(shape, generator, dtype=model_output.dtype)`` every call."""
        config = self.config
        i = self._begin_step(model_output, timestep, sample)
        s0, t = noise_level(self.sigmas[i]), noise_level(self.sigmas[i + 1])
        convert = self.data_prediction if self._predicts_data else self.noise_prediction
        converted = convert(model_output, sample, s0)
        self.model_outputs = self.model_outputs[1:] + [converted]
        noise = None
        if config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        order = self.order_list[i]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        m, algorithm = self.model_outputs, config.algorithm_type
        if order == 1:
            prev_sample = first_order_update(algorithm, self.sample, m[-1], s0, t, noise)
        elif order == 2:
            s1 = noise_level(self.sigmas[i - 1])
            prev_sample = singlestep_second_order_update(algorithm, config.solver_type, self.sample, m[-1], m[-2],
                                                         s0, s1, t, noise)
        else:
            s1, s2 = noise_level(self.sigmas[i - 1]), noise_level(self.sigmas[i - 2])
            prev_sample = singlestep_third_order_update(algorithm, config.solver_type, self.sample, m[-1], m[-2],
                                                        m[-3], s0, s1, s2, t, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        x0 = converted if self._predicts_data else (sample - s0.sigma * converted) / s0.alpha
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

