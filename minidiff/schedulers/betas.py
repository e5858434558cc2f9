"""Noise schedules shared by every scheduler: betas, cumulative alphas, timestep spacing, thresholding.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
``beta_t`` is the variance added at step t, ``alpha_t = 1 - beta_t`` and
``alpha_bar_t = prod_{s<=t} alpha_s`` (``alphas_cumprod``), so ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``
(DDPM Eq. 4). All arithmetic is float32 torch, as in diffusers, so schedules agree to the last bit.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from minidiff.configuration import check_choice

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999, transform: str = "cosine") -> torch.Tensor:
    """Betas of a continuous alpha_bar: ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta)``, computed in Python
    floats. ``cosine`` is Nichol & Dhariwal 2021, Eq. 17: ``abar(t) = cos((t + 0.008) / 1.008 * pi/2)^2``;
    ``exp`` is diffusers' exponential schedule ``abar(t) = exp(-12 t)`` (Heun's ``beta_schedule="exp"``)."""

    def alpha_bar(t: float) -> float:
        if transform == "exp":
            return math.exp(-12.0 * t)
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift and scale ``sqrt(alpha_bar)`` so the last step has zero signal while the first keeps its value."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def count_from_trained_betas(kwargs: dict, owner: str) -> dict:
    """Constructor options with ``num_train_timesteps`` taken from the length of ``trained_betas`` when given (as
    diffusers, whose betas are the trained ones whatever the count says); a different count given beside them is
    replaced, with a warning naming both."""
    betas = kwargs.get("trained_betas")
    if betas is None or np.ndim(betas) != 1:
        return kwargs  # no trained betas, or not a list: the config's type check names the problem
    count = len(betas)
    given = kwargs.get("num_train_timesteps")
    if given is not None and given != count:
        warnings.warn(f"{owner}: num_train_timesteps={given} replaced by {count}, the length of trained_betas",
                      UserWarning, stacklevel=4)
    return {**kwargs, "num_train_timesteps": count}


def make_betas(config) -> torch.Tensor:
    """Betas from a scheduler config: ``trained_betas`` if given (their length is ``num_train_timesteps``: see
    count_from_trained_betas), else ``beta_schedule`` over ``num_train_timesteps`` steps, optionally rescaled to
    zero terminal SNR."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(np.asarray(config.trained_betas), dtype=torch.float32)  # (T,): the config checked it
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # the Stable Diffusion schedule: linear in sqrt(beta)
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif config.beta_schedule == "exp":
        betas = betas_for_alpha_bar(T, transform="exp")
    else:
        betas = betas_for_alpha_bar(T)
    source = "trained_betas" if config.trained_betas is not None else f"beta_schedule={config.beta_schedule!r}"
    check_betas(betas, source)
    if getattr(config, "rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def check_betas(betas: torch.Tensor, source: str) -> None:
    """Every beta must be finite and in (0, 1), and alpha_bar must stay above 0 in float32; otherwise the
    schedule's noise levels are NaN or infinite and every step would be too."""
    bad = ~(torch.isfinite(betas) & (betas > 0) & (betas < 1))
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ValueError(f"{source} gives beta[{k}]={float(betas[k])}; every beta must lie in the open interval (0, 1)")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if alphas_cumprod[-1] <= 0:
        k = int((alphas_cumprod <= 0).nonzero()[0])
        raise ValueError(f"{source} drives alpha_bar to 0 at timestep {k} (betas too large for "
                         f"num_train_timesteps={len(betas)}); use smaller betas or fewer num_train_timesteps")


def check_range(option: str, value: float, low: float, high: float, low_closed: bool = False,
                high_closed: bool = False) -> None:
    """Raise a ValueError naming ``option``, the interval and the value unless ``value`` lies in it (NaN never does)."""
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    if not (above and below):
        if high == math.inf:
            raise ValueError(f"{option}={value!r} must be {'>=' if low_closed else '>'} {low} and finite")
        interval = f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"
        raise ValueError(f"{option}={value!r} must lie in {interval}")


# Numeric options some schedulers have, with the interval where they give finite steps:
# option -> (low, high, low_closed, high_closed)
OPTION_RANGES = {
    "clip_sample_range": (0, math.inf, False, False),
    "dynamic_thresholding_ratio": (0, 1, True, True),  # 0: s is the smallest |x0| (at least 1)
    "sample_max_value": (0, math.inf, False, False),
    "sigma_min": (0, math.inf, False, False),
    "sigma_max": (0, math.inf, False, False),
    "lambda_min_clipped": (-math.inf, math.inf, True, False),
}


def check_common_options(config) -> None:
    """Validate the options schedulers share, once for all of them: choices list the accepted values, numbers
    name the interval they must lie in (betas in (0, 1), beta_start <= beta_end, ...)."""
    T = config.num_train_timesteps
    if T < 1:
        raise ValueError(f"num_train_timesteps={T} must be at least 1")
    if config.trained_betas is None:
        check_choice("beta_schedule", config.beta_schedule, getattr(config, "beta_schedules", BETA_SCHEDULES))
        if config.beta_schedule in ("linear", "scaled_linear"):  # the others ignore beta_start and beta_end
            check_range("beta_start", config.beta_start, 0, 1)
            check_range("beta_end", config.beta_end, 0, 1)
            if config.beta_start > config.beta_end:
                raise ValueError(f"beta_start={config.beta_start} must not exceed beta_end={config.beta_end}")
    check_choice("prediction_type", config.prediction_type, getattr(config, "prediction_types", PREDICTION_TYPES))
    check_choice("timestep_spacing", config.timestep_spacing, getattr(config, "timestep_spacings", TIMESTEP_SPACINGS))
    if not 0 <= config.steps_offset < T:
        raise ValueError(f"steps_offset={config.steps_offset} must lie in [0, num_train_timesteps - 1 = {T - 1}]")
    for option, (low, high, low_closed, high_closed) in OPTION_RANGES.items():
        value = getattr(config, option, None)
        if value is not None:
            check_range(option, value, low, high, low_closed, high_closed)
    sigma_min, sigma_max = getattr(config, "sigma_min", None), getattr(config, "sigma_max", None)
    if sigma_min is not None and sigma_max is not None and sigma_min >= sigma_max:
        raise ValueError(f"sigma_min={sigma_min} must be smaller than sigma_max={sigma_max}")


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be between 1 and num_train_timesteps={num_train_timesteps}"
        )
    return int(num_inference_steps)


def check_custom_timesteps(timesteps, num_train_timesteps: int, integers: bool = True) -> np.ndarray:
    """A user's ``set_timesteps(timesteps=...)``: a non-empty, strictly descending 1-d list in [0, T - 1], of
    integers (int64) unless ``integers`` is False (float64: the sigma schedulers interpolate between steps)."""
    shown = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    values = np.asarray(shown)
    if values.ndim != 1 or len(values) == 0 or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"custom timesteps must be a non-empty 1-d list of numbers, got {timesteps!r}")
    if integers and not (np.issubdtype(values.dtype, np.integer) or np.all(np.mod(values, 1) == 0)):
        raise ValueError(f"custom timesteps must be integers, got {shown}")  # 10.5 would be truncated silently
    values = values.astype(np.int64 if integers else np.float64)
    if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() >= num_train_timesteps:
        raise ValueError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps="
                         f"{num_train_timesteps}), got {shown}")
    if np.any(values[1:] >= values[:-1]):
        raise ValueError(f"custom timesteps must be strictly descending, got {shown}")
    return values


def integer_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int,
                      beyond_last_ok: bool = False) -> np.ndarray:
    """Descending int64 timesteps for N of T steps (Lin et al. 2023, Table 2):
    ``linspace`` spans [0, T-1] rounded; ``leading`` is ``k * (T // N) + steps_offset``; ``trailing`` ends at T-1.
    A ``steps_offset`` that pushes the first timestep past T-1 is an error unless ``beyond_last_ok`` (the sigma
    schedulers interpolate there, clamped, as diffusers does)."""
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        timesteps = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.int64) + steps_offset
        if timesteps[0] >= T and not beyond_last_ok:
            raise ValueError(
                f"steps_offset={steps_offset} with num_inference_steps={N} gives timestep {timesteps[0]}, beyond "
                f"num_train_timesteps - 1 = {T - 1}; use a smaller steps_offset or more steps"
            )
        return timesteps
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    return np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3): per sample, take the ``ratio`` quantile s of
    |x0| (at least 1, at most ``max_value``), clamp x0 to [-s, s] and divide by s. Computed in float32."""
    dtype = x0.dtype
    batch = x0.shape[0]
    flat = x0.reshape(batch, -1)  # (B, C*H*W)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def clip_or_threshold(x0: torch.Tensor, config) -> torch.Tensor:
    """Keep a predicted x0 in range: dynamic thresholding if ``config.thresholding``, else clamping to
    ``[-clip_sample_range, clip_sample_range]`` if ``config.clip_sample`` (DDPM's clip to [-1, 1])."""
    if getattr(config, "thresholding", False):
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if getattr(config, "clip_sample", False):
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def predicted_x0_and_eps(model_output, sample, alpha_bar_t, prediction_type: str):
    """Turn a model output into (x0, eps) using ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (DDPM Eq. 4);
    for ``v_prediction`` ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022, Sec. 4)."""
    sqrt_a, sqrt_1ma = alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5
    if prediction_type == "epsilon":
        return (sample - sqrt_1ma * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_1ma
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return sqrt_a * sample - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * sample
