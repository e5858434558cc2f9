"""UniPC multistep (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"; A1111's "UniPC"): a multistep exponential integrator in the half log-SNR ``lambda`` (as
DPM-Solver), whose predictor UniP-p extrapolates the model term from the last p outputs, plus a corrector UniC-p
that, once the model has been called at the new point, redoes the step just taken with that output included. The
corrector needs no extra model call, so one step costs one call and reaches order p + 1.

``step`` therefore does, in this order (diffusers' order, so the float32 rounding agrees): convert the model output
(x0 with ``predict_x0``, else eps); correct the sample the previous step produced (UniC, skipped on the first step
and where ``disable_corrector`` lists the previous step's index); then predict the next sample from the corrected
one (UniP). B(h), the function the paper's coefficients are normalised by, is ``h`` ("bh1") or ``e^h - 1`` ("bh2").

Schedule: the shared VP-solver schedule (vp_solver.py; UniPC has no ``lambda_min_clipped``). As in diffusers, the
final sigma for ``final_sigmas_type="sigma_min"`` is the smallest training sigma on the interpolated grid, but the
last respaced sigma repeated on a Karras/exponential/beta grid (the last step then leaves x unchanged); the
timesteps of Karras sigmas are always rounded (also for the cosine schedule), exponential/beta ones truncated.

Configurations on which diffusers' last step is NaN (or its linear solve fails) are refused at construction, see
:func:`check_final_step`. ``thresholding`` acts on x0 only (diffusers ignores it with ``predict_x0=False``; minidiff
refuses that combination). ``solver_p`` (another scheduler as predictor) and the flow-matching options are not
implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from minidiff.configuration import Config, check_choice
from minidiff.schedulers.base import SchedulerOutput
from minidiff.schedulers.betas import check_common_options
from minidiff.schedulers.sigmas import SIGMA_SPACINGS, check_supported_defaults
from minidiff.schedulers.vp_solver import NoiseLevel, VPSolverMixin, noise_level


@dataclass
class UniPCMultistepSchedulerConfig(Config):
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
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: list[int] = field(default_factory=list)
    solver_p: Any = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None


# The other multistep solvers' names for their second-order rules; diffusers maps them so configs can be swapped.
SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


def check_final_step(config) -> None:
    """Refuse the configurations whose last step diffusers turns into NaN. Landing on sigma = 0 (lambda = inf)
    is finite only for the x0 form with B(h) = e^h - 1 and a first-order last step; landing on a repeated
    respaced sigma (h = 0) makes the third-order rho system singular."""
    last_order = 1 if config.lower_order_final else config.solver_order
    respaced = any(getattr(config, option, False) for option in SIGMA_SPACINGS)
    problem = None
    if config.final_sigmas_type == "zero":
        if not config.predict_x0:
            problem = "predict_x0=False (the eps form multiplies sigma_t = 0 by e^h - 1 = inf)"
        elif config.solver_type == "bh1":
            problem = "solver_type='bh1' (B(h) = h is infinite there)"
        elif last_order > 1:
            problem = f"lower_order_final=False and solver_order={config.solver_order} (the last step's r_k = 0)"
        fix = "use final_sigmas_type='sigma_min'"
    elif respaced and last_order == 3:
        problem = "lower_order_final=False and solver_order=3 on a respaced grid (the last step has h = 0)"
        fix = "use lower_order_final=True or solver_order <= 2"
    if problem is not None:
        raise ValueError(f"UniPCMultistepScheduler: final_sigmas_type={config.final_sigmas_type!r} with {problem} "
                         f"gives a NaN last step (in diffusers too); {fix}")


def bh_coefficients(m0, previous, s0: NoiseLevel, t: NoiseLevel, order: int, predict_x0: bool, solver_type: str):
    """What UniP and UniC share (Zhao et al. 2023, Algorithms 2 and 3, B(h) variant): ``h = lambda_t - lambda_s0``
    (negated for the x0 form), ``r_k = (lambda_sk - lambda_s0) / h`` and the scaled differences
    ``D_k = (m_k - m0) / r_k`` of the earlier outputs ``previous = [(m_1, s_1), ...]`` (newest first), the order-p
    system ``R rho = b`` with ``R[i, k] = r_k^i`` (r_p = 1) and ``b_i = i! phi_{i+1}(h) / B(h)`` where
    ``phi_1(h) = (e^h - 1) / h``, ``phi_{k+1}(h) = (phi_k(h) - 1/k!) / h``; B(h) = h ("bh1") or e^h - 1 ("bh2").
    Returns (e^h - 1, B(h), R, b, D stacked as (B, K, C, ...) or None)."""
    h = t.lam - s0.lam
    rks, differences = [], []
    for mi, si in previous[: order - 1]:
        rk = (si.lam - s0.lam) / h
        rks.append(rk)
        differences.append((mi - m0) / rk)
    rks = torch.stack(rks + [torch.ones((), device=m0.device)])  # (p,)
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    R, b, factorial = [], [], 1
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    D = torch.stack(differences, dim=1) if differences else None  # K x (B, C, ...) -> (B, K, C, ...)
    return h_phi_1, B_h, torch.stack(R), torch.stack(b), D


def exponential_base(x, m0, s0: NoiseLevel, t: NoiseLevel, h_phi_1, predict_x0: bool):
    """The first-order part both share (DPM-Solver-1 / DPM-Solver++(1), i.e. DDIM) and the scale of the B(h) term:
    x0 form ``(sigma_t / sigma_s0) x - alpha_t (e^-h - 1) x0``, eps form ``(alpha_t / alpha_s0) x - sigma_t (e^h - 1)
    eps``."""
    if predict_x0:
        return t.sigma / s0.sigma * x - t.alpha * h_phi_1 * m0, t.alpha
    return t.alpha / s0.alpha * x - t.sigma * h_phi_1 * m0, t.sigma


def multistep_uni_p_bh_update(sample, outputs, levels, t: NoiseLevel, order: int, predict_x0: bool,
                              solver_type: str) -> torch.Tensor:
    """UniP-p (Zhao et al. 2023, Algorithm 2, B(h) version): from x at ``levels[0]`` to t with the converted
    outputs ``outputs`` (newest first) at ``levels``: ``x_t = base - scale B(h) sum_k rho_k D_k`` with rho solving the
    first p - 1 rows of the system of :func:`bh_coefficients` (order 2: rho = [0.5], order 1: no correction term)."""
    m0, s0 = outputs[0], levels[0]
    h_phi_1, B_h, R, b, D = bh_coefficients(m0, list(zip(outputs[1:], levels[1:])), s0, t, order, predict_x0,
                                            solver_type)
    x_t, scale = exponential_base(sample, m0, s0, t, h_phi_1, predict_x0)
    if D is not None:
        if order == 2:
            rhos = torch.ones(1, dtype=sample.dtype, device=sample.device) * 0.5
        else:
            rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(sample.device).to(sample.dtype)  # (p - 1,)
        x_t = x_t - scale * B_h * torch.einsum("k,bkc...->bc...", rhos, D)  # sum_k rho_k D_k: (B, C, ...)
    return x_t.to(sample.dtype)


def multistep_uni_c_bh_update(last_sample, this_output, outputs, levels, t: NoiseLevel, order: int,
                              predict_x0: bool, solver_type: str) -> torch.Tensor:
    """UniC-p (Zhao et al. 2023, Algorithm 3, B(h) version): redo the step ``levels[0]`` -> t from ``last_sample``
    with the new output ``this_output`` at t as one more difference ``D_t = m_t - m0`` (r = 1):
    ``x_t^c = base - scale B(h) (sum_k rho_k D_k + rho_p D_t)``, rho solving the full order-p system
    (order 1: rho = [0.5])."""
    m0, s0 = outputs[0], levels[0]
    h_phi_1, B_h, R, b, D = bh_coefficients(m0, list(zip(outputs[1:], levels[1:])), s0, t, order, predict_x0,
                                            solver_type)
    x_t, scale = exponential_base(last_sample, m0, s0, t, h_phi_1, predict_x0)
    if order == 1:
        rhos = torch.ones(1, dtype=last_sample.dtype, device=last_sample.device) * 0.5
    else:
        rhos = torch.linalg.solve(R, b).to(last_sample.device).to(last_sample.dtype)  # (p,)
    correction = rhos[-1] * (this_output - m0)
    if D is not None:
        correction = torch.einsum("k,bkc...->bc...", rhos[:-1], D) + correction  # (B, C, ...)
    return (x_t - scale * B_h * correction).to(last_sample.dtype)


class UniPCMultistepScheduler(VPSolverMixin):
    """diffusers' ``UniPCMultistepScheduler`` (A1111 "UniPC"; "UniPC Karras" etc. with the sigma spacings)."""

    config_class = UniPCMultistepSchedulerConfig

    def __init__(self, **kwargs: Any) -> None:
        config = self.register_config(kwargs)
        config.solver_type = SOLVER_TYPE_ALIASES.get(config.solver_type, config.solver_type)
        check_common_options(config)
        check_choice("solver_type", config.solver_type, ("bh1", "bh2"))
        check_choice("solver_order", config.solver_order, (1, 2, 3))
        check_choice("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
        if config.solver_p is not None:
            raise ValueError(f"UniPCMultistepScheduler: solver_p={config.solver_p!r} is not supported by minidiff "
                             "(only None: UniP is the predictor)")
        negative = [index for index in config.disable_corrector if index < 0]
        if negative:
            raise ValueError(f"disable_corrector={config.disable_corrector!r} holds negative step indices {negative}; "
                             "it lists the steps (0 = first) whose result the corrector leaves as it is")
        if config.thresholding and not config.predict_x0:
            raise ValueError("thresholding=True needs predict_x0=True: it clips the x0 prediction, and with "
                             "predict_x0=False diffusers silently ignores it")
        check_final_step(config)
        unsupported = dict(use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False,
                           time_shift_type="exponential", shift_terminal=None)
        check_supported_defaults(type(self).__name__, config, unsupported)
        self._init_solver()

    @property
    def predict_x0(self) -> bool:
        return self.config.predict_x0

    @property
    def disable_corrector(self) -> list[int]:
        return self.config.disable_corrector

    @property
    def solver_p(self) -> None:
        return None

    def _reset_history(self) -> None:
        super()._reset_history()
        self.last_sample: torch.Tensor | None = None  # the sample the last predictor started from (UniC redoes it)
        self.this_order = 0  # the order of the last predictor step

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The shared VP-solver schedule (:meth:`VPSolverMixin._solver_schedule`), then the final sigma: 0, or for
        ``sigma_min`` the last respaced sigma (Karras/exponential/beta) or else the smallest training sigma."""
        config = self.config
        self._begin_run()
        timesteps, sigmas = self._solver_schedule(num_inference_steps)
        if config.final_sigmas_type == "zero":
            final_sigma = 0.0
        elif any(getattr(config, option, False) for option in SIGMA_SPACINGS):
            final_sigma = sigmas[-1]
        else:
            final_sigma = self._smallest_training_sigma()
        self._store_schedule(timesteps, sigmas, final_sigma, device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Correct the sample the previous step produced (UniC, with this output), then predict the next one (UniP)
        with order ``solver_order``, lower on the first steps and, with ``lower_order_final``, on the last ones.
        Computes in the sample's dtype, as diffusers does."""
        config = self.config
        i = self._begin_step(model_output, timestep, sample)
        s = noise_level(self.sigmas[i])
        convert = self.data_prediction if config.predict_x0 else self.noise_prediction
        converted = convert(model_output, sample, s)
        x = sample
        if i > 0 and i - 1 not in config.disable_corrector and self.last_sample is not None:
            levels = [noise_level(self.sigmas[i - 1 - k]) for k in range(self.this_order)]
            x = multistep_uni_c_bh_update(self.last_sample, converted, self.model_outputs[::-1], levels, s,
                                          self.this_order, config.predict_x0, config.solver_type)
        self.model_outputs = self.model_outputs[1:] + [converted]
        order = min(config.solver_order, len(self.timesteps) - i) if config.lower_order_final else config.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: as many outputs as there are
        self.last_sample = x
        levels = [noise_level(self.sigmas[i - k]) for k in range(self.this_order)]
        prev_sample = multistep_uni_p_bh_update(x, self.model_outputs[::-1], levels, noise_level(self.sigmas[i + 1]),
                                                self.this_order, config.predict_x0, config.solver_type)
        self.lower_order_nums = min(self.lower_order_nums + 1, config.solver_order)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)  # diffusers returns a 1-tuple here
        x0 = converted if config.predict_x0 else (sample - s.sigma * converted) / s.alpha
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
