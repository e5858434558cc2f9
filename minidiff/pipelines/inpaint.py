"""Inpainting: repaint the white part of a mask, keep the rest.

Two ways, chosen by the UNet:
- a 9-channel inpainting UNet sees ``cat([x_t, mask, latents of the masked image])`` and learns to fill the hole;
- a plain 4-channel UNet denoises everywhere, and after each step the kept region is replaced by the original
  latents noised to the next timestep (the RePaint-style blend of Lugmayr et al. 2022, without resampling).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from minidiff.pipelines.checks import check_latents, check_sampling_arguments
from minidiff.pipelines.images import default_size, preprocess_image, preprocess_mask
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline, check_strength
from minidiff.random import randn_tensor


def _size_of(image: Any, name: str) -> tuple[int, int]:
    return default_size(image, None, None, 1, name)


class StableDiffusionInpaintPipeline(StableDiffusionImg2ImgPipeline):
    """Text-guided inpainting with 9-channel or 4-channel UNets."""

    def inpaint_channels(self) -> int:
        """The UNet's input channels: 9 (an inpainting UNet) or 4 (mask blending); others cannot inpaint."""
        channels = self.unet.config.in_channels
        if channels not in (4, 9):
            raise ValueError(f"inpainting needs a UNet with 4 or 9 input channels, this one has {channels}")
        return channels

    def prepare_mask(self, mask: torch.Tensor, masked_image: torch.Tensor, batch: int, generator, do_cfg: bool):
        """Mask resized to latent size (nearest) and masked-image latents, repeated to the (CFG) batch."""
        masked_latents = self.encode_image_latents(masked_image, masked_image.shape[0], generator)
        return self.batch_mask(mask, masked_latents, batch, do_cfg)

    def batch_mask(self, mask: torch.Tensor, masked_latents: torch.Tensor, batch: int, do_cfg: bool):
        """Mask resized to latent size (nearest) and the masked image's latents, repeated to the (CFG) batch."""
        latent_size = (mask.shape[-2] // self.vae_scale_factor, mask.shape[-1] // self.vae_scale_factor)
        mask = F.interpolate(mask, size=latent_size)  # (B, 1, h, w), nearest
        for name, tensor in (("mask_image", mask), ("image", masked_latents)):
            if batch % tensor.shape[0]:
                raise ValueError(f"{tensor.shape[0]} {name} entries cannot be spread over a batch of {batch}")
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
        masked_latents = masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)
        if do_cfg:
            mask, masked_latents = torch.cat([mask] * 2), torch.cat([masked_latents] * 2)
        return mask, masked_latents

    def start_latents(self, pixels, latents, timesteps, batch: int, generator, strength: float, dtype,
                      need_clean: bool):
        """(x_t at the first kept step, the noise in it, the clean image latents or None), drawn in diffusers' order:
        the image latents (if ``need_clean`` or strength < 1), then the noise. Given ``latents`` are the noise."""
        clean = None
        if need_clean or (latents is None and strength < 1.0):
            clean = self.encode_image_latents(pixels.to(dtype), batch, generator)
        height, width = (size // self.vae_scale_factor for size in pixels.shape[-2:])
        shape = (batch, self.vae.config.latent_channels, height, width)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
            if strength == 1.0:
                latents = noise * self.scheduler.init_noise_sigma
            else:
                latents = self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(batch))
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        else:
            noise = latents.to(self.device)
            latents = noise * self.scheduler.init_noise_sigma
        return latents, noise, clean

    def keep_unmasked(self, latents, clean, noise, mask, timesteps, i: int, do_cfg: bool) -> torch.Tensor:
        """4-channel UNets, after step ``i``: the kept region (mask 0) becomes the clean latents noised to the next
        timestep (the clean latents after the last step); the repainted region (mask 1) keeps the denoised latents."""
        keep = clean if i == len(timesteps) - 1 else self.scheduler.add_noise(clean, noise, timesteps[i + 1 : i + 2])
        repaint = mask.chunk(2)[0] if do_cfg else mask  # (B, 1, h, w); the CFG batch holds it twice
        return (1 - repaint) * keep + repaint * latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        cross_attention_kwargs: dict | None = None,
        prompt_weighting: str | None = None,
    ):
        check_strength(strength)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, 0.0, generator)
        check_latents("latents", latents)
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both image and mask_image")
        image_size, mask_size = _size_of(image, "image"), _size_of(mask_image, "mask_image")
        if image_size != mask_size:
            raise ValueError(f"image is {image_size} (h, w) but mask_image is {mask_size}; they must match")
        channels = self.inpaint_channels()
        height, width = self.default_size(height, width)
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip,
                                             cross_attention_kwargs, prompt_weighting)
        self.check_memory(batch, height, width, guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.strength_timesteps(num_inference_steps, strength)
        pixels = preprocess_image(image, height, width, self.vae_scale_factor).to(device)  # (B, 3, H, W) in [-1, 1]
        mask = preprocess_mask(mask_image, height, width).to(device)  # (B, 1, H, W), 1 = repaint
        if pixels.shape[0] != mask.shape[0] and 1 not in (pixels.shape[0], mask.shape[0]):
            raise ValueError(f"image has {pixels.shape[0]} images but mask_image has {mask.shape[0]} masks; "
                             "pass one mask for all images or one per image")

        # Random draws in diffusers' order: image latents (if needed), noise, masked-image latents.
        latents, noise, clean = self.start_latents(pixels, latents, timesteps, batch, generator, strength, text.dtype,
                                                   need_clean=channels == 4)
        masked_image = pixels * (mask < 0.5)
        mask, masked_latents = self.prepare_mask(mask.to(text.dtype), masked_image.to(text.dtype), batch, generator, do_cfg)
        extra = torch.cat([mask, masked_latents], dim=1) if channels == 9 else None
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, text, guidance_scale, extra_channels=extra, step=i,
                                            cross_attention_kwargs=cross_attention_kwargs)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            if channels == 4:  # keep the unmasked region on the original image's noisy trajectory
                latents = self.keep_unmasked(latents, clean, noise, mask, timesteps, i, do_cfg)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text)
        return self.finish(latents, output_type, return_dict)
