"""DDIM inversion and prompt-to-prompt style editing (Song et al. 2021, Sec. 4.3; Mokady et al. 2023, Sec. 3).

DDIM with eta = 0 is an ODE solver, so it can be run backwards: from clean latents x_0, step *up* the schedule,
``x_{t} = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps(x_{t-1}, t)`` (DDIM Eq. 12 with the roles of t and t-1
swapped), recording every x_t. Sampling from the recorded x_t with the same prompt returns (nearly) the input;
sampling with another prompt edits it while keeping its layout: the classic "puppy to cat" demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.outputs import BaseOutput
from minidiff.pipelines.checks import check_guidance_scale, check_int, check_latents, check_prompt_text
from minidiff.pipelines.images import preprocess_image
from minidiff.pipelines.stable_diffusion import StableDiffusionBase


@dataclass
class InversionOutput(BaseOutput):
    """``latents[k]`` is x at ``timesteps[k]`` (ascending noise); ``latents[-1]`` is the fully inverted x_T."""

    latents: list[torch.Tensor]
    timesteps: torch.Tensor


class StableDiffusionDDIMInversionPipeline(StableDiffusionBase):
    """``invert`` an image into DDIM noise, ``sample`` from any step of it, ``edit`` (= invert + sample) it."""

    def _schedulers(self, num_inference_steps: int):
        from minidiff.schedulers import DDIMInverseScheduler, DDIMScheduler

        forward = DDIMScheduler.from_config(self.scheduler.config)
        inverse = DDIMInverseScheduler.from_config(self.scheduler.config)
        for scheduler in (forward, inverse):
            scheduler.set_timesteps(num_inference_steps, device=self.device)
        return forward, inverse

    def _text(self, prompt, guidance_scale: float, negative_prompt=None) -> torch.Tensor:
        check_prompt_text("prompt", prompt, allow_none=False)
        check_guidance_scale(guidance_scale)
        return self._encode_prompt(prompt, self.device, 1, self.uses_cfg(guidance_scale), negative_prompt)

    def image_to_latents(self, image: Any, guidance_scale: float = 1.0) -> torch.Tensor:
        """The VAE posterior mean, scaled: inversion wants a deterministic starting point."""
        pixels = preprocess_image(image, scale=self.vae_scale_factor).to(self.device, self.dtype)
        self.check_memory(pixels.shape[0], pixels.shape[-2], pixels.shape[-1], guidance_scale)
        return self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def invert(self, image: Any = None, prompt: str | list[str] = "", latents: torch.Tensor | None = None,
               num_inference_steps: int = 50, guidance_scale: float = 1.0, negative_prompt=None) -> InversionOutput:
        """Run DDIM backwards from the image (or its ``latents``) to noise, returning the whole trajectory."""
        if (image is None) == (latents is None):
            raise ValueError("pass exactly one of image or latents to invert")
        check_int("num_inference_steps", num_inference_steps)
        check_latents("latents", latents)
        text = self._text(prompt, guidance_scale, negative_prompt)
        x = self.image_to_latents(image, guidance_scale) if latents is None else latents.to(self.device)
        _, inverse = self._schedulers(num_inference_steps)
        trajectory = []
        for i, t in enumerate(self.progress_bar(inverse.timesteps)):  # ascending: t_1 < t_2 < ... < t_N
            noise_pred = self.predict_noise(x, t, text, guidance_scale, step=i)
            x = self.scheduler_step(noise_pred, t, x, i, scheduler=inverse)  # x at noise level t
            trajectory.append(x)
        return InversionOutput(latents=trajectory, timesteps=inverse.timesteps)

    @torch.no_grad()
    def sample(self, inverted: InversionOutput, prompt: str | list[str], start_step: int = 0,
               guidance_scale: float = 1.0, negative_prompt=None, output_type: str = "pil", return_dict: bool = True):
        """DDIM sampling (eta = 0) from step ``start_step`` of the schedule, starting at the inverted latents of
        that noise level. ``start_step=0`` starts from the fully inverted x_T."""
        if not isinstance(inverted, InversionOutput):
            raise TypeError(f"inverted must be the InversionOutput invert() returns, got {type(inverted).__name__}")
        steps = len(inverted.latents)
        check_int("start_step", start_step, minimum=0)
        if not 0 <= start_step < steps:
            raise ValueError(f"start_step must be in [0, {steps - 1}] for an inversion of {steps} steps, got {start_step}")
        self.check_output_type(output_type)
        forward, _ = self._schedulers(steps)
        text = self._text(prompt, guidance_scale, negative_prompt)
        latents = inverted.latents[steps - 1 - start_step]  # noise level forward.timesteps[start_step]
        for i, t in enumerate(self.progress_bar(forward.timesteps[start_step:]), start=start_step):
            noise_pred = self.predict_noise(latents, t, text, guidance_scale, step=i)
            latents = self.scheduler_step(noise_pred, t, latents, i, scheduler=forward)
        return self.finish(latents, output_type, return_dict)

    def edit(self, image: Any, source_prompt: str, target_prompt: str, num_inference_steps: int = 50,
             start_step: int = 10, guidance_scale: float = 3.5, inversion_guidance_scale: float = 1.0,
             output_type: str = "pil", return_dict: bool = True):
        """Invert ``image`` under ``source_prompt`` and resample it from ``start_step`` under ``target_prompt``."""
        check_int("num_inference_steps", num_inference_steps)
        if check_int("start_step", start_step, minimum=0) >= num_inference_steps:
            raise ValueError(f"start_step must be in [0, {num_inference_steps - 1}] for num_inference_steps="
                             f"{num_inference_steps}, got {start_step}")
        check_guidance_scale(guidance_scale)
        check_guidance_scale(inversion_guidance_scale, "inversion_guidance_scale")
        self.check_output_type(output_type)
        inverted = self.invert(image, source_prompt, num_inference_steps=num_inference_steps,
                               guidance_scale=inversion_guidance_scale)
        return self.sample(inverted, target_prompt, start_step, guidance_scale, output_type=output_type,
                           return_dict=return_dict)

    __call__ = edit
