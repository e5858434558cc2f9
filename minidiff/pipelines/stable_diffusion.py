"""Stable Diffusion text-to-image (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion").

The pieces every Stable Diffusion pipeline shares live once in ``StableDiffusionBase``: encode the prompt with CLIP,
draw the starting latents, call the UNet with classifier-free guidance, decode latents with the VAE.
``StableDiffusionPipeline.__call__`` is then the sampling loop a reader would write by hand.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidiff.outputs import BaseOutput
from minidiff.pipelines.base import DiffusionPipeline
from minidiff.pipelines.guidance import classifier_free_guidance
from minidiff.pipelines.images import OUTPUT_TYPES, postprocess
from minidiff.random import randn_tensor



@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    images: Any
    nsfw_content_detected: Any = None


def prompt_batch(prompt, prompt_embeds) -> int:
    """Batch size from ``prompt`` (str or list of str) or from precomputed ``prompt_embeds``."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass a prompt (str or list of str) or prompt_embeds")
    if prompt is None:
        return prompt_embeds.shape[0]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")


class StableDiffusionBase(DiffusionPipeline):
    """Components and shared steps of the Stable Diffusion pipelines."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, **ignored: Any) -> None:
        for name in ignored:  # safety_checker / feature_extractor / requires_safety_checker from diffusers code
            if name not in ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker"):
                raise TypeError(f"{type(self).__name__} got an unexpected component {name!r}")
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._normalize_scheduler_config(scheduler)

    @staticmethod
    def _normalize_scheduler_config(scheduler) -> None:
        """As diffusers' pipelines do on construction: old configs with steps_offset != 1 or clip_sample=True are
        corrected (a scheduler assigned later is used as it is, as in diffusers)."""
        config = scheduler.config
        if getattr(config, "steps_offset", 1) != 1:
            config.steps_offset = 1
        if getattr(config, "clip_sample", False):
            config.clip_sample = False

    # ---- text ---------------------------------------------------------------------------------------------------
    def _embed(self, texts: list[str], max_length: int, clip_skip: int | None, device) -> torch.Tensor:
        """Token ids -> CLIP hidden states (B, 77, D); with clip_skip, an earlier layer through the final norm."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        ids = tokens["input_ids"].to(device)
        if clip_skip is None:
            return self.text_encoder(ids, attention_mask=mask)[0]
        hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return self.text_encoder.final_layer_norm(hidden[-(clip_skip + 1)])

    def encode_prompt(
        self,
        prompt,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, 77, D)."""
        device = device or self.device
        batch = prompt_batch(prompt, prompt_embeds)
        max_length = self.tokenizer.model_max_length
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)  # the tokenizer warns about what it cuts
            prompt_embeds = self._embed(texts, max_length, clip_skip, device)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = self._negative_texts(negative_prompt, prompt, batch)
            negative_prompt_embeds = self._embed(negatives, prompt_embeds.shape[1], None, device)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but prompt_embeds has "
                    f"{tuple(prompt_embeds.shape)}; they must match"
                )
        return prompt_embeds, negative_prompt_embeds

    @staticmethod
    def _negative_texts(negative_prompt, prompt, batch: int) -> list[str]:
        if negative_prompt is None:
            return [""] * batch
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch
        if prompt is not None and isinstance(prompt, str):
            raise TypeError("negative_prompt must be a str when prompt is a str (got a list)")
        if len(negative_prompt) != batch:
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch}; they must match")
        return list(negative_prompt)

    def _encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=True,
                       negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None) -> torch.Tensor:
        """The older diffusers API: one tensor, the CFG batch ``cat([negative, positive])``."""
        positive, negative = self.encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                                negative_prompt, prompt_embeds, negative_prompt_embeds)
        return torch.cat([negative, positive]) if do_classifier_free_guidance else positive

    def text_conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          num_images_per_prompt: int, guidance_scale: float, clip_skip: int | None):
        """(text embeddings for the UNet, number of images): with CFG the batch is [negative, positive]."""
        do_cfg = guidance_scale > 1.0
        batch = prompt_batch(prompt, prompt_embeds) * num_images_per_prompt
        positive, negative = self.encode_prompt(prompt, self.device, num_images_per_prompt, do_cfg, negative_prompt,
                                                prompt_embeds, negative_prompt_embeds, clip_skip)
        return (torch.cat([negative, positive]) if do_cfg else positive), batch  # (2B or B, 77, D)

    def after_step(self, callback: Callable | None, i: int, t, latents: torch.Tensor, **tensors) -> torch.Tensor:
        """Call ``callback_on_step_end(pipe, i, t, {"latents": ..., ...})``; it may return replacement latents."""
        if callback is None:
            return latents
        return callback(self, i, t, {"latents": latents, **tensors}).get("latents", latents)

    # ---- latents, UNet, VAE ------------------------------------------------------------------------------------------
    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.unet.config.sample_size
        size_h, size_w = (size, size) if isinstance(size, int) else size
        height = height or size_h * self.vae_scale_factor
        width = width or size_w * self.vae_scale_factor
        if height % 8 or width % 8 or height < 0 or width < 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
        return height, width

    def prepare_latents(self, batch_size: int, num_channels: int, height: int, width: int, dtype, device, generator,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Starting noise (B, C, H/8, W/8), scaled by the scheduler's ``init_noise_sigma``."""
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        return latents.to(device) * self.scheduler.init_noise_sigma

    def step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        """eta and generator go to ``scheduler.step`` only if it takes them (DDIM takes eta; ancestral ones a generator)."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def predict_noise(self, latents, t, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
                      extra_channels: torch.Tensor | None = None) -> torch.Tensor:
        """UNet noise prediction at x_t; with CFG the batch is [uncond, cond] and the halves are combined."""
        do_cfg = guidance_scale > 1.0
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        if extra_channels is not None:  # inpainting UNets: cat([latents, mask, masked image latents], dim=1)
            model_input = torch.cat([model_input, extra_channels], dim=1)
        noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        return classifier_free_guidance(noise_pred, guidance_scale, guidance_rescale) if do_cfg else noise_pred

    def decode_latents(self, latents: torch.Tensor) -> Any:
        """Latents -> numpy images (B, H, W, 3) in [0, 1] (the older diffusers helper)."""
        return postprocess(self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0], "np")

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode (unless ``output_type="latent"``) and package the images."""
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = postprocess(decoded, output_type)
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images, None)

    @staticmethod
    def check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; accepted values: {list(OUTPUT_TYPES)}")

    # ---- memory ----------------------------------------------------------------------------------------------
    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Compute attention in query chunks (the ``chunked`` backend) so memory stays bounded."""
        chunk = None if slice_size in ("auto", "max", None) else int(slice_size)
        self.unet.enable_attention_slicing(chunk)

    def disable_attention_slicing(self) -> None:
        self.unet.disable_attention_slicing()

    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    @classmethod
    def from_single_file(cls, path: str, **kwargs: Any):
        """Load an original (LDM layout) Stable Diffusion checkpoint file, e.g. ``v1-5-pruned-emaonly.safetensors``."""
        from minidiff.loading.single_file import load_pipeline_components

        return cls(**load_pipeline_components(path, **kwargs))


class StableDiffusionPipeline(StableDiffusionBase):
    """Text to image with classifier-free guidance."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
    ):
        height, width = self.default_size(height, width)
        self.check_output_type(output_type)
        device = self.device
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, text.dtype, device,
                                       generator, latents)
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            noise_pred = self.predict_noise(latents, t, text, guidance_scale, guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text)
        return self.finish(latents, output_type, return_dict)
