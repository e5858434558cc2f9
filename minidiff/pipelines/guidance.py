"""Guidance: steering each denoising step, by the text (classifier-free) or by a loss the user writes.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6): the UNet runs on the batch [unconditional, conditional] and
the two noise predictions are extrapolated, ``eps = eps_u + w (eps_c - eps_u)``. Guidance rescale (Lin et al. 2023,
Sec. 3.4) pulls the guided prediction's standard deviation back to the conditional one's to avoid over-exposure.

Loss guidance (the "colour guidance" recipe of the diffusers course, after Dhariwal & Nichol 2021's classifier
guidance): at each step, estimate x0 from the noise prediction, score it with a differentiable ``loss_fn`` and nudge
x_t down the gradient before the scheduler step.
"""

from __future__ import annotations

from typing import Callable

import torch

from minidiff.pipelines.checks import check_finite
from minidiff.schedulers.betas import predicted_x0_and_eps


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


def sample_with_loss_guidance(
    unet,
    scheduler,
    noise: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    loss_scale: float,
    num_inference_steps: int = 50,
    progress: Callable = iter,
) -> torch.Tensor:
    """Sample a pixel-space UNet from ``noise`` (x_T) while steering every step with ``loss_fn`` on the predicted x0.

    Per step: eps = UNet(x_t, t); x0_hat from x_t and eps (DDPM Eq. 15, or the v / sample forms);
    x_t <- x_t - loss_scale * d loss_fn(x0_hat) / d x_t; then the scheduler step with eps. Works with the
    alpha-bar schedulers (DDPM, DDIM, PNDM), whose x0 estimate needs only alphas_cumprod.
    Returns images in [-1, 1], (B, C, H, W).
    """
    if not hasattr(scheduler, "alphas_cumprod") or hasattr(scheduler, "sigmas"):
        raise ValueError(f"loss guidance needs an alpha-bar scheduler (DDPM, DDIM, PNDM), got {type(scheduler).__name__}")
    x = noise * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps)
    for i, t in enumerate(progress(scheduler.timesteps)):
        x = x.detach().requires_grad_(True)
        noise_pred = unet(scheduler.scale_model_input(x, t), t).sample
        check_finite(noise_pred, f"UNet output at step {i} (t={int(t)})")
        alpha_bar = scheduler.alphas_cumprod.to(x.device)[int(t)]
        x0, _ = predicted_x0_and_eps(noise_pred, x, alpha_bar, scheduler.config.prediction_type)
        grad = check_finite(torch.autograd.grad(loss_fn(x0) * loss_scale, x)[0], f"loss_fn gradient at step {i}",
                            hint="check loss_fn and loss_scale")
        with torch.no_grad():
            x = scheduler.step(noise_pred.detach(), t, x.detach() - grad).prev_sample
    return x.detach()
