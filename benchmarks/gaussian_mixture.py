"""An analytic denoiser: the exact noise prediction for data drawn from a Gaussian mixture.

Data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) in D dimensions. Under the VP chain x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps, the variance-exploding variable y = x_t / sqrt(abar_t) = x0 + sigma eps with
sigma_t = sqrt((1 - abar_t) / abar_t) has the marginal

    p_sigma(y) = sum_k w_k N(y; mu_k, diag(s_k^2 + sigma^2)),

so the exact predictions are closed-form (Karras et al. 2022, Eq. 3; Song et al. 2021, Eq. 13's score):

    r_k(y)   = softmax_k(log w_k + log N(y; mu_k, s_k^2 + sigma^2))                  posterior responsibilities
    D(y)     = E[x0 | y] = sum_k r_k (mu_k + s_k^2 / (s_k^2 + sigma^2) (y - mu_k))   denoised sample
    eps(y)   = -sigma grad_y log p_sigma(y) = sum_k r_k sigma (y - mu_k) / (s_k^2 + sigma^2) = (y - D) / sigma
    v        = sqrt(abar) eps - sqrt(1 - abar) D                                      (Salimans & Ho 2022)

Fractional timesteps (the sigma schedulers pass float t): sigma(t) is the linear interpolation of
sigma_i = sqrt((1 - abar_i) / abar_i) over integer i, which is how diffusers' sigma schedulers place sigmas on
fractional timesteps (``np.interp(t, arange(T), sigmas)``). Note that their Karras / DPM2 midpoints invert sigma with
an interpolation linear in log sigma (``_sigma_to_t``); between two integer timesteps the two differ by at most
about (relative spacing)^2 / 8 in sigma, largest between t = 0 and t = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minidiff.schedulers import DDPMScheduler


@dataclass
class GaussianMixture:
    """weights (K,), means (K, D), variances (K, D): diagonal covariances."""

    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor

    @classmethod
    def seeded(cls, dim: int = 16, components: int = 4, seed: int = 0) -> "GaussianMixture":
        """A mixture whose total variance is about 1 per dimension (like SD's scaled latents): means ~ N(0, 0.8^2),
        standard deviations per component and dimension in [0.05, 0.3], weights uniform in [0.5, 1.5], normalised."""
        g = torch.Generator().manual_seed(seed)
        weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        means = 0.8 * torch.randn(components, dim, generator=g, dtype=torch.float64)
        stds = 0.05 + 0.25 * torch.rand(components, dim, generator=g, dtype=torch.float64)
        return cls(weights / weights.sum(), means, stds**2)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n exact samples (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt() * noise

    def component_log_probs(self, y: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """log w_k + log N(y; mu_k, s_k^2 + sigma^2) for y (n, D) -> (n, K)."""
        var = self.variances + torch.as_tensor(sigma, dtype=torch.float64) ** 2  # (K, D)
        diff = y[:, None, :] - self.means[None]  # (n, K, D)
        log_normal = -0.5 * ((diff**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return self.weights.log() + log_normal

    def log_prob(self, y: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log p_sigma(y), (n, D) -> (n,)."""
        return torch.logsumexp(self.component_log_probs(y, sigma), dim=-1)

    def denoise(self, y: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """D(y, sigma) = E[x0 | x0 + sigma eps = y] = sum_k r_k (mu_k + s_k^2 / (s_k^2 + sigma^2) (y - mu_k))."""
        r = torch.softmax(self.component_log_probs(y, sigma), dim=-1)  # (n, K)
        shrink = self.variances / (self.variances + torch.as_tensor(sigma, dtype=torch.float64) ** 2)  # (K, D)
        per_component = self.means[None] + shrink[None] * (y[:, None, :] - self.means[None])  # (n, K, D)
        return (r[..., None] * per_component).sum(1)

    def eps(self, y: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """eps(y, sigma) = -sigma grad log p_sigma(y) = sum_k r_k sigma (y - mu_k) / (s_k^2 + sigma^2); finite at
        sigma = 0 (it is 0 there), so the probability-flow ODE dy/dsigma = eps is regular down to sigma = 0."""
        r = torch.softmax(self.component_log_probs(y, sigma), dim=-1)  # (n, K)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        per_component = sigma * (y[:, None, :] - self.means[None]) / (self.variances + sigma**2)  # (n, K, D)
        return (r[..., None] * per_component).sum(1)


def sd_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """Stable Diffusion's abar_t: scaled_linear betas from 0.00085 to 0.012, float64."""
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    return scheduler.alphas_cumprod.double()


class MixtureDenoiser:
    """The exact model of a Gaussian mixture for a VP schedule, called as a UNet is in a sampling loop:
    ``model(x_t, t)`` with x_t the scheduler's model input (shape (B, ...) with prod(...) = D) and t a (float)
    timestep. Counts its calls in ``calls``."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        self.mixture, self.prediction_type, self.calls = mixture, prediction_type, 0
        self.train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().double()  # (T,)

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        """sigma(t): linear interpolation of the integer timesteps' sigmas (diffusers' np.interp placement)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(self.train_sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.train_sigmas) - 2)
        w = t - low
        return (1 - w) * self.train_sigmas[low] + w * self.train_sigmas[low + 1]

    def __call__(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sigma = self.sigma(t)
        alpha = 1 / (1 + sigma**2).sqrt()  # sqrt(abar_t)
        y = x_t.reshape(x_t.shape[0], -1).double() / alpha  # (B, D) variance-exploding variable
        eps = self.mixture.eps(y, sigma)
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "sample":
            out = y - sigma * eps
        else:
            out = alpha * eps - alpha * sigma * (y - sigma * eps)  # sqrt(abar) eps - sqrt(1 - abar) x0
        return out.reshape(x_t.shape).to(x_t.dtype)
