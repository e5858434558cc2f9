"""Stable Diffusion XL text to image (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis").

SDXL is the Stable Diffusion pipeline with three additions, each a small piece of ``StableDiffusionXLBase``:
- two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, Sec. 2.1): their penultimate hidden states are concatenated
  on the feature axis, and the second one's pooled, projected embedding conditions the UNet as well;
- micro-conditioning (Sec. 2.2): the original image size, the crop's top-left corner and the target size (for the
  refiner: the aesthetic score instead of the target size) reach the UNet as "time ids", embedded like timesteps;
- refinement (Sec. 2.5): the base stops at ``denoising_end`` and hands its latents (``output_type="latent"``) to the
  img2img pipeline, which continues at ``denoising_start`` with the refiner UNet.

SDXL-Turbo (Sauer et al. 2023, "Adversarial Diffusion Distillation") is this pipeline run for 1-4 steps with
``EulerAncestralDiscreteScheduler(timestep_spacing="trailing")`` and ``guidance_scale=0.0``.

Where diffusers 0.42 silently drops a value, minidiff uses it (each documented where it happens): a negative size
or crop defaults to its positive value and is always used; the CFG batch of time ids is [negatives, positives] for
every batch size; ``prompt_2`` / ``negative_prompt_2`` given to a pipeline without the first text encoder are refused;
a ``negative_prompt_2`` given alone is encoded (diffusers' ``force_zeros_for_empty_prompt`` zeroes the negatives
whenever ``negative_prompt`` is None).
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidiff.adapters.lora import scaled_lora
from minidiff.outputs import BaseOutput
from minidiff.pipelines.base import DiffusionPipeline
from minidiff.pipelines.checks import (
    check_clip_skip, check_embeds, check_finite, check_callback_result, check_number, check_prompt_text,
    check_sampling_arguments,
)
from minidiff.pipelines.stable_diffusion import StableDiffusionBase, prompt_batch

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")


@dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    images: Any


@contextlib.contextmanager
def float32_vae(vae, upcast: bool):
    """Run ``vae`` in float32 inside the block when ``upcast`` (SDXL's VAE overflows in float16: ``force_upcast``)."""
    dtype = vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype)


def check_pair(name: str, value: Any) -> tuple | None:
    """None, or a (height, width) / (top, left) pair of ints, returned as a tuple."""
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be a pair of ints such as (1024, 1024) (height, width; for crops (top, left)), "
                        f"got {value!r}")
    return tuple(int(v) for v in value)


def check_fraction(name: str, value: Any) -> None:
    """``denoising_start`` / ``denoising_end``: None or a fraction of the schedule strictly between 0 and 1."""
    if value is None:
        return
    check_number(name, value, low=0.0, high=1.0)
    if value in (0.0, 1.0):
        raise ValueError(f"{name}={value}: pass a fraction strictly between 0 and 1 (e.g. 0.8), or None to run "
                         "the whole schedule")


def check_tensor_inputs(names: Any) -> None:
    if not isinstance(names, (list, tuple)) or not all(name in CALLBACK_TENSOR_INPUTS for name in names):
        raise ValueError(f"callback_on_step_end_tensor_inputs={names!r}: pass a list of names from "
                         f"{list(CALLBACK_TENSOR_INPUTS)}")


def timestep_cutoff(scheduler, fraction: float) -> int:
    """The training timestep that splits the schedule at ``fraction`` of the denoising: round(T - fraction * T)."""
    steps = scheduler.config.num_train_timesteps
    return int(round(steps - fraction * steps))


def stop_early(timesteps: torch.Tensor, scheduler, denoising_end: float | None) -> torch.Tensor:
    """The timesteps the base runs when it hands over to a refiner after ``denoising_end`` of the denoising
    (Podell et al. 2023, Sec. 2.5): those at or above the cutoff."""
    if denoising_end is None:
        return timesteps
    kept = int((timesteps >= timestep_cutoff(scheduler, denoising_end)).sum())
    if kept == 0:
        raise ValueError(f"denoising_end={denoising_end} stops before the first of the {len(timesteps)} timesteps; "
                         "raise denoising_end or num_inference_steps")
    return timesteps[:kept]


class StableDiffusionXLBase(StableDiffusionBase):
    """Components and shared steps of the SDXL pipelines (on top of the Stable Diffusion ones)."""

    component_names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    optional_components = ("text_encoder", "tokenizer")  # the refiner has only the second text encoder
    config_names = ("force_zeros_for_empty_prompt",)  # pipeline-level values of model_index.json

    def __init__(self, vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=None,
                 scheduler=None, image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None) -> None:
        # image_encoder / feature_extractor (IP-Adapter inputs in diffusers) are accepted and not used
        name = type(self).__name__
        self._check_text_components(text_encoder, text_encoder_2, tokenizer, tokenizer_2)
        if add_watermarker:
            raise ValueError(f"{name}: minidiff does not apply SDXL's invisible watermark (diffusers adds it only when "
                             "the invisible-watermark package is installed); pass add_watermarker=None or False")
        if not isinstance(force_zeros_for_empty_prompt, bool):
            raise TypeError(f"force_zeros_for_empty_prompt must be True or False, got {force_zeros_for_empty_prompt!r}")
        # Not StableDiffusionBase.__init__: other components, and diffusers' SDXL pipelines keep the scheduler
        # config as it is (no steps_offset / clip_sample correction).
        DiffusionPipeline.__init__(self, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                   tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        embed_type = getattr(unet.config, "addition_embed_type", None)
        if embed_type != "text_time":
            raise ValueError(f"{name} needs an SDXL UNet (addition_embed_type='text_time'); this one has "
                             f"addition_embed_type={embed_type!r} (an SD 1.x/2.x UNet): use StableDiffusionPipeline")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def _check_text_components(self, text_encoder, text_encoder_2, tokenizer, tokenizer_2) -> None:
        name = type(self).__name__
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError(f"{name} needs text_encoder_2 (a CLIPTextModelWithProjection: the pooled text embedding "
                             "comes from it) and tokenizer_2; load them from the folder's text_encoder_2/ and "
                             "tokenizer_2/ or pass them")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError(f"{name}: pass text_encoder and tokenizer together (SDXL base) or neither (a refiner, "
                             "which has only text_encoder_2 and tokenizer_2)")

    # ---- text ---------------------------------------------------------------------------------------------------
    def _text_towers(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in use: both for the base, only the second one for a refiner."""
        towers = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tokenizer, encoder) for tokenizer, encoder in towers if encoder is not None]

    def _embed_texts(self, texts_per_tower: list[list[str]], clip_skip: int | None, device,
                     max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of every tower concatenated on the feature axis, the pooled embedding): each tower's
        penultimate layer (clip_skip k: the layer k before it); the pooled one is text_encoder_2's ``text_embeds``."""
        hidden_states, pooled = [], None
        for texts, (tokenizer, encoder) in zip(texts_per_tower, self._text_towers()):
            texts = self.maybe_convert_prompt(texts, tokenizer)  # textual-inversion tokens -> their vectors' tokens
            ids = tokenizer(texts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(device), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:  # CLIPTextModelWithProjection: [0] is text_embeds (B, P)
                pooled = output[0]
            hidden_states.append(output.hidden_states[-(clip_skip or 0) - 2])
        embeds = torch.cat(hidden_states, dim=-1)  # (B, 77, 768) + (B, 77, 1280) -> (B, 77, 2048)
        return check_finite(embeds, "text encoder output", hint="check the text encoder weights"), pooled

    def _prompt_texts(self, prompt, prompt_2, batch: int) -> list[list[str]]:
        """The texts for each tower: prompt for the first, prompt_2 (default: prompt) for the second."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if self.text_encoder is None:
            return [texts]
        texts_2 = texts if not prompt_2 else [prompt_2] * batch if isinstance(prompt_2, str) else list(prompt_2)
        if len(texts_2) != batch:
            raise ValueError(f"prompt_2 has {len(texts_2)} entries but prompt has {batch}; pass one prompt_2 per "
                             "prompt (or a str for all)")
        return [texts, texts_2]

    def _negative_texts_per_tower(self, negative_prompt, negative_prompt_2, prompt, batch: int) -> list[list[str]]:
        """Negative texts for each tower ("" when None); negative_prompt_2 defaults to negative_prompt."""
        negatives = self._negative_texts(negative_prompt, prompt, batch)
        if self.text_encoder is None:
            return [negatives]
        return [negatives, self._negative_texts(negative_prompt_2 or negative_prompt, prompt, batch)]

    def _check_xl_text_inputs(self, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip) -> None:
        for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2),
                            ("negative_prompt", negative_prompt)):
            check_prompt_text(name, value)
        if self.text_encoder is None and (prompt_2 is not None or negative_prompt_2 is not None):
            raise ValueError("this pipeline has only text_encoder_2, which reads prompt / negative_prompt; "
                             "prompt_2 and negative_prompt_2 are for the first encoder's companion: drop them")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt_2 or prompt_embeds, not both")
        if negative_prompt_embeds is not None and (negative_prompt is not None or negative_prompt_2 is not None):
            raise ValueError("pass either negative_prompt / negative_prompt_2 or negative_prompt_embeds, not both")
        width = self.unet.config.cross_attention_dim
        check_embeds("prompt_embeds", prompt_embeds, width)
        check_embeds("negative_prompt_embeds", negative_prompt_embeds, width)
        for embeds, pooled, name in ((prompt_embeds, pooled_prompt_embeds, "pooled_prompt_embeds"),
                                     (negative_prompt_embeds, negative_pooled_prompt_embeds,
                                      "negative_pooled_prompt_embeds")):
            if embeds is not None and pooled is None:
                raise ValueError(f"{name.replace('pooled_', '')} were given without {name}: pass both, made by the "
                                 "same text encoders (encode_prompt returns all four)")
            if pooled is not None and (not isinstance(pooled, torch.Tensor) or pooled.ndim != 2):
                raise ValueError(f"{name} must be a (batch, {self.text_encoder_2.config.projection_dim}) tensor, "
                                 f"got {getattr(pooled, 'shape', type(pooled).__name__)}")
        layers = min(encoder.config.num_hidden_layers for _, encoder in self._text_towers())
        check_clip_skip(clip_skip, layers)

    def _scaled_text_lora(self, lora_scale: float | None) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for _, encoder in self._text_towers():
            stack.enter_context(scaled_lora(encoder, lora_scale))
        return stack

    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """(prompt_embeds (B·n, 77, D1 + D2), negative_prompt_embeds, pooled_prompt_embeds (B·n, P),
        negative_pooled_prompt_embeds), n = num_images_per_prompt; the negatives are None without guidance.
        With ``force_zeros_for_empty_prompt`` and no negative prompt the negatives are zeros, as SDXL was trained.
        ``lora_scale`` scales both text encoders' LoRA adapters for this call."""
        device = device or self.device
        self._check_xl_text_inputs(prompt_2, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                                   pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)
        batch = prompt_batch(prompt, prompt_embeds)
        zero_negatives = negative_prompt is None and negative_prompt_2 is None and self.force_zeros_for_empty_prompt
        with self._scaled_text_lora(lora_scale):
            if prompt_embeds is None:
                prompt_embeds, pooled_prompt_embeds = self._embed_texts(self._prompt_texts(prompt, prompt_2, batch),
                                                                        clip_skip, device)
            if do_classifier_free_guidance and negative_prompt_embeds is None and zero_negatives:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            elif do_classifier_free_guidance and negative_prompt_embeds is None:  # no clip_skip here, as in diffusers
                texts = self._negative_texts_per_tower(negative_prompt, negative_prompt_2, prompt, batch)
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed_texts(
                    texts, None, device, max_length=prompt_embeds.shape[1])
        dtype = self.text_encoder_2.dtype

        def per_image(tensor):  # (B, ...) -> (B * n, ...), each prompt's rows next to each other
            return tensor.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

        prompt_embeds, pooled_prompt_embeds = per_image(prompt_embeds), per_image(pooled_prompt_embeds)
        if not do_classifier_free_guidance:
            return prompt_embeds, None, pooled_prompt_embeds, None
        negative_prompt_embeds = per_image(negative_prompt_embeds)
        negative_pooled_prompt_embeds = per_image(negative_pooled_prompt_embeds)
        for name, negative, positive in (("negative_prompt_embeds", negative_prompt_embeds, prompt_embeds),
                                         ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds,
                                          pooled_prompt_embeds)):
            if negative.shape != positive.shape:
                raise ValueError(f"{name} has shape {tuple(negative.shape)} but the positive one has "
                                 f"{tuple(positive.shape)}; they must match")
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # ---- micro-conditioning -------------------------------------------------------------------------------------
    def time_ids(self, original_size: tuple, crops_coords_top_left: tuple, last: tuple, dtype) -> torch.Tensor:
        """(1, n) time ids ``original_size + crops_coords_top_left + last`` (last: target size, or the aesthetic
        score for a refiner), checked against the width of the UNet's added embedding."""
        ids = (*original_size, *crops_coords_top_left, *last)
        per_id, pooled = self.unet.config.addition_time_embed_dim, self.text_encoder_2.config.projection_dim
        # the config, not add_embedding.linear_1.in_features: a LoRA may wrap that Linear in a LoRALayer
        expected, built = self.unet.config.projection_class_embeddings_input_dim, pooled + per_id * len(ids)
        if expected != built:
            raise ValueError(self._time_ids_mismatch(expected, built, per_id, pooled, len(ids)))
        return torch.tensor([ids], dtype=dtype)

    def _time_ids_mismatch(self, expected: int, built: int, per_id: int, pooled: int, count: int) -> str:
        message = (f"the UNet's add_embedding takes {expected} features but {type(self).__name__} built {built} = "
                   f"{pooled} pooled (text_encoder_2.config.projection_dim) + {count} time ids x {per_id} "
                   "(unet.config.addition_time_embed_dim)")
        aesthetic = getattr(self, "requires_aesthetics_score", None)  # None: a pipeline without the option
        if built - expected == per_id and not aesthetic:
            fix = ("StableDiffusionXLImg2ImgPipeline.from_pretrained(..., requires_aesthetics_score=True)"
                   if aesthetic is None else "set requires_aesthetics_score=True (e.g. from_pretrained(..., "
                   "requires_aesthetics_score=True))")
            return (f"{message}: a refiner-like UNet conditioned on (original size, crop, aesthetic score), 5 ids; "
                    f"use {fix}")
        if expected - built == per_id and aesthetic:
            return (f"{message}: a base-like UNet conditioned on (original size, crop, target size), 6 ids; set "
                    "requires_aesthetics_score=False")
        return f"{message}; check unet.config.projection_class_embeddings_input_dim against the text encoder"

    def micro_conditioning(self, height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
                           target_size=None, negative_original_size=None, negative_crops_coords_top_left=None,
                           negative_target_size=None, scores: tuple[float, float] | None = None, dtype=torch.float32):
        """(time_ids, negative_time_ids), each (1, n): Podell et al. 2023, Sec. 2.2 micro-conditioning,
        ``original_size + crops_coords_top_left + target_size`` (6 ids), or for a refiner (Sec. 2.5; ``scores`` =
        (aesthetic_score, negative_aesthetic_score)) ``original_size + crops_coords_top_left + (aesthetic_score,)``.
        Sizes default to (height, width), each negative value to its positive one (diffusers 0.42 drops the
        negative crop in some pipelines and, in text-to-image, every negative value unless both negative sizes
        are given)."""
        original_size = check_pair("original_size", original_size) or (height, width)
        crops = check_pair("crops_coords_top_left", crops_coords_top_left) or (0, 0)
        target_size = check_pair("target_size", target_size) or (height, width)
        negative = (check_pair("negative_original_size", negative_original_size) or original_size,
                    check_pair("negative_crops_coords_top_left", negative_crops_coords_top_left) or crops,
                    check_pair("negative_target_size", negative_target_size) or target_size)
        positive = (original_size, crops, target_size)
        if scores is not None:
            scores = [check_number(name, score) for name, score in zip(("aesthetic_score", "negative_aesthetic_score"),
                                                                     scores)]
            positive, negative = (*positive[:2], (scores[0],)), (*negative[:2], (scores[1],))
        return self.time_ids(*positive, dtype), self.time_ids(*negative, dtype)

    @staticmethod
    def cfg_batch(encoded: tuple, time_ids: torch.Tensor, negative_time_ids: torch.Tensor,
                  do_cfg: bool) -> dict[str, torch.Tensor]:
        """The UNet's text conditioning for the loop: prompt_embeds (B or 2B, 77, D), add_text_embeds (pooled) and
        add_time_ids (B or 2B, n); with CFG each is [negatives, positives]."""
        embeds, negative, pooled, negative_pooled = encoded
        batch = embeds.shape[0]
        time_ids = time_ids.to(embeds.device).repeat(batch, 1)  # (1, n) -> (B, n)
        if not do_cfg:
            return dict(prompt_embeds=embeds, add_text_embeds=pooled, add_time_ids=time_ids)
        negative_time_ids = negative_time_ids.to(embeds.device).repeat(batch, 1)
        return dict(prompt_embeds=torch.cat([negative, embeds]),  # (2B, 77, D)
                    add_text_embeds=torch.cat([negative_pooled, pooled]),  # (2B, P)
                    add_time_ids=torch.cat([negative_time_ids, time_ids]))  # (2B, n)

    @staticmethod
    def added_cond(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``added_cond_kwargs`` of the UNet from the loop's conditioning."""
        return {"text_embeds": cond["add_text_embeds"], "time_ids": cond["add_time_ids"]}

    def step_end(self, callback: Callable | None, tensor_inputs, i: int, t, latents: torch.Tensor,
                 cond: dict[str, torch.Tensor]):
        """Call ``callback_on_step_end(pipe, i, t, {name: tensor for the requested names})``; the tensors it returns
        replace latents and the conditioning. -> (latents, cond)."""
        if callback is None:
            return latents, cond
        state = {"latents": latents, **cond}
        result = callback(self, i, t, {name: state[name] for name in tensor_inputs})
        latents = check_callback_result(result, latents, i)
        return latents, {name: result.get(name, value) for name, value in cond.items()}

    # ---- VAE ----------------------------------------------------------------------------------------------------
    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE config's per-channel (latents_mean, latents_std) as (1, C, 1, 1) tensors, or None if unset."""
        config = self.vae.config
        if config.latents_mean is None or config.latents_std is None:
            return None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like) for v in (config.latents_mean, config.latents_std))

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> the VAE decoder's input: ``latents * std / scaling_factor + mean`` when the VAE
        config has latents_mean/latents_std, else ``latents / scaling_factor``."""
        statistics = self._latent_statistics(latents)
        if statistics is None:
            return latents / self.vae.config.scaling_factor
        mean, std = statistics
        return latents * std / self.vae.config.scaling_factor + mean

    def scale_image_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE posterior samples -> diffusion latents, the inverse of ``unscale_latents``."""
        statistics = self._latent_statistics(latents)
        if statistics is None:
            return latents * self.vae.config.scaling_factor
        mean, std = statistics
        return (latents - mean) * self.vae.config.scaling_factor / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> VAE output; a float16 VAE with ``force_upcast`` decodes in float32 (SDXL's VAE overflows)."""
        with float32_vae(self.vae, self.vae.dtype == torch.float16 and self.vae.config.force_upcast):
            return super().decode(latents.to(self.vae.dtype))

    def finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        images = super().finish(latents, output_type, return_dict=True).images
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)


class StableDiffusionXLPipeline(StableDiffusionXLBase):
    """SDXL text to image (also SDXL-Turbo: 1-4 steps, guidance_scale=0, EulerAncestral with trailing spacing)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
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
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        height, width = self.default_size(height, width)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, guidance_rescale,
                                 generator)
        check_fraction("denoising_end", denoising_end)
        check_tensor_inputs(callback_on_step_end_tensor_inputs)
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        encoded = self.encode_prompt(prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt,
                                     negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                     negative_pooled_prompt_embeds, self.text_lora_scale(cross_attention_kwargs),
                                     clip_skip)
        batch, dtype = encoded[0].shape[0], encoded[0].dtype
        time_ids = self.micro_conditioning(height, width, original_size, crops_coords_top_left, target_size,
                                           negative_original_size, negative_crops_coords_top_left,
                                           negative_target_size, dtype=dtype)
        cond = self.cfg_batch(encoded, *time_ids, do_cfg)
        self.check_memory(batch, height, width, guidance_scale)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = stop_early(self.scheduler.timesteps, self.scheduler, denoising_end)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, device, generator,
                                       latents)
        step_kwargs = self.step_kwargs(generator, eta)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.predict_noise(latents, t, cond["prompt_embeds"], guidance_scale, guidance_rescale, step=i,
                                            cross_attention_kwargs=cross_attention_kwargs,
                                            added_cond_kwargs=self.added_cond(cond))
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents, cond = self.step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, cond)
        return self.finish(latents, output_type, return_dict)
