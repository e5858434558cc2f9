"""Image to image with ControlNet: the SDEdit loop of img2img.py (Meng et al. 2022) with the ControlNet residuals of
controlnet.py (Zhang, Rao & Agrawala 2023, Eq. 2) added to the UNet at every step.

Two images: ``image`` is the init image (VAE-encoded, then noised to the first kept timestep by
``scheduler.add_noise``, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, DDPM Eq. 4) and ``control_image`` is the
condition c (edges, depth, ...; one per ControlNet with several). Only the last ``int(N * strength)`` of the N
timesteps run, and the ControlNet windows (control_guidance_start / end) are fractions of those kept steps, as in
diffusers. Both images are resized to (height, width) when given; otherwise each keeps its own size (floored to a
multiple of the VAE's factor), and the two sizes must agree.

The inpaint variant adds ``mask_image`` (white = repaint) and follows inpaint.py: a 9-channel inpainting UNet sees
``cat([x_t, mask, latents of the masked image])`` while the ControlNets see x_t alone; a 4-channel UNet denoises
everywhere and after each step the kept region is replaced by the init latents noised to the next timestep.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from minidiff.pipelines.checks import check_latents, check_sampling_arguments, check_size
from minidiff.pipelines.controlnet import StableDiffusionControlNetPipeline, control_keep
from minidiff.pipelines.images import default_size, preprocess_image, preprocess_mask
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline, check_strength
from minidiff.pipelines.inpaint import StableDiffusionInpaintPipeline
from minidiff.pipelines.stable_diffusion import prompt_batch


def check_same_size(image: torch.Tensor, conds: list[torch.Tensor], name: str = "image") -> None:
    """The init image (B, 3, H, W) and the condition images (B', C, H', W') must share (H, W) = (H', W')."""
    size, cond_size = tuple(image.shape[-2:]), tuple(conds[0].shape[-2:])
    if size != cond_size:
        raise ValueError(f"{name} is {size[0]}x{size[1]} but control_image is {cond_size[0]}x{cond_size[1]} "
                         "(after flooring to a multiple of the VAE's factor); pass height= and width= (both are then "
                         f"resized to them) or a control_image of the {name}'s size")


class StableDiffusionControlNetImg2ImgPipeline(StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline):
    """Text-guided image to image controlled by one ControlNet, or several (pass a list: residuals summed).

    The ControlNet parts (components, condition images, residuals) come from StableDiffusionControlNetPipeline,
    the strength schedule and the noised init latents from StableDiffusionImg2ImgPipeline."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
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
        cross_attention_kwargs: dict | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
    ):
        check_size("height", height)
        check_size("width", width)
        check_strength(strength)
        check_latents("latents", latents)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, 0.0, generator)
        scales, starts, ends, guess_mode = self._control_options(controlnet_conditioning_scale, guess_mode,
                                                                 control_guidance_start, control_guidance_end)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image=: the init image (PIL image, numpy array, tensor "
                             "or file path) that strength noises; the condition goes in control_image=")
        self.images_per_net(control_image, "control_image")  # a missing control image is reported before any work
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip, cross_attention_kwargs)
        pixels = preprocess_image(image, height, width, self.vae_scale_factor)  # (n, 3, H, W) in [-1, 1]
        pixels = pixels.to(device=device, dtype=text.dtype)
        conds = self.prepare_control_images(control_image, height, width, batch, prompt_batch(prompt, prompt_embeds),
                                            do_cfg and not guess_mode, "control_image")  # each (B or 2B, C, H, W)
        check_same_size(pixels, conds)
        height, width = pixels.shape[-2:]
        self.check_latent_size(latents, height, width)
        self.check_memory(batch, height, width, guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.strength_timesteps(num_inference_steps, strength)
        if latents is None:
            latents = self.noised_image_latents(pixels, timesteps, batch, generator)  # (B, 4, H/8, W/8)
        else:  # given latents are x_t at the first kept step, used as they are (as diffusers does)
            latents = latents.to(device=device, dtype=text.dtype)
        step_kwargs = self.step_kwargs(generator, eta)
        keep = control_keep(len(timesteps), starts, ends)  # (kept steps, nets) of 0.0 / 1.0

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.controlled_noise(latents, t, text, conds, scales, keep[i], guess_mode, guidance_scale, i,
                                               cross_attention_kwargs)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text, control_image=conds)
        return self.finish(latents, output_type, return_dict)


class StableDiffusionControlNetInpaintPipeline(StableDiffusionControlNetPipeline, StableDiffusionInpaintPipeline):
    """Text-guided inpainting (4- or 9-channel UNets) controlled by one ControlNet, or several.

    The ControlNet parts come from StableDiffusionControlNetPipeline; the start latents, mask latents and the
    4-channel blend from StableDiffusionInpaintPipeline."""

    def control_input_channels(self) -> int:
        """The ControlNets see x_t alone: the VAE's latent channels (4), also with a 9-channel inpainting UNet."""
        return self.vae.config.latent_channels

    def inpaint_pixels(self, image: Any, mask_image: Any, height: int | None, width: int | None):
        """(init image (n, 3, H, W) in [-1, 1], mask (m, 1, H, W) of 0 / 1, 1 = repaint): each at (height, width),
        else at its own size floored to a multiple of the VAE's factor (as diffusers); the two sizes must agree."""
        if image is None or mask_image is None:
            missing = " and ".join(name for name, value in (("image", image), ("mask_image", mask_image))
                                   if value is None)
            raise ValueError(f"{type(self).__name__} needs {missing}=: the init image and the mask (white = "
                             "repaint); the condition goes in control_image=")
        image_size = default_size(image, height, width, self.vae_scale_factor, "image")
        mask_size = default_size(mask_image, height, width, self.vae_scale_factor, "mask_image")
        if image_size != mask_size:
            raise ValueError(f"image is {image_size[0]}x{image_size[1]} but mask_image is {mask_size[0]}x"
                             f"{mask_size[1]}; pass height= and width= (both are then resized to them) or a mask of "
                             "the image's size")
        pixels = preprocess_image(image, *image_size, self.vae_scale_factor)  # (n, 3, H, W)
        mask = preprocess_mask(mask_image, *image_size)  # (m, 1, H, W)
        if pixels.shape[0] != mask.shape[0] and 1 not in (pixels.shape[0], mask.shape[0]):
            raise ValueError(f"image has {pixels.shape[0]} images but mask_image has {mask.shape[0]} masks; "
                             "pass one mask for all images or one per image")
        return pixels, mask

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        control_image: Any = None,
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
        cross_attention_kwargs: dict | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
    ):
        check_size("height", height)
        check_size("width", width)
        check_strength(strength)
        check_latents("latents", latents)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, 0.0, generator)
        scales, starts, ends, guess_mode = self._control_options(controlnet_conditioning_scale, guess_mode,
                                                                 control_guidance_start, control_guidance_end)
        channels = self.inpaint_channels()
        pixels, mask = self.inpaint_pixels(image, mask_image, height, width)
        self.images_per_net(control_image, "control_image")  # a missing control image is reported before any work
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip, cross_attention_kwargs)
        conds = self.prepare_control_images(control_image, height, width, batch, prompt_batch(prompt, prompt_embeds),
                                            do_cfg and not guess_mode, "control_image")  # each (B or 2B, C, H, W)
        check_same_size(pixels, conds)
        height, width = pixels.shape[-2:]
        self.check_latent_size(latents, height, width)
        self.check_memory(batch, height, width, guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.strength_timesteps(num_inference_steps, strength)
        pixels, mask = pixels.to(device), mask.to(device)
        # Random draws in diffusers' order: image latents (if needed), noise, masked-image latents.
        latents, noise, clean = self.start_latents(pixels, latents, timesteps, batch, generator, strength, text.dtype,
                                                   need_clean=channels == 4)
        masked_image = pixels * (mask < 0.5)  # (n, 3, H, W), the repainted region zeroed
        mask, masked_latents = self.prepare_mask(mask.to(text.dtype), masked_image.to(text.dtype), batch, generator,
                                                 do_cfg)  # (B or 2B, 1, h, w), (B or 2B, 4, h, w)
        extra = torch.cat([mask, masked_latents], dim=1) if channels == 9 else None
        step_kwargs = self.step_kwargs(generator, eta)
        keep = control_keep(len(timesteps), starts, ends)  # (kept steps, nets) of 0.0 / 1.0

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.controlled_noise(latents, t, text, conds, scales, keep[i], guess_mode, guidance_scale, i,
                                               cross_attention_kwargs, extra)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            if channels == 4:  # keep the unmasked region on the init image's noisy trajectory
                latents = self.keep_unmasked(latents, clean, noise, mask, timesteps, i, do_cfg)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text, control_image=conds)
        return self.finish(latents, output_type, return_dict)
