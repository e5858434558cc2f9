"""SDXL image to image, and the refiner (Podell et al. 2023, Sec. 2.5).

Two ways to start, on the SD img2img logic (SDEdit):
- ``strength``: noise the image's latents to an intermediate step, as in SD img2img;
- ``denoising_start``: the base -> refiner hand-off. The base ran the first part of the schedule and stopped at
  ``denoising_end`` (``output_type="latent"``); its latents are x_t already, so no noise is added and the refiner
  runs the rest of the same schedule.
A refiner UNet is conditioned on the aesthetic score instead of the target size: ``requires_aesthetics_score=True``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from minidiff.pipelines.checks import check_latents, check_sampling_arguments
from minidiff.pipelines.images import preprocess_image
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline, check_strength
from minidiff.pipelines.stable_diffusion_xl import (
    StableDiffusionXLBase, check_fraction, check_tensor_inputs, float32_vae, stop_early, timestep_cutoff,
)
from minidiff.random import randn_tensor


def check_denoising_range(denoising_start: float | None, denoising_end: float | None) -> None:
    check_fraction("denoising_start", denoising_start)
    check_fraction("denoising_end", denoising_end)
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}: the pipeline "
                         "runs the part of the schedule between them")


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLBase, StableDiffusionImg2ImgPipeline):
    """SDXL image to image; with a refiner UNet and ``requires_aesthetics_score=True``, the SDXL refiner."""

    config_names = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")

    def __init__(self, vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=None,
                 scheduler=None, image_encoder=None, feature_extractor=None, requires_aesthetics_score: bool = False,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None) -> None:
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker)
        if not isinstance(requires_aesthetics_score, bool):
            raise TypeError(f"requires_aesthetics_score must be True or False, got {requires_aesthetics_score!r}")
        self.requires_aesthetics_score = requires_aesthetics_score

    def aesthetic_scores(self, aesthetic_score: float, negative_aesthetic_score: float):
        """The scores for ``micro_conditioning``: used only by refiner-like UNets (requires_aesthetics_score)."""
        return (aesthetic_score, negative_aesthetic_score) if self.requires_aesthetics_score else None

    def encode_image_latents(self, image: torch.Tensor, batch: int, generator) -> torch.Tensor:
        """SD img2img's posterior sample, in float32 when the VAE asks for it (``force_upcast``)."""
        upcast = self.vae.config.force_upcast and self.vae.dtype != torch.float32
        with float32_vae(self.vae, upcast):
            latents = super().encode_image_latents(image.to(self.vae.dtype), batch, generator)
        return latents.to(image.dtype)

    def image_input(self, image: Any, dtype, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Latents (B, 4, h, w) as given (the base's ``output_type="latent"``), or the image as (B, 3, H, W)."""
        if image is None:
            raise ValueError(f"{type(self).__name__} needs an image (PIL image, numpy array, tensor, file path, or "
                             "latents from a base pipeline's output_type='latent')")
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == self.vae.config.latent_channels:
            check_latents("image", image)
            return image.to(device=self.device, dtype=dtype)
        return preprocess_image(image, height, width, self.vae_scale_factor).to(device=self.device, dtype=dtype)

    def is_latent(self, image: torch.Tensor) -> bool:
        return image.shape[1] == self.vae.config.latent_channels

    def clean_latents(self, image: torch.Tensor, batch: int, generator) -> torch.Tensor:
        """The image's latents repeated to the batch: latents as they are, pixels through the VAE."""
        if not self.is_latent(image):
            return self.encode_image_latents(image, batch, generator)
        if batch % image.shape[0]:
            raise ValueError(f"cannot spread {image.shape[0]} image latents over a batch of {batch}")
        return image.repeat(batch // image.shape[0], 1, 1, 1)

    def start_timesteps(self, num_inference_steps: int, strength: float, denoising_start: float | None):
        """The timesteps to run: the tail ``strength`` keeps, or (hand-off) those below ``denoising_start``'s cutoff."""
        if denoising_start is None:
            return self.strength_timesteps(num_inference_steps, strength)
        timesteps = self.scheduler.timesteps
        kept = int((timesteps < timestep_cutoff(self.scheduler, denoising_start)).sum())
        if self.scheduler.order == 2 and kept % 2 == 0:
            kept += 1  # a 2nd-order scheduler repeats each timestep but the first: do not start inside a pair
        if kept == 0:
            raise ValueError(f"denoising_start={denoising_start} leaves no step of the {len(timesteps)}; lower it or "
                             "raise num_inference_steps")
        start = len(timesteps) - kept
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return timesteps[start:]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        check_strength(strength)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, guidance_rescale,
                                 generator)
        check_denoising_range(denoising_start, denoising_end)
        check_tensor_inputs(callback_on_step_end_tensor_inputs)
        check_latents("latents", latents)
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        encoded = self.encode_prompt(prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt,
                                     negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                     negative_pooled_prompt_embeds, self.text_lora_scale(cross_attention_kwargs),
                                     clip_skip)
        batch, dtype = encoded[0].shape[0], encoded[0].dtype
        image = self.image_input(image, dtype)
        start = image if latents is None else latents  # the size of the image in pixels: latents are 1/8 of it
        scale = self.vae_scale_factor if self.is_latent(start) else 1
        height, width = start.shape[-2] * scale, start.shape[-1] * scale
        time_ids = self.micro_conditioning(height, width, original_size, crops_coords_top_left, target_size,
                                           negative_original_size, negative_crops_coords_top_left,
                                           negative_target_size,
                                           self.aesthetic_scores(aesthetic_score, negative_aesthetic_score), dtype)
        cond = self.cfg_batch(encoded, *time_ids, do_cfg)
        self.check_memory(batch, height, width, guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.start_timesteps(num_inference_steps, strength, denoising_start)
        if latents is None:
            latents = self.clean_latents(image, batch, generator)  # random draw 1 (VAE posterior sample)
            if denoising_start is None:  # hand-off latents are x_t already; otherwise noise to the first step
                noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)  # draw 2
                latents = self.scheduler.add_noise(latents, noise, timesteps[:1].repeat(batch))
        timesteps = stop_early(timesteps, self.scheduler, denoising_end)
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, cond["prompt_embeds"], guidance_scale, guidance_rescale, step=i,
                                            cross_attention_kwargs=cross_attention_kwargs,
                                            added_cond_kwargs=self.added_cond(cond))
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents, cond = self.step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, cond)
        return self.finish(latents, output_type, return_dict)
