"""Guidance: steering each denoising step, by the text (classifier-free) or by a loss the user writes.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6): the UNet runs on the batch [unconditional, conditional] and
the two noise predictions are extrapolated, ``eps = eps_u + w (eps_c - eps_u)``. Guidance rescale (Lin et al. 2023,
Sec. 3.4) pulls the guided prediction's standard deviation back to the conditional one's to avoid over-exposure.

Loss guidance (the "colour guidance" recipe of the diffusers course): at each step, estimate x0 from the noise
prediction, score it with a differentiable ``loss_fn`` and nudge x_t down the gradient before the scheduler step.
"""

from __future__ import annotations

from typing import Callable

import torch


def classifier_free_guidance(noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0):
    """Split the (2B, ...) prediction into [uncond, cond] halves and combine them (Ho & Salimans 2022, Eq. 6)."""
    uncond, cond = noise_pred.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        guided = rescale_noise_cfg(guided, cond, guidance_rescale)
    return guided


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023, Eq. 15-16: match the per-sample std of the guided prediction to the conditional one's,
    then blend ``phi * rescaled + (1 - phi) * guided``."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def loss_guided_step(
    latents: torch.Tensor,
    t,
    noise_fn: Callable[[torch.Tensor], torch.Tensor],
    scheduler,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    loss_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One guided step: ``x_t <- x_t - loss_scale * d loss(x0_hat(x_t)) / d x_t`` with
    ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (DDPM Eq. 15).

    Returns (guided latents, noise prediction at the guided latents' original point, loss value).
    """
    latents = latents.detach().requires_grad_(True)
    model_input = scheduler.scale_model_input(latents, t)
    noise_pred = noise_fn(model_input)
    alpha_bar = scheduler.alphas_cumprod.to(latents.device)[int(t)]
    x0 = (latents - (1 - alpha_bar) ** 0.5 * noise_pred) / alpha_bar**0.5
    loss = loss_fn(x0) * loss_scale
    grad = torch.autograd.grad(loss, latents)[0]
    return (latents - grad).detach(), noise_pred.detach(), float(loss)
