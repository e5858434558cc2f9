"""Noise levels and the step-index machine shared by the sigma schedulers (LMS, Euler, Euler ancestral, DPM-Solver).

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") rewrite the DDPM chain
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` divided by ``sqrt(abar_t)`` as ``x = x_0 + sigma_t eps`` with

    sigma_t = sqrt((1 - abar_t) / abar_t).

A sampler then walks a decreasing list of noise levels ``sigmas[0] > sigmas[1] > ... > sigmas[N] = 0``; the model,
trained on the DDPM scale, sees ``x / sqrt(sigma^2 + 1)`` and the matching (fractional) training timestep.

Sampling loops pass timesteps, but these schedulers work by position: on the first ``scale_model_input``/``step``
the position (``step_index``) is found from the timestep, or taken from ``set_begin_index`` (img2img starts
mid-schedule), and every ``step`` advances it by one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from minidiff.schedulers.base import StepIndexMixin, broadcast_to, check_same_shape
from minidiff.schedulers.betas import integer_timesteps, make_betas


# ---- schedules (numpy, with the dtypes diffusers uses so the numbers agree to the last bit) -------------------------
def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for every training step t (increasing in t), float32."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def float_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int,
                    dtype=np.float32) -> np.ndarray:
    """Descending float timesteps (float32 unless ``dtype`` says otherwise). ``linspace`` keeps fractional values
    (999, 979.6122, ...); ``leading`` and ``trailing`` are the integer grids of :func:`integer_timesteps`
    (Lin et al. 2023, Table 2)."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=dtype)[::-1].copy()
    timesteps = integer_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset, beyond_last_ok=True)
    return timesteps.astype(dtype)


def interpolate_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """sigma at (fractional) timesteps, linear between neighbouring training steps (float64)."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5, i = 0..N-1 (steps crowd towards low noise):
    ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``."""
    ramp = np.linspace(0, 1, num_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def lu_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """DPM-Solver's uniform-lambda spacing (Lu et al. 2022, "DPM-Solver", Sec. 3.3; lambda = -log sigma here):
    log sigma stepped evenly from log sigma_max to log sigma_min, written as diffusers' ramp (on float32 logs of
    the float32 training sigmas) for its exact floats."""
    log_min, log_max = (float(np.log(np.float32(sigma))) for sigma in (sigma_min, sigma_max))
    return np.exp(log_max + np.linspace(0, 1, num_steps) * (log_min - log_max))


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """N noise levels evenly spaced in log sigma from sigma_max down to sigma_min (k-diffusion's
    ``get_sigmas_exponential``)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def regularized_incomplete_beta(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """``I_x(a, b)``, the CDF of Beta(a, b), from its continued fraction (Abramowitz & Stegun 26.5.8), evaluated
    with the modified Lentz method. The fraction converges fast for ``x < (a + 1) / (a + b + 2)``; above that the
    symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` is used."""
    x = np.asarray(x, dtype=np.float64)
    flip = x > (a + 1) / (a + b + 2)
    x_, a_, b_ = np.where(flip, 1 - x, x), np.where(flip, b, a), np.where(flip, a, b)
    tiny = 1e-300
    # d_1 = -(a + b) x / (a + 1); then for m >= 1 the even and odd terms of A&S 26.5.8
    c, d = np.ones_like(x_), 1 - (a_ + b_) * x_ / (a_ + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    fraction = d.copy()
    for m in range(1, 200):
        for term in (m * (b_ - m) * x_ / ((a_ + 2 * m - 1) * (a_ + 2 * m)),
                     -(a_ + m) * (a_ + b_ + m) * x_ / ((a_ + 2 * m) * (a_ + 2 * m + 1))):
            d = 1 + term * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + term / np.where(np.abs(c) < tiny, tiny, c)
            fraction *= c * d
        if np.all(np.abs(c * d - 1) < 1e-16):
            break
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    with np.errstate(divide="ignore"):
        front = np.exp(a_ * np.log(x_) + b_ * np.log1p(-x_) - log_beta) / a_
    value = front * fraction
    return np.where(flip, 1 - value, value)


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The quantile function of Beta(a, b): the x with ``I_x(a, b) = q``, by bisection (the CDF is increasing)
    to float64 resolution; exact at q = 0 and 1."""
    q = np.asarray(q, dtype=np.float64)
    low, high = np.zeros_like(q), np.ones_like(q)
    for _ in range(64):
        middle = (low + high) / 2
        below = regularized_incomplete_beta(middle, a, b) < q
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (low + high) / 2))


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6):
    """Lee et al. 2024, "Beta Sampling is All You Need": noise levels at the Beta(alpha, beta) quantiles of an even
    grid, ``sigma_i = sigma_min + ppf(1 - i / (N - 1)) (sigma_max - sigma_min)``, dense at both ends."""
    quantiles = beta_ppf(1 - np.linspace(0, 1, num_steps), alpha, beta)
    return sigma_min + quantiles * (sigma_max - sigma_min)


SIGMA_SPACINGS = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")


def check_sigma_spacing(config: Any) -> None:
    """Karras, exponential and beta spacings each replace the whole sigma grid: at most one may be on."""
    chosen = [option for option in SIGMA_SPACINGS if getattr(config, option, False)]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(f'{option}=True' for option in chosen)} contradict each other: each "
                         f"replaces the whole noise schedule; set at most one of {', '.join(SIGMA_SPACINGS)}")


def check_schedule_arguments(owner: str, config: Any, num_inference_steps: Any, timesteps: Any, sigmas: Any = None,
                             takes_sigmas: bool = False) -> None:
    """``set_timesteps`` takes exactly one of a step count, custom ``timesteps`` or (``takes_sigmas``: Euler)
    custom ``sigmas`` (diffusers' rules); custom timesteps keep their noise levels, so a respacing option (Karras,
    ...) cannot apply to them."""
    given = [name for name, value in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if value is not None]
    if len(given) != 1:
        options = "num_inference_steps, timesteps (descending training timesteps) or sigmas (descending noise " \
                  "levels, the last one the final)" if takes_sigmas else \
                  "num_inference_steps or timesteps (descending training timesteps)"
        raise ValueError(f"{owner}.set_timesteps takes exactly one of {options}; got {', '.join(given) or 'none'}")
    respacing = [option for option in SIGMA_SPACINGS if getattr(config, option, False)]
    if timesteps is not None and respacing:
        raise ValueError(f"custom timesteps cannot be combined with {respacing[0]}=True, which replaces the noise "
                         "levels: pass sigmas=, or a config without it")


def check_custom_sigmas(sigmas: Any) -> np.ndarray:
    """A user's ``set_timesteps(sigmas=...)``: at least two finite, non-negative, descending noise levels (the last
    is where the final step lands: 0, or sigma_min repeated), as float32."""
    shown = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
    values = np.asarray(shown, dtype=np.float64) if all(isinstance(v, (int, float)) for v in shown) else None
    if values is None or values.ndim != 1 or len(values) < 2 or not np.all(np.isfinite(values)) or values.min() < 0 \
            or np.any(values[1:] > values[:-1]):
        raise ValueError(f"custom sigmas must be at least two finite, non-negative, descending noise levels "
                         f"(the last one the final, e.g. 0), got {shown}")
    return values.astype(np.float32)


def respaced_sigmas(config: Any, sigmas: np.ndarray, num_steps: int) -> np.ndarray | None:
    """The N sigmas of the spacing the config turns on (Karras Eq. 5 with rho = 7, exponential or beta), between
    ``config.sigma_min``/``sigma_max`` where the scheduler has them and else the ends of the descending ``sigmas``;
    None when the config keeps the interpolated grid."""
    sigma_min = getattr(config, "sigma_min", None)
    sigma_max = getattr(config, "sigma_max", None)
    sigma_min = float(sigmas[-1]) if sigma_min is None else sigma_min
    sigma_max = float(sigmas[0]) if sigma_max is None else sigma_max
    if getattr(config, "use_karras_sigmas", False):
        return karras_sigmas(sigma_min, sigma_max, num_steps)
    if getattr(config, "use_lu_lambdas", False):
        return lu_sigmas(sigma_min, sigma_max, num_steps)
    if getattr(config, "use_exponential_sigmas", False):
        return exponential_sigmas(sigma_min, sigma_max, num_steps)
    if getattr(config, "use_beta_sigmas", False):
        return beta_sigmas(sigma_min, sigma_max, num_steps)
    return None


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray, in_float32: bool = False) -> np.ndarray:
    """Invert sigma(t): the fractional training timestep whose noise level is each sigma, interpolating linearly in
    log sigma between the two training steps that bracket it (k-diffusion's ``sigma_to_t``). The last blend is
    float64 unless ``in_float32`` (diffusers' DPM2 runs it on float32 tensors)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # (S,)
    distances = log_sigma - log_train_sigmas[:, np.newaxis]  # (T, 1) against (S,) -> (T, S)
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)  # last step below
    high = low + 1
    weight = np.clip((log_train_sigmas[low] - log_sigma) / (log_train_sigmas[low] - log_train_sigmas[high]), 0, 1)
    if in_float32:
        low, high = low.astype(np.float32), high.astype(np.float32)
    return (1 - weight) * low + weight * high


def with_final_sigma(sigmas: np.ndarray, final_sigma: float) -> torch.Tensor:
    """Append the noise level the last step lands on (0, or sigma_min) and store as float32."""
    return torch.from_numpy(np.concatenate([sigmas, [final_sigma]]).astype(np.float32))


def sigma_predicted_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, prediction_type: str):
    """x0 from the model output when ``x = x0 + sigma eps``: ``x - sigma eps``; for v-prediction
    ``-sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1)`` (Karras et al. 2022, Table 1: c_out, c_skip)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    return model_output  # "sample": the model predicts x0 itself


def check_supported_defaults(owner: str, config: Any, defaults: dict[str, Any]) -> None:
    """Options diffusers has and minidiff does not implement must keep their default value."""
    for option, default in defaults.items():
        value = getattr(config, option)
        if value != default:
            raise ValueError(f"{owner}: {option}={value!r} is not supported by minidiff; only {default!r} is")


def reject_integer_timestep(method: str, timestep: Any, schedule: torch.Tensor) -> None:
    """Euler schedules hold float timesteps: an int is almost always a loop index from ``enumerate(timesteps)``."""
    if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        raise ValueError(
            f"{method} got the integer timestep {timestep!r}; pass the timestep itself (a float from "
            f"scheduler.timesteps, e.g. {float(schedule[0])}), not its index from enumerate(scheduler.timesteps)"
        )


# ---- the shared scheduler machinery ---------------------------------------------------------------------------------
class SigmaSchedulerMixin(StepIndexMixin):
    """Noise schedule plus step-index machine for schedulers that step along ``sigmas`` by position."""

    sigmas: torch.Tensor

    def _init_noise_schedule(self) -> None:
        """betas -> alphas_cumprod (float32) -> training sigmas. Before ``set_timesteps`` the schedule is the whole
        training chain (timesteps T-1..0, sigmas decreasing to 0), so ``add_noise`` works for training."""
        config = self.config
        self.betas = make_betas(config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if getattr(config, "rescale_betas_zero_snr", False):
            # Zero terminal SNR makes abar_T = 0 and sigma_T infinite; keep it finite (fp16's smallest subnormal).
            self.alphas_cumprod[-1] = 2**-24
        T = config.num_train_timesteps
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self.sigmas = with_final_sigma(sigmas_from_alphas_cumprod(self.alphas_cumprod)[::-1], 0.0)
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Scale of the starting noise: sigma_max, or sqrt(sigma_max^2 + 1) for ``leading`` spacing (diffusers)."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    # ---- model input and forward process ---------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """The model was trained on DDPM-scaled inputs: feed it ``x / sqrt(sigma^2 + 1)`` (Karras et al. 2022, c_in)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def _sigmas_for(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma for each timestep, shaped (B, 1, ..., 1). Looked up by value unless a begin index is set; then it is
        the current step (inpainting re-noises after a step) or the begin index (img2img, before the first step)."""
        sigmas = self.sigmas.to(device=like.device, dtype=like.dtype)
        timesteps = torch.as_tensor(timesteps, device=like.device).reshape(-1)
        if self.begin_index is None:
            schedule = self.timesteps.to(like.device)
            indices = [self.index_for_timestep(t, schedule) for t in timesteps]
        elif self.step_index is not None:
            indices = [self.step_index] * len(timesteps)
        else:
            indices = [self.begin_index] * len(timesteps)
        return broadcast_to(sigmas[indices], like)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process in sigma form: ``x = x_0 + sigma * eps``."""
        check_same_shape("noise", noise, "original_samples", original_samples)
        return original_samples + noise * self._sigmas_for(timesteps, original_samples)

    @property
    def get_velocity(self):
        # diffusers' LMS, Euler ancestral and DPM-Solver have no v-target; Euler defines its own.
        raise AttributeError(f"{type(self).__name__} has no get_velocity (neither has diffusers' class)")

    def __len__(self) -> int:
        return self.config.num_train_timesteps
