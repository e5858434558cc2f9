"""Stable Diffusion text-to-image (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion").

The pieces every Stable Diffusion pipeline shares live once in ``StableDiffusionBase``: encode the prompt with CLIP,
draw the starting latents, call the UNet with classifier-free guidance, decode latents with the VAE.
``StableDiffusionPipeline.__call__`` is then the sampling loop a reader would write by hand.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidiff.adapters.lora import scaled_lora
from minidiff.adapters.lora_loader import StableDiffusionLoraLoaderMixin
from minidiff.adapters.textual_inversion import TextualInversionLoaderMixin
from minidiff.models.embeddings import guidance_scale_embedding
from minidiff.outputs import BaseOutput
from minidiff.pipelines.base import DiffusionPipeline
from minidiff.pipelines.checks import (
    check_callback_result, check_clip_skip, check_embeds, check_finite, check_latents, check_prompt_text,
    check_sampling_arguments, check_size, warn_once,
)
from minidiff.pipelines.guidance import classifier_free_guidance
from minidiff.pipelines.images import OUTPUT_TYPES, postprocess
from minidiff.pipelines.memory import check_activation_memory
from minidiff.random import randn_tensor
from minidiff.text.weighting import check_prompt_weighting, weighted_prompt_embeds


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
    check_prompt_text("prompt", prompt)
    return 1 if isinstance(prompt, str) else len(prompt)


class StableDiffusionBase(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """Components and shared steps of the Stable Diffusion pipelines."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, **ignored: Any) -> None:
        for name in ignored:  # safety_checker / feature_extractor / requires_safety_checker from diffusers code
            if name not in ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker"):
                raise TypeError(f"{type(self).__name__} got an unexpected component {name!r}")
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            raise ValueError(f"{type(self).__name__} got an SDXL UNet (addition_embed_type='text_time', it needs "
                             "pooled text and size conditioning); load the folder with StableDiffusionXLPipeline (or "
                             "the SDXL img2img/inpaint pipelines)")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.corrects_scheduler_config:
            self._normalize_scheduler_config(scheduler)
        if tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
            warnings.warn(f"tokenizer.model_max_length is {tokenizer.model_max_length} but the text encoder has "
                          f"{text_encoder.config.max_position_embeddings} positions (max_position_embeddings); "
                          f"prompts are padded and truncated to {self.prompt_length} tokens", stacklevel=2)

    @property
    def prompt_length(self) -> int:
        """Tokens per prompt: the tokenizer's model_max_length, bounded by the text encoder's positions."""
        return min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    # diffusers' depth2img and InstructPix2Pix pipelines use the scheduler config as saved; the others correct it
    corrects_scheduler_config = True

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
    def _embed(self, texts: list[str], max_length: int, clip_skip: int | None, device,
               prompt_weighting: str | None = None) -> torch.Tensor:
        """Prompt texts -> CLIP hidden states (B, max_length, D). With ``prompt_weighting`` the weights are read from
        the text (minidiff.text.weighting): (B, 77, D) for compel, (B, 77·k, D) for A1111, k >= max_length / 77."""
        if prompt_weighting is not None:
            def encode(ids, mask):
                return self._encode_ids(ids, mask, clip_skip, device)

            return weighted_prompt_embeds(texts, prompt_weighting, self.tokenizer, encode, self.prompt_length, max_length,
                                          convert=lambda text: self.maybe_convert_prompt(text, self.tokenizer))
        texts = self.maybe_convert_prompt(texts, self.tokenizer)  # textual-inversion tokens -> their vectors' tokens
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        mask = tokens["attention_mask"] if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self._encode_ids(tokens["input_ids"], mask, clip_skip, device)

    def _encode_ids(self, ids: torch.Tensor, mask: torch.Tensor | None, clip_skip: int | None, device) -> torch.Tensor:
        """Token ids (B, N) -> CLIP hidden states (B, N, D); with clip_skip, an earlier layer through the final norm."""
        ids = ids.to(device)
        mask = None if mask is None else mask.to(device)
        if clip_skip is None:
            embeds = self.text_encoder(ids, attention_mask=mask)[0]
        else:
            hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
            embeds = self.text_encoder.final_layer_norm(hidden[-(clip_skip + 1)])
        return check_finite(embeds, "text encoder output", hint="check the text encoder weights")

    def encode_prompt(
        self,
        prompt,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, 77, D).
        ``lora_scale`` scales the text encoder's LoRA adapters for this call; ``prompt_weighting`` ("compel" or
        "a1111") reads weights from the prompt text (None: the text is used as it is, as in diffusers)."""
        device = device or self.device
        check_prompt_weighting(prompt_weighting)
        self._check_text_inputs(negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        batch = prompt_batch(prompt, prompt_embeds)
        max_length = self.prompt_length
        negatives = self._negative_texts(negative_prompt, prompt, batch)  # checked with or without guidance
        if not do_classifier_free_guidance and (negative_prompt is not None or negative_prompt_embeds is not None):
            warn_once("negative prompt without guidance",
                      "the negative prompt is ignored: guidance_scale <= 1 turns classifier-free guidance off (as "
                      "LCM and Turbo samplers are run); use guidance_scale > 1 for it to count")
        with scaled_lora(self.text_encoder, lora_scale):
            texts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
            if prompt_embeds is None:  # the tokenizer warns about what it cuts
                prompt_embeds = self._embed(texts, max_length, clip_skip, device, prompt_weighting)
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negative_prompt_embeds = self._embed(negatives, prompt_embeds.shape[1], None, device, prompt_weighting)
                if texts is not None and negative_prompt_embeds.shape[1] > prompt_embeds.shape[1]:
                    # A1111: a negative prompt of more 77-token chunks than the prompt; the prompt gets empty ones
                    prompt_embeds = self._embed(texts, negative_prompt_embeds.shape[1], clip_skip, device,
                                                prompt_weighting)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but prompt_embeds has "
                    f"{tuple(prompt_embeds.shape)}; they must match"
                )
        return prompt_embeds, negative_prompt_embeds

    def _check_text_inputs(self, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip) -> None:
        check_prompt_text("negative_prompt", negative_prompt)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        width = self.unet.config.cross_attention_dim
        check_embeds("prompt_embeds", prompt_embeds, width)
        check_embeds("negative_prompt_embeds", negative_prompt_embeds, width)
        check_clip_skip(clip_skip, self.text_encoder.config.num_hidden_layers)

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

    @staticmethod
    def text_lora_scale(cross_attention_kwargs: dict | None) -> float | None:
        """The LoRA ``scale`` of ``cross_attention_kwargs``, which the text encoders take too (as in diffusers)."""
        return cross_attention_kwargs.get("scale") if isinstance(cross_attention_kwargs, dict) else None

    def text_conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          num_images_per_prompt: int, guidance_scale: float, clip_skip: int | None,
                          cross_attention_kwargs: dict | None = None, prompt_weighting: str | None = None):
        """(text embeddings for the UNet, number of images): with CFG the batch is [negative, positive].
        The LoRA ``scale`` in ``cross_attention_kwargs`` applies to the text encoder too, as in diffusers."""
        do_cfg = self.uses_cfg(guidance_scale)
        lora_scale = self.text_lora_scale(cross_attention_kwargs)
        positive, negative = self.encode_prompt(prompt, self.device, num_images_per_prompt, do_cfg, negative_prompt,
                                                prompt_embeds, negative_prompt_embeds, lora_scale, clip_skip,
                                                prompt_weighting)
        return (torch.cat([negative, positive]) if do_cfg else positive), positive.shape[0]  # (2B or B, 77, D)

    def after_step(self, callback: Callable | None, i: int, t, latents: torch.Tensor, **tensors) -> torch.Tensor:
        """Call ``callback_on_step_end(pipe, i, t, {"latents": ..., ...})``; it may return replacement latents."""
        if callback is None:
            return latents
        return check_callback_result(callback(self, i, t, {"latents": latents, **tensors}), latents, i)

    # ---- latents, UNet, VAE ------------------------------------------------------------------------------------------
    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width): each the UNet's sample size in pixels when None, else a positive multiple of 8."""
        check_size("height", height)
        check_size("width", width)
        size = self.unet.config.sample_size
        size_h, size_w = (size, size) if isinstance(size, int) else size
        height = size_h * self.vae_scale_factor if height is None else height
        width = size_w * self.vae_scale_factor if width is None else width
        return height, width

    guided_copies = 2  # UNet inputs per image with guidance: [uncond, cond]

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Classifier-free guidance runs for ``guidance_scale > 1``, except with an LCM-distilled UNet
        (``time_cond_proj_dim``), which takes the scale as an embedding instead (as diffusers)."""
        return guidance_scale > 1.0 and self._guidance_embedding_dim() is None

    def guidance_condition(self, guidance_scale: float, model_input: torch.Tensor) -> torch.Tensor | None:
        """An LCM-distilled UNet's ``timestep_cond``: the embedding of w = guidance_scale - 1 per row of
        ``model_input`` (diffusers' convention); None for other UNets."""
        dim = self._guidance_embedding_dim()
        if dim is None:
            return None
        w = torch.full((model_input.shape[0],), guidance_scale - 1.0)
        return guidance_scale_embedding(w, dim).to(device=model_input.device, dtype=model_input.dtype)

    get_guidance_scale_embedding = staticmethod(guidance_scale_embedding)  # diffusers' name

    def _guidance_embedding_dim(self) -> int | None:
        return getattr(self.unet.config, "time_cond_proj_dim", None)  # a stand-in UNet may lack the key

    def check_memory(self, batch: int, height: int, width: int, guidance_scale: float) -> None:
        """Refuse (before any work) a size whose estimated activation memory exceeds the available memory."""
        copies = self.guided_copies if self.uses_cfg(guidance_scale) else 1
        check_activation_memory(self.unet, self.vae, batch, height, width, copies, self.device)

    def prepare_latents(self, batch_size: int, num_channels: int, height: int, width: int, dtype, device, generator,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Starting noise (B, C, H/8, W/8), scaled by the scheduler's ``init_noise_sigma``."""
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")
        check_latents("latents", latents)
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
        elif eta != 0:
            name = type(self.scheduler).__name__
            warn_once(f"eta with {name}", f"eta={eta} is ignored: {name}.step takes no eta (DDIM and TCD do); "
                                          "leave eta at 0 or use DDIMScheduler")
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def predict_noise(self, latents, t, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
                      extra_channels: torch.Tensor | None = None, step: int = 0,
                      cross_attention_kwargs: dict | None = None,
                      added_cond_kwargs: dict | None = None,
                      down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                      mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """UNet noise prediction at x_t; with CFG the batch is [uncond, cond] and the halves are combined.
        ``added_cond_kwargs`` (SDXL: pooled text and time ids, batched like ``prompt_embeds``) go to the UNet, and
        so do ControlNet residuals (``down_block_additional_residuals``, ``mid_block_additional_residual``,
        batched like the UNet's input). ``step`` (the loop index) only names the step in the error raised for a
        NaN/Inf prediction."""
        do_cfg = self.uses_cfg(guidance_scale)
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        if extra_channels is not None:  # inpainting UNets: cat([latents, mask, masked image latents], dim=1)
            model_input = torch.cat([model_input, extra_channels], dim=1)
        added = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            added.update(down_block_additional_residuals=down_block_additional_residuals,
                         mid_block_additional_residual=mid_block_additional_residual)
        timestep_cond = self.guidance_condition(guidance_scale, model_input)
        if timestep_cond is not None:
            added["timestep_cond"] = timestep_cond
        noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                               cross_attention_kwargs=cross_attention_kwargs, return_dict=False, **added)[0]
        check_finite(noise_pred, f"UNet output at step {step} (t={int(t)})")
        return classifier_free_guidance(noise_pred, guidance_scale, guidance_rescale) if do_cfg else noise_pred

    def scheduler_step(self, noise_pred, t, latents, step: int, scheduler=None, **step_kwargs) -> torch.Tensor:
        """``scheduler.step(...).prev_sample`` (the pipeline's scheduler unless given), checked for NaN/Inf."""
        scheduler = scheduler or self.scheduler
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        return check_finite(latents, f"latents after scheduler step {step} (t={int(t)})")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> VAE output (B, 3, H, W) in about [-1, 1], checked for NaN/Inf."""
        decoded = self.vae.decode(self.unscale_latents(latents), return_dict=False)[0]
        return check_finite(decoded, "VAE decode output", hint="check the VAE weights and dtype")

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> the VAE decoder's input: divided by the VAE's ``scaling_factor``."""
        return latents / self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> Any:
        """Latents -> numpy images (B, H, W, 3) in [0, 1] (the older diffusers helper)."""
        return postprocess(self.decode(latents), "np")

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Decode (unless ``output_type="latent"``) and package the images."""
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images, None)

    @staticmethod
    def check_output_type(output_type: str) -> None:
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; accepted values: {list(OUTPUT_TYPES)}")

    # ---- memory ----------------------------------------------------------------------------------------------
    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    @classmethod
    def from_single_file(cls, path: str, **kwargs: Any):
        """Load an original (LDM / SGM layout) Stable Diffusion checkpoint file, e.g.
        ``v1-5-pruned-emaonly.safetensors`` or ``sd_xl_base_1.0.safetensors``; an SDXL file given to an SD 1/2
        pipeline (or the reverse) is a ValueError naming the class to use."""
        from minidiff.loading.single_file import load_pipeline_components

        return cls(**load_pipeline_components(path, pipeline_class=cls, **kwargs))


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
        cross_attention_kwargs: dict | None = None,
        prompt_weighting: str | None = None,
    ):
        height, width = self.default_size(height, width)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, guidance_rescale,
                                 generator)
        device = self.device
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip,
                                             cross_attention_kwargs, prompt_weighting)
        self.check_memory(batch, height, width, guidance_scale)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, text.dtype, device,
                                       generator, latents)
        step_kwargs = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            noise_pred = self.predict_noise(latents, t, text, guidance_scale, guidance_rescale, step=i,
                                            cross_attention_kwargs=cross_attention_kwargs)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text)
        return self.finish(latents, output_type, return_dict)
