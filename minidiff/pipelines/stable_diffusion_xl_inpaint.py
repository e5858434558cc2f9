"""SDXL inpainting: repaint the white part of a mask, keep the rest, with SDXL's text and size conditioning.

The mask logic is SD inpainting's (a 9-channel UNet sees ``cat([x_t, mask, masked-image latents])``; a 4-channel
UNet gets the kept region reset to the noised original after each step), the start is SDXL img2img's (``strength``,
default 0.9999 as in diffusers so the image still seeds the latents, or a refiner's ``denoising_start``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from minidiff.pipelines.checks import check_latents, check_sampling_arguments
from minidiff.pipelines.images import preprocess_mask
from minidiff.pipelines.img2img import check_strength
from minidiff.pipelines.inpaint import StableDiffusionInpaintPipeline
from minidiff.pipelines.stable_diffusion_xl import check_tensor_inputs, stop_early
from minidiff.pipelines.stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline, check_denoising_range
from minidiff.random import randn_tensor


class StableDiffusionXLInpaintPipeline(StableDiffusionXLImg2ImgPipeline, StableDiffusionInpaintPipeline):
    """SDXL text-guided inpainting with 9-channel or 4-channel UNets."""

    def _check_inpaint_inputs(self, image, mask_image, padding_mask_crop, latents, denoising_start) -> int:
        """The UNet's input channels (4 or 9) once the inputs are known to be usable."""
        if padding_mask_crop is not None:
            raise ValueError("padding_mask_crop is not supported by minidiff: crop the image and mask to the region "
                             "yourself, inpaint the crop, and paste the result back")
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both image and mask_image")
        if latents is not None and denoising_start is not None:
            raise ValueError("pass latents or denoising_start, not both: with denoising_start the image's latents are "
                             "the starting point")
        return self.inpaint_channels()

    def _check_masked_image_latents(self, masked_image_latents, height: int, width: int) -> None:
        """Precomputed masked-image latents must be (B, latent_channels, height / f, width / f), f the VAE's factor."""
        expected = (self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if masked_image_latents is not None and tuple(masked_image_latents.shape[1:]) != expected:
            raise ValueError(f"masked_image_latents have shape {tuple(masked_image_latents.shape)}; height={height} "
                             f"width={width} need (B, {', '.join(map(str, expected))}): encode the masked image at "
                             "that size, or pass height and width")

    def _check_latent_image(self, image: torch.Tensor, channels: int, masked_image_latents, denoising_start,
                            height: int, width: int) -> None:
        """Latents as ``image`` (a base's ``output_type="latent"``, the inpainting hand-off): only with
        ``denoising_start``, at the latent size of (height, width), and for a 9-channel UNet with
        ``masked_image_latents`` (latents cannot be masked in pixels)."""
        if not self.is_latent(image):
            return
        if denoising_start is None:
            raise ValueError("image is latents (B, 4, h, w): pass denoising_start (the base -> refiner hand-off), or "
                             "pass the image in pixels to inpaint with strength")
        expected = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if tuple(image.shape[-2:]) != expected:
            raise ValueError(f"image latents are {tuple(image.shape[-2:])}, height={height} width={width} need "
                             f"{expected}; pass the base's height and width")
        if channels == 9 and masked_image_latents is None:
            raise ValueError("a 9-channel inpainting UNet given latents as image also needs masked_image_latents "
                             "(the masked image cannot be made from latents)")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        check_latents("masked_image_latents", masked_image_latents)
        channels = self._check_inpaint_inputs(image, mask_image, padding_mask_crop, latents, denoising_start)
        height, width = self.default_size(height, width)
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        encoded = self.encode_prompt(prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt,
                                     negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                     negative_pooled_prompt_embeds, self.text_lora_scale(cross_attention_kwargs),
                                     clip_skip)
        batch, dtype = encoded[0].shape[0], encoded[0].dtype
        time_ids = self.micro_conditioning(height, width, original_size, crops_coords_top_left, target_size,
                                           negative_original_size, negative_crops_coords_top_left,
                                           negative_target_size,
                                           self.aesthetic_scores(aesthetic_score, negative_aesthetic_score), dtype)
        cond = self.cfg_batch(encoded, *time_ids, do_cfg)
        self.check_memory(batch, height, width, guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.start_timesteps(num_inference_steps, strength, denoising_start)
        image = self.image_input(image, torch.float32, height, width)  # (B, 3, H, W) in [-1, 1], or base latents
        self._check_latent_image(image, channels, masked_image_latents, denoising_start, height, width)
        self._check_masked_image_latents(masked_image_latents, height, width)
        mask = preprocess_mask(mask_image, height, width).to(device)  # (B, 1, H, W), 1 = repaint
        # Random draws in diffusers' order: image latents (if needed), noise, masked-image latents.
        if denoising_start is None:
            latents, noise, clean = self.start_latents(image, latents, timesteps, batch, generator, strength, dtype,
                                                       need_clean=channels == 4)
        else:  # a refiner continuing a base's latents: they are x_t already
            clean = self.clean_latents(image.to(dtype), batch, generator)
            noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=dtype)
            latents = clean
        if masked_image_latents is not None:  # precomputed latents of the masked image: no VAE encode, no random draw
            mask, masked_latents = self.batch_mask(mask.to(dtype), masked_image_latents.to(device, dtype), batch,
                                                   do_cfg)
        elif self.is_latent(image):  # base latents: nothing to mask in pixels; the 4-channel UNet needs only the mask
            mask, masked_latents = self.batch_mask(mask.to(dtype), clean, batch, do_cfg)
        else:
            masked_image = (image * (mask < 0.5)).to(dtype)  # the kept region; the repainted one is 0 (grey)
            mask, masked_latents = self.prepare_mask(mask.to(dtype), masked_image, batch, generator, do_cfg)
        extra = torch.cat([mask, masked_latents], dim=1) if channels == 9 else None  # (B or 2B, 1 + 4, h, w)
        timesteps = stop_early(timesteps, self.scheduler, denoising_end)
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, cond["prompt_embeds"], guidance_scale, guidance_rescale,
                                            extra_channels=extra, step=i, cross_attention_kwargs=cross_attention_kwargs,
                                            added_cond_kwargs=self.added_cond(cond))
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            if channels == 4:  # keep the unmasked region on the original image's noisy trajectory
                latents = self.keep_unmasked(latents, clean, noise, mask, timesteps, i, do_cfg)
            latents, cond = self.step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, cond)
        return self.finish(latents, output_type, return_dict)
