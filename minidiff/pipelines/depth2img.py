"""Depth-conditioned image to image (Stable Diffusion 2 depth, stabilityai/stable-diffusion-2-depth).

The SD2 depth UNet takes 5 channels, ``cat([x_t, depth], dim=1)``: the noisy latents and the depth of the input image
at latent resolution. The depth map is resized with bicubic interpolation to (H/8, W/8) and min-max normalised per
image to [-1, 1] (as diffusers does), so only relative depth matters. Strength and timesteps are img2img's (SDEdit):
the input image's latents are noised to the first kept timestep and denoised with classifier-free guidance.

The depth comes from ``depth_map=`` (a (B, H', W') tensor, any H', W') or from a ``depth_estimator`` component: any
callable taking the preprocessed image (B, 3, H, W) in [-1, 1] and returning depth (B, H', W') (or an object with a
``predicted_depth`` of that shape, as transformers' DPT returns). diffusers ships DPT (transformers) for this;
minidiff does not load it, so a pipeline folder's ``depth_estimator`` / ``feature_extractor`` entries are skipped.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from minidiff.loading.hub import resolve_folder
from minidiff.pipelines.base import entry_class_name, read_model_index
from minidiff.pipelines.checks import check_finite, check_sampling_arguments
from minidiff.pipelines.ddpm import ImagePipelineOutput
from minidiff.pipelines.images import preprocess_image
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline, check_strength, repeat_to_batch


def normalize_depth(depth: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Depth (B, H', W') -> (B, 1, h, w) at latent size: bicubic resize, then per-image min-max to [-1, 1],
    d' = 2 (d - min d) / (max d - min d) - 1."""
    depth = F.interpolate(depth.unsqueeze(1), size=latent_size, mode="bicubic", align_corners=False)  # (B, 1, h, w)
    low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)  # (B, 1, 1, 1)
    high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    if bool((high == low).any()):
        raise ValueError("depth_map is constant for some image (max == min after resizing to the latent size), so "
                         "it cannot be normalised to [-1, 1]; pass a depth map with varying depth")
    return 2.0 * (depth - low) / (high - low) - 1.0


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """Image to image conditioned on depth, with a 5-channel SD2 depth UNet."""

    component_names = StableDiffusionImg2ImgPipeline.component_names + ("depth_estimator",)
    optional_components = ("depth_estimator",)

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, depth_estimator: Callable | None = None,
                 **ignored: Any) -> None:
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, **ignored)
        if depth_estimator is not None and not callable(depth_estimator):
            raise TypeError(f"depth_estimator must be a callable image (B, 3, H, W) -> depth (B, H', W'), got "
                            f"{type(depth_estimator).__name__}")
        self.depth_estimator = depth_estimator
        self.check_unet_channels()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, variant: str | None = None,
                        **overrides):
        """As ``DiffusionPipeline.from_pretrained``; a folder's ``depth_estimator`` (transformers DPT in diffusers'
        folders) is not loaded: pass ``depth_map=`` to each call, or ``depth_estimator=callable`` here."""
        if "depth_estimator" not in overrides:
            index_path, index = read_model_index(resolve_folder(pretrained_model_name_or_path))
            class_name = entry_class_name(index_path, "depth_estimator", index.get("depth_estimator"))
            if class_name is not None:
                warnings.warn(
                    f"{index_path} lists a depth_estimator ({class_name}); minidiff does not load transformers' depth "
                    "models, so it is skipped: pass depth_map= (a (B, H, W) tensor) to each call, or "
                    "depth_estimator=<callable image -> depth> to from_pretrained", stacklevel=2)
            overrides["depth_estimator"] = None
        return super().from_pretrained(pretrained_model_name_or_path, torch_dtype, variant, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, **options: Any) -> None:
        """The folder diffusers writes; a depth_estimator without ``save_pretrained`` (a plain callable) is not
        saved (its entry is null)."""
        estimator = self.depth_estimator
        if estimator is not None and not hasattr(estimator, "save_pretrained"):
            warnings.warn("depth_estimator is a plain callable and is not saved", stacklevel=2)
            self.depth_estimator = None
        try:
            super().save_pretrained(save_directory, **options)
        finally:
            self.depth_estimator = estimator

    corrects_scheduler_config = False  # as diffusers' pipeline: the scheduler config is used as saved

    def check_unet_channels(self) -> None:
        """The UNet must take the noisy latents and one depth channel, concatenated on channels."""
        latent = self.vae.config.latent_channels
        channels = self.unet.config.in_channels
        if channels != latent + 1:
            raise ValueError(
                f"{type(self).__name__} needs a UNet with {latent + 1} input channels ({latent} noisy latents + 1 "
                f"depth), this one has in_channels={channels}; load a depth checkpoint (e.g. "
                "stabilityai/stable-diffusion-2-depth), or use StableDiffusionImg2ImgPipeline for a "
                f"{latent}-channel UNet"
            )

    def estimate_depth(self, pixels: torch.Tensor, depth_map: torch.Tensor | None) -> torch.Tensor:
        """The depth (B, H', W') to condition on: ``depth_map`` checked, or the depth_estimator's output."""
        if depth_map is None:
            if self.depth_estimator is None:
                raise ValueError("depth2img needs depth: pass depth_map= (a (B, H, W) tensor of depth per pixel) or "
                                 "build the pipeline with a depth_estimator (a callable image (B, 3, H, W) in [-1, 1] "
                                 "-> depth (B, H, W)); minidiff does not ship diffusers' DPT estimator")
            depth_map = self.depth_estimator(pixels)
            depth_map = getattr(depth_map, "predicted_depth", depth_map)  # transformers' DepthEstimatorOutput
            name = "depth_estimator output"
        else:
            name = "depth_map"
        if not isinstance(depth_map, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, W), got {type(depth_map).__name__}")
        if depth_map.ndim != 3:
            fix = {2: "depth_map[None]", 4: "depth_map.squeeze(1)"}.get(depth_map.ndim, "a (B, H, W) tensor")
            raise ValueError(f"{name} has shape {tuple(depth_map.shape)}; expected (B, H, W), one depth value per "
                             f"pixel (any H, W: it is resized to the latent size); pass {fix}")
        return check_finite(depth_map.to(device=pixels.device, dtype=pixels.dtype), name, hint=f"pass a finite {name}")

    def prepare_depth(self, pixels: torch.Tensor, depth_map: torch.Tensor | None, batch: int,
                      do_cfg: bool) -> torch.Tensor:
        """The UNet's depth channel: (B, 1, h, w) in [-1, 1], tiled to the batch, doubled for guidance."""
        latent_size = (pixels.shape[-2] // self.vae_scale_factor, pixels.shape[-1] // self.vae_scale_factor)
        depth = normalize_depth(self.estimate_depth(pixels, depth_map), latent_size)  # (n, 1, h, w)
        depth = repeat_to_batch(depth, batch, "depth_map")  # (B, 1, h, w)
        return torch.cat([depth] * 2) if do_cfg else depth  # CFG batch [uncond, cond]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        depth_map: torch.Tensor | None = None,
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
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
    ):
        check_strength(strength)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, 0.0, generator)
        self.check_unet_channels()
        if image is None:
            raise ValueError("depth2img needs an image (PIL image, numpy array, tensor or file path)")
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip, cross_attention_kwargs)
        pixels = preprocess_image(image, scale=self.vae_scale_factor).to(device=device, dtype=text.dtype)
        depth = self.prepare_depth(pixels, depth_map, batch, do_cfg)  # (2B or B, 1, h, w)
        self.check_memory(batch, pixels.shape[-2], pixels.shape[-1], guidance_scale)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.strength_timesteps(num_inference_steps, strength)
        latents = self.noised_image_latents(pixels, timesteps, batch, generator)  # (B, 4, h, w)
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, text, guidance_scale, extra_channels=depth, step=i,
                                            cross_attention_kwargs=cross_attention_kwargs)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text, depth_mask=depth)
        images = self.finish(latents, output_type, return_dict=True).images
        return ImagePipelineOutput(images=images) if return_dict else (images,)
