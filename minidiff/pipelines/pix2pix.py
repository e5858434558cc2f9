"""InstructPix2Pix (Brooks et al. 2023, "InstructPix2Pix: Learning to Follow Image Editing Instructions").

The prompt is an edit instruction ("make it snowy") and the input image is a second condition. The UNet takes
8 channels, ``cat([x_t, z_image], dim=1)``, where ``z_image`` is the mode (mean) of the VAE posterior of the input
image, not scaled by the VAE's scaling factor (as the model was trained and as diffusers feeds it).

Guidance is classifier-free over two conditions at once (Eq. 3): the UNet runs on the batch
[text + image, image only, neither] (diffusers' order; "neither" has the empty prompt and zero image latents) and

    eps = eps(∅, ∅) + s_T (eps(I, T) - eps(I, ∅)) + s_I (eps(I, ∅) - eps(∅, ∅))

with ``s_T = guidance_scale`` and ``s_I = image_guidance_scale``. As in diffusers, guidance runs only when
``guidance_scale > 1``; then ``image_guidance_scale = 1`` means no extra pull towards the input image.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from minidiff.pipelines.checks import MAX_GUIDANCE_SCALE, check_finite, check_number, check_sampling_arguments
from minidiff.pipelines.images import preprocess_image
from minidiff.pipelines.img2img import repeat_to_batch
from minidiff.pipelines.stable_diffusion import StableDiffusionBase


def instruct_pix2pix_guidance(noise_pred: torch.Tensor, guidance_scale: float,
                              image_guidance_scale: float) -> torch.Tensor:
    """Split the (3B, ...) prediction into [text + image, image only, neither] and combine them (Brooks et al. 2023,
    Eq. 3): eps_u + s_T (eps_ti - eps_i) + s_I (eps_i - eps_u)."""
    text_and_image, image_only, neither = noise_pred.chunk(3)  # 3 x (B, 4, h, w)
    return (neither + guidance_scale * (text_and_image - image_only)
            + image_guidance_scale * (image_only - neither))


def check_image_guidance_scale(image_guidance_scale: Any) -> float:
    value = check_number("image_guidance_scale", image_guidance_scale, high=MAX_GUIDANCE_SCALE)
    if value < 1.0:
        raise ValueError(
            f"image_guidance_scale={value:g} is below 1. It weighs how closely the edit follows the input image "
            "(Brooks et al. 2023, Eq. 3): 1 adds no image guidance, larger values (typically 1-2) keep more of the "
            "image; values below 1 would push the result away from it (diffusers then silently disables all "
            "guidance). Pass image_guidance_scale >= 1"
        )
    return value


class StableDiffusionInstructPix2PixPipeline(StableDiffusionBase):
    """Edit an image by an instruction with an 8-channel InstructPix2Pix UNet (e.g. timbrooks/instruct-pix2pix)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, **ignored: Any) -> None:
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, **ignored)
        self.check_unet_channels()

    corrects_scheduler_config = False  # as diffusers' pipeline: the scheduler config is used as saved
    guided_copies = 3  # [text + image, image only, neither]

    def check_unet_channels(self) -> None:
        """The UNet must take the noisy latents and the image latents, concatenated on channels."""
        latent = self.vae.config.latent_channels
        channels = self.unet.config.in_channels
        if channels != 2 * latent:
            raise ValueError(
                f"{type(self).__name__} needs a UNet with {2 * latent} input channels ({latent} noisy latents + "
                f"{latent} input-image latents), this one has in_channels={channels}; load an InstructPix2Pix "
                "checkpoint (e.g. timbrooks/instruct-pix2pix), or use StableDiffusionImg2ImgPipeline for a "
                f"{latent}-channel UNet"
            )

    def prepare_image_latents(self, pixels: torch.Tensor, batch: int, do_cfg: bool) -> torch.Tensor:
        """The input image's latents: the posterior's mode, unscaled (as diffusers), tiled to the batch; with
        guidance (3B, 4, h, w) in the order [text + image, image only, neither] = [z, z, 0]."""
        latents = self.vae.encode(pixels).latent_dist.mode()  # (n, 4, H/8, W/8), n input images
        latents = repeat_to_batch(latents, batch, "image")  # (B, 4, h, w)
        if do_cfg:
            latents = torch.cat([latents, latents, torch.zeros_like(latents)])  # (3B, 4, h, w)
        return latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        cross_attention_kwargs: dict | None = None,
    ):
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, 0.0, generator)
        check_image_guidance_scale(image_guidance_scale)
        self.check_unet_channels()
        if image is None:
            raise ValueError("InstructPix2Pix needs the image to edit: pass image= (PIL image, numpy array, tensor "
                             "or file path, or a list of them)")
        device, do_cfg = self.device, guidance_scale > 1.0
        positive, negative = self.encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt,
                                                prompt_embeds, negative_prompt_embeds,
                                                self.text_lora_scale(cross_attention_kwargs))
        text = torch.cat([positive, negative, negative]) if do_cfg else positive  # (3B or B, 77, D)
        batch = positive.shape[0]
        pixels = preprocess_image(image, scale=self.vae_scale_factor).to(device=device, dtype=text.dtype)
        self.check_memory(batch, pixels.shape[-2], pixels.shape[-1], guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        image_latents = self.prepare_image_latents(pixels, batch, do_cfg)  # (3B or B, 4, h, w)
        latents = self.prepare_latents(batch, self.vae.config.latent_channels, pixels.shape[-2], pixels.shape[-1],
                                       text.dtype, device, generator, latents)
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 3) if do_cfg else latents  # (3B, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latents], dim=1)  # (3B, 8, h, w)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=text,
                                   cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            check_finite(noise_pred, f"UNet output at step {i} (t={int(t)})")
            if do_cfg:
                noise_pred = instruct_pix2pix_guidance(noise_pred, guidance_scale, image_guidance_scale)  # (B, ...)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text,
                                      image_latents=image_latents)
        return self.finish(latents, output_type, return_dict)
