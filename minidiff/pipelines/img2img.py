"""Image to image (SDEdit, Meng et al. 2022): noise an input image's latents to an intermediate step, then denoise.

``strength`` in [0, 1] says how far into the noise schedule to go: 1 starts from (almost) pure noise, 0 returns the
input. With N steps only the last ``int(N * strength)`` timesteps of the schedule run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from minidiff.pipelines.checks import check_number, check_sampling_arguments
from minidiff.pipelines.images import preprocess_image
from minidiff.pipelines.stable_diffusion import StableDiffusionBase
from minidiff.random import randn_tensor


def check_strength(strength: float) -> None:
    check_number("strength", strength, low=0.0, high=1.0)


def repeat_to_batch(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``tensor`` (n, ...) tiled to (batch, ...) as diffusers does (``cat([x] * (batch // n))``: entries cycle
    0, 1, .., n-1, 0, 1, ..); n must divide ``batch``."""
    count = tensor.shape[0]
    if count > batch or batch % count:
        raise ValueError(f"{name} has {count} entries, which cannot be spread over a batch of {batch} images "
                         f"(prompts x num_images_per_prompt); pass 1 {name} or one per prompt")
    return tensor.repeat(batch // count, *([1] * (tensor.ndim - 1)))


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
    """Text-guided image to image."""

    def encode_image_latents(self, image: torch.Tensor, batch: int, generator) -> torch.Tensor:
        """VAE posterior samples z ~ q(z | x), times the scaling factor; one generator per image if a list is given.
        A 1-image input is repeated to the batch."""
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
        if batch % image.shape[0]:
            raise ValueError(f"cannot spread {image.shape[0]} images over a batch of {batch}")
        if isinstance(generator, list):
            image = image.repeat(batch // image.shape[0], 1, 1, 1)
            latents = torch.cat([self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(batch)])
        else:
            latents = self.vae.encode(image).latent_dist.sample(generator)
        return self.scale_image_latents(latents).repeat(batch // latents.shape[0], 1, 1, 1)  # (B, 4, H/8, W/8)

    def scale_image_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE posterior samples -> diffusion latents: times the VAE's ``scaling_factor``."""
        return latents * self.vae.config.scaling_factor

    def strength_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The tail of the schedule that ``strength`` keeps; tells sigma schedulers where they begin."""
        check_strength(strength)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        start = max(num_inference_steps - kept, 0) * self.scheduler.order
        timesteps = self.scheduler.timesteps[start:]
        if len(timesteps) == 0:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising step; "
                "raise strength or the number of steps"
            )
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return timesteps

    def noised_image_latents(self, pixels: torch.Tensor, timesteps: torch.Tensor, batch: int, generator):
        """x_t at the first kept timestep: the image latents noised by ``scheduler.add_noise`` (DDPM Eq. 4,
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps); draws the posterior samples, then eps, as diffusers does."""
        clean = self.encode_image_latents(pixels, batch, generator)  # (B, 4, H/8, W/8)
        noise = randn_tensor(clean.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        return self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(batch))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        cross_attention_kwargs: dict | None = None,
        prompt_weighting: str | None = None,
    ):
        check_strength(strength)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, guidance_rescale,
                                 generator)
        if image is None:
            raise ValueError("img2img needs an image (PIL image, numpy array, tensor or file path)")
        device = self.device
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip,
                                             cross_attention_kwargs, prompt_weighting)
        pixels = preprocess_image(image, scale=self.vae_scale_factor).to(device=device, dtype=text.dtype)
        self.check_memory(batch, pixels.shape[-2], pixels.shape[-1], guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.strength_timesteps(num_inference_steps, strength)
        latents = self.noised_image_latents(pixels, timesteps, batch, generator)
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, text, guidance_scale, guidance_rescale, step=i,
                                            cross_attention_kwargs=cross_attention_kwargs)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text)
        return self.finish(latents, output_type, return_dict)
