"""What is being trained: the models, the dataset, how a batch becomes (x0, conditioning), and how to draw samples.

- ``PixelDiffusion``: x0 is the image itself (DDPM, Ho et al. 2020; the butterflies tutorial), unconditional or
  class-conditional; a new UNet2DModel or a pretrained one (the face-to-butterfly fine-tuning recipe).
- ``LatentTextDiffusion``: Stable Diffusion fine-tuning (Rombach et al. 2022): x0 are VAE latents of the image, the
  UNet2DConditionModel sees CLIP embeddings of the caption; the VAE stays frozen, the text encoder too unless the
  method trains part of it (LoRA on it, a textual-inversion token). With DreamBooth's prior preservation each batch
  also holds as many class images, weighted by ``prior_loss_weight`` (Ruiz et al. 2023, Eq. 2). With a ControlNet
  (Zhang et al. 2023, Eq. 2; ``train_controlnet.py``) each image comes with its condition image, the ControlNet
  sees it with x_t and the text, and its residuals join the frozen UNet's skips.

``task.encode(batch, generators)`` gives :class:`Encoded`: what ``loop.training_step`` needs for one micro-batch.
``task.denoiser`` is the module the loop calls (and DDP wraps): ``denoiser(x_t, t, **conditioning).sample``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

import minidiff
from minidiff.pipelines.images import postprocess
from minidiff.random import randn_tensor
from minidiff.outputs import BaseOutput
from minidiff.training.config import NOISE_SCHEDULERS, TrainConfig
from minidiff.training.data import ImageFolderDataset, SyntheticShapes
from minidiff.training.prior import FrozenModelPrior, copy_frozen, lora_frozen


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids of ``captions`` padded (and cut) to the tokenizer's length, as the pipelines encode prompts: (B, L)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")["input_ids"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return (postprocess(images, "np") * 255).round().astype(np.uint8)


class Encoded(NamedTuple):
    """One micro-batch ready for ``training_step``: clean samples, the model's conditioning, one generator per
    row of ``x0`` (timestep and noise draws), optional per-row loss weights (None: the plain mean) and, with
    ``prior_target="frozen-model"``, the prior loss of the class rows."""

    x0: torch.Tensor  # (B, C, H, W)
    conditioning: dict
    generators: list[torch.Generator]
    sample_weights: torch.Tensor | None = None  # (B,), summing to the loss's total weight
    prior: FrozenModelPrior | None = None  # the last prior_rows rows fit the frozen model (prior.py)
    prior_rows: int = 0


class PixelDiffusion:
    def __init__(self, unet, scheduler, resolution: int, num_classes: int | None, base_model: str | None = None):
        self.unet, self.scheduler, self.resolution, self.num_classes = unet, scheduler, resolution, num_classes
        self.channels = unet.config.in_channels
        self.denoiser, self.pipe, self.base_model = unet, None, base_model

    def encode(self, batch: dict, generators: list[torch.Generator]) -> Encoded:
        x0 = batch["pixel_values"].to(self.unet.device)  # (B, C, H, W) in [-1, 1]
        if self.num_classes is None:
            return Encoded(x0, {}, generators)
        return Encoded(x0, {"class_labels": batch["class_labels"].to(self.unet.device)}, generators)

    @torch.no_grad()
    def sample(self, unet, count: int, steps: int, seed: int) -> np.ndarray:
        """``count`` images by DDIM (eta 0, Song et al. 2021) in ``steps`` steps; classes 0, 1, 2, ... in turn."""
        sampler = minidiff.DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps)
        shape = (count, self.channels, self.resolution, self.resolution)
        x = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), device=unet.device)
        labels = None if self.num_classes is None else (torch.arange(count) % self.num_classes).to(unet.device)
        for t in sampler.timesteps:
            x = sampler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
        return to_uint8(x)

    def save(self, folder: str, unet, complete: bool = True) -> None:
        """A diffusers DDPMPipeline folder: model_index.json, unet/, scheduler/."""
        minidiff.DDPMPipeline(unet=unet, scheduler=self.scheduler).save_pretrained(folder)


class TextConditionedUNet(nn.Module):
    """The UNet on the text encoder's embeddings of token ids (and, given a ControlNet, on its residuals for the
    condition image ``controlnet_cond``): what the loop calls, so that a trained text encoder (LoRA, a new token) or
    ControlNet is part of the differentiated (and DDP-synchronised) model. A frozen text encoder runs without a
    graph; the text encoder always runs in float32 (outside bf16 autocast), as a frozen one did."""

    def __init__(self, unet, text_encoder, controlnet=None):
        super().__init__()
        self.unet, self.text_encoder, self.controlnet = unet, text_encoder, controlnet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor,
                controlnet_cond: torch.Tensor | None = None) -> BaseOutput:
        trains_text = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.autocast(sample.device.type, enabled=False), contextlib.nullcontext() if trains_text \
                else torch.no_grad():
            text = self.text_encoder(input_ids)[0]  # (B, 77, D)
        if self.controlnet is None:
            return self.unet(sample, timestep, encoder_hidden_states=text)
        down, mid = self.controlnet(sample, timestep, text, controlnet_cond=controlnet_cond, return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)


class LatentTextDiffusion:
    def __init__(self, pipe, scheduler, resolution: int, caption_dropout: float, prompts: list[str],
                 prior_loss_weight: float, base_model: str, controlnet=None,
                 conditions: torch.Tensor | None = None, prior: FrozenModelPrior | None = None):
        """``scheduler`` makes the training noise (``add_noise``); ``pipe.scheduler`` is what the export samples
        with. With ``controlnet``, ``conditions`` (N, 3, H, W) are the condition images of the sample grids'
        ``prompts``; with ``prior``, class images fit the frozen model instead of the noise."""
        self.pipe, self.resolution, self.caption_dropout, self.prompts = pipe, resolution, caption_dropout, prompts
        self.unet, self.scheduler, self.vae, self.channels = pipe.unet, scheduler, pipe.vae, 3
        self.prior_loss_weight, self.base_model, self.prior = prior_loss_weight, base_model, prior
        self.controlnet, self.conditions = controlnet, conditions
        self.denoiser = TextConditionedUNet(pipe.unet, pipe.text_encoder, controlnet)
        pipe.vae.requires_grad_(False).eval()
        pipe.text_encoder.requires_grad_(False).eval()
        pipe.set_progress_bar_config(disable=True)

    def encode(self, batch: dict, generators: list[torch.Generator]) -> Encoded:
        """Instance (and class) images and captions -> latents and token ids. With class images, ``x0`` is
        [instance; class] and the rows' weights make the loss ``mse(instance) + prior_loss_weight * mse(class)``
        (``train_dreambooth.py``); each sample's generator serves its class image too, after its own draws."""
        x0, ids = self._encode(batch, generators)
        if self.controlnet is not None:
            cond = batch["conditioning_pixel_values"].to(x0.device)  # (B, 3, H, W) in [0, 1]
            return Encoded(x0, {"input_ids": ids, "controlnet_cond": cond}, generators)
        if "class_batch" not in batch:
            return Encoded(x0, {"input_ids": ids}, generators)
        class_x0, class_ids = self._encode(batch["class_batch"], generators)
        size = x0.shape[0]
        weights = torch.cat([torch.full((size,), 1 / size), torch.full((size,), self.prior_loss_weight / size)])
        return Encoded(torch.cat([x0, class_x0]), {"input_ids": torch.cat([ids, class_ids])}, generators * 2,
                       weights.to(x0.device), self.prior, class_x0.shape[0])

    @torch.no_grad()
    def _encode(self, batch: dict, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions dropped to "" with probability ``caption_dropout`` (one uniform draw per sample), textual-
        inversion tokens written out as their vectors' tokens, tokenized; images VAE-encoded and a latent drawn
        from q(z|x), times ``scaling_factor``."""
        captions = [c if torch.rand(1, generator=g).item() >= self.caption_dropout else ""
                    for c, g in zip(batch["captions"], generators)]
        captions = self.pipe.maybe_convert_prompt(captions, self.pipe.tokenizer)
        device = self.unet.device
        ids = caption_ids(self.pipe.tokenizer, captions).to(device)  # (B, 77)
        latents = self.vae.encode(batch["pixel_values"].to(device)).latent_dist.sample(generator=generators)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor, ids

    @torch.no_grad()
    def sample(self, unet, count: int, steps: int, seed: int) -> np.ndarray:
        """Text-to-image with the pipeline (DDIM, guidance 7.5) for the first ``count`` captions of the data (and,
        with a ControlNet, their condition images)."""
        prompts = [self.prompts[i % len(self.prompts)] for i in range(count)]
        options = {}
        if self.controlnet is None:
            pipe = minidiff.StableDiffusionPipeline(**dict(self.pipe.components, unet=unet))
        else:
            pipe = minidiff.StableDiffusionControlNetPipeline(**dict(self.pipe.components, unet=unet),
                                                              controlnet=self.controlnet.eval())
            options["image"] = self.conditions[torch.arange(count) % len(self.conditions)]  # (count, 3, H, W)
        pipe.scheduler = minidiff.DDIMScheduler.from_config(self.pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(prompts, height=self.resolution, width=self.resolution, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(seed), output_type="np", **options).images
        if self.controlnet is not None:
            self.controlnet.train()
        return (np.asarray(images) * 255).round().astype(np.uint8)

    def save(self, folder: str, unet, complete: bool = True) -> None:
        """The whole Stable Diffusion folder, or (checkpoints) just what training changes: unet/ and scheduler/."""
        if complete:
            minidiff.StableDiffusionPipeline(**dict(self.pipe.components, unet=unet)).save_pretrained(folder)
        else:
            unet.save_pretrained(os.path.join(folder, "unet"))
            self.pipe.scheduler.save_pretrained(os.path.join(folder, "scheduler"))


# ---- building a task from a TrainConfig ---------------------------------------------------------------------------
def schedule_overrides(config: TrainConfig) -> dict:
    """The schedule options given (None: keep the pretrained one's)."""
    options = {"beta_schedule": config.beta_schedule, "num_train_timesteps": config.num_train_timesteps,
               "prediction_type": config.prediction_type}
    return {k: v for k, v in options.items() if v is not None}


def noise_scheduler(config: TrainConfig, pretrained_config=None):
    """The scheduler whose ``add_noise`` makes x_t: the pretrained schedule unless options override it."""
    defaults = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    base = dict(pretrained_config) if pretrained_config is not None else defaults
    return getattr(minidiff, NOISE_SCHEDULERS[config.noise_scheduler]).from_config(base, **schedule_overrides(config))


def new_unet(config: TrainConfig, resolution: int, channels: int, num_classes: int | None):
    """A UNet2DModel in the tutorials' shape: DownBlock2D levels, attention on the deepest ``attention_levels``."""
    channels_per_level = tuple(config.block_out_channels)
    levels = len(channels_per_level)
    attention = [level >= levels - config.attention_levels for level in range(levels)]
    torch.manual_seed(config.seed)
    return minidiff.UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=config.layers_per_block,
        block_out_channels=channels_per_level, norm_num_groups=math.gcd(32, *channels_per_level),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        num_class_embeds=num_classes,
    )


def load_pretrained(folder: str):
    """A diffusers folder: a pipeline (model_index.json; Stable Diffusion if it names a text_encoder) or a UNet."""
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        if (index.get("text_encoder") or [None, None])[1] is not None:
            return minidiff.StableDiffusionPipeline.from_pretrained(folder)
        return minidiff.DDPMPipeline.from_pretrained(folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return minidiff.UNet2DModel.from_pretrained(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pretrained_model {folder} does not exist")
    raise FileNotFoundError(f"pretrained_model {folder} holds neither model_index.json (a pipeline folder) nor "
                            "config.json (a UNet2DModel folder)")


def base_model_folder(config: TrainConfig) -> str | None:
    """The folder a run starts from: ``pretrained_model``, the built-in model for the personalisation methods, or
    None (a new model)."""
    if config.pretrained_model is not None or config.method == "full":
        return config.pretrained_model
    from minidiff.builtin import builtin_model_folder

    return builtin_model_folder()


def make_dataset(config: TrainConfig, resolution: int, channels: int, with_captions: bool = False, dataset=None):
    """``dataset`` if given (checked), else ``train_data_dir``'s images, else the synthetic shapes."""
    conditioned = config.method == "controlnet"
    if dataset is not None:
        check_dataset(dataset, channels, resolution, conditioned)
        return dataset
    if config.train_data_dir is None:
        if config.method in ("dreambooth", "textual-inversion", "controlnet") or config.instance_prompt is not None:
            what = f"method {config.method!r}" if config.method != "full" else "instance_prompt"
            yours = "your images and their condition images" if conditioned else "your images"
            raise ValueError(f"{what} needs {yours}: pass train_data_dir (--images DIR); without it the run "
                             "would train on the built-in synthetic shapes and their own captions")
        return SyntheticShapes(config.synthetic_images, resolution, channels, seed=config.seed)
    return ImageFolderDataset(config.train_data_dir, resolution, channels, with_labels=config.class_conditional,
                              with_captions=with_captions, default_caption=config.instance_prompt,
                              upscale_small=config.upscale_small_images, with_conditioning=conditioned)


def check_dataset(dataset, channels: int, resolution: int, conditioned: bool) -> None:
    """A dataset given in Python: its first example's ``pixel_values`` (and, for a ControlNet, its
    ``conditioning_pixel_values``) must be tensors of the training shape."""
    example = dataset[0] if len(dataset) else {}
    wanted = {"pixel_values": (channels, "[-1, 1]")}
    if conditioned:
        wanted["conditioning_pixel_values"] = (3, "[0, 1] (the ControlNet's condition image)")
    for key, (width, values) in wanted.items():
        tensor = example.get(key) if isinstance(example, dict) else None
        shape = tuple(tensor.shape) if torch.is_tensor(tensor) else None
        if shape != (width, resolution, resolution):
            raise ValueError(f"dataset examples must be dicts whose {key!r} are ({width}, {resolution}, "
                             f"{resolution}) tensors in {values}; the first has shape {shape}")


def dataset_classes(dataset) -> int:
    if not isinstance(getattr(dataset, "num_classes", None), int):
        raise ValueError(f"class-conditional training needs the number of classes: {type(dataset).__name__} "
                         "has no int attribute num_classes")
    return dataset.num_classes


def build_task(config: TrainConfig, device: torch.device, dataset=None):
    """(task, dataset) for ``config``; the UNet is on ``device`` in train mode. ``dataset`` (any object with
    ``len`` and ``[i]`` -> ``{"pixel_values", "class_label", "caption"}``) replaces ``train_data_dir``."""
    base = base_model_folder(config)
    pretrained = load_pretrained(base) if base else None
    if isinstance(pretrained, minidiff.StableDiffusionPipeline):
        return _latent_text_task(config, pretrained, device, dataset)
    if config.method != "full":
        raise ValueError(f"method {config.method!r} personalises a Stable Diffusion pipeline, but pretrained_model "
                         f"{base} is a {type(pretrained).__name__} folder; pass a Stable Diffusion folder (or none "
                         "for the built-in model)")
    unet = getattr(pretrained, "unet", pretrained)
    pretrained_scheduler = getattr(pretrained, "scheduler", None)
    resolution = config.resolution or (unet.config.sample_size if unet is not None else 32)
    channels = unet.config.in_channels if unet is not None else 3
    if unet is not None:
        _check_pretrained_unet(config, unet, resolution)
    dataset = make_dataset(config, resolution, channels, dataset=dataset)
    num_classes = dataset_classes(dataset) if config.class_conditional else None
    if unet is None:
        check_resolution(resolution, len(config.block_out_channels))
        unet = new_unet(config, resolution, channels, num_classes)
    elif num_classes is not None and num_classes > unet.config.num_class_embeds:
        raise ValueError(f"the data has {num_classes} classes but the pretrained UNet embeds only "
                         f"{unet.config.num_class_embeds} (num_class_embeds)")
    scheduler = noise_scheduler(config, pretrained_scheduler.config if pretrained_scheduler else None)
    return PixelDiffusion(unet.to(device).train(), scheduler, resolution, num_classes, base), dataset


def check_resolution(resolution: int, unet_levels: int, vae_factor: int = 1) -> None:
    """Images must divide into whole latents (``vae_factor``) that the UNet halves ``unet_levels - 1`` times."""
    multiple = vae_factor * 2 ** (unet_levels - 1)
    if resolution % multiple:
        vae = f"the VAE's downsampling {vae_factor} x " if vae_factor > 1 else ""
        nearest = max(multiple, resolution // multiple * multiple)
        raise ValueError(f"resolution {resolution} must be a multiple of {multiple} ({vae}2^{unet_levels - 1} for a "
                         f"UNet with {unet_levels} levels); try --resolution {nearest}")


def _check_pretrained_unet(config: TrainConfig, unet, resolution: int) -> None:
    if unet.config.sample_size != resolution:
        raise ValueError(f"resolution {resolution} differs from the pretrained UNet's sample_size "
                         f"{unet.config.sample_size}; leave --resolution out to train at the model's size")
    if unet.config.in_channels not in (1, 3):
        raise ValueError(f"the pretrained UNet takes {unet.config.in_channels} channels; pixel-space training "
                         "handles 1 (grayscale) or 3 (RGB)")
    conditional = unet.config.num_class_embeds is not None
    if conditional != config.class_conditional:
        raise ValueError(f"the pretrained UNet is {'' if conditional else 'not '}class-conditional (num_class_embeds="
                         f"{unet.config.num_class_embeds}); set class_conditional={conditional}")


def _latent_text_task(config: TrainConfig, pipe, device: torch.device, dataset=None):
    if config.class_conditional:
        raise ValueError("class_conditional applies to pixel-space UNet2DModel training; a Stable Diffusion "
                         "pipeline is conditioned on captions")
    factor = pipe.vae_scale_factor
    resolution = config.resolution or pipe.unet.config.sample_size * factor
    check_resolution(resolution, len(pipe.unet.config.block_out_channels), factor)
    controlnet = make_controlnet(config, pipe) if config.method == "controlnet" else None
    dataset = make_dataset(config, resolution, 3, with_captions=True, dataset=dataset)
    if config.method == "textual-inversion":
        _check_placeholder_in_captions(dataset, config.placeholder_token)
    shown = [dataset[i] for i in range(min(len(dataset), max(config.num_sample_images, 1)))]
    prompts = [config.validation_prompt] if config.validation_prompt else [example["caption"] for example in shown]
    conditions = torch.stack([e["conditioning_pixel_values"] for e in shown]) if controlnet is not None else None
    training_scheduler = noise_scheduler(config, pipe.scheduler.config)
    # the pipeline keeps its own sampler (as diffusers' scripts export it), with the schedule options applied
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **schedule_overrides(config))
    pipe.to(device)
    if controlnet is None:
        pipe.unet.train()
    else:  # train_controlnet.py: the UNet frozen as loaded (eval), the ControlNet in train mode
        controlnet.to(device).train()
    prior = frozen_model_prior(config, pipe) if config.prior_target == "frozen-model" else None
    task = LatentTextDiffusion(pipe, training_scheduler, resolution, config.caption_dropout, prompts,
                               config.prior_loss_weight, base_model_folder(config), controlnet, conditions, prior)
    return task, dataset


def frozen_model_prior(config: TrainConfig, pipe) -> FrozenModelPrior:
    """The prior loss against the frozen model (``prior.py``): the UNet with its LoRA adapters scaled to 0 (they
    are injected after this, and the base weights never change), or a copy of the UNet as loaded when the whole
    UNet trains (one more UNet in memory)."""
    if config.trains_lora:
        frozen = lora_frozen(TextConditionedUNet(pipe.unet, pipe.text_encoder))
    else:
        unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
        frozen = copy_frozen(TextConditionedUNet(unet, pipe.text_encoder))
    return FrozenModelPrior(frozen, caption_ids(pipe.tokenizer, [""]), config.prior_guidance_scale)


CONDITIONING_CHANNELS = (16, 32, 96, 256)  # ControlNetModel's default conditioning_embedding_out_channels


def make_controlnet(config: TrainConfig, pipe):
    """The ControlNet to train: ``controlnet_model``'s, or a new one copied from the UNet's encoder whose condition
    encoder shrinks the image by the VAE's factor; checked against the UNet as the ControlNet pipeline checks it."""
    if config.controlnet_model is not None:
        if not os.path.isfile(os.path.join(config.controlnet_model, "config.json")):
            raise FileNotFoundError(f"controlnet_model {config.controlnet_model} is not a ControlNet folder "
                                    "(config.json + diffusion_pytorch_model.safetensors)")
        controlnet = minidiff.ControlNetModel.from_pretrained(config.controlnet_model)
    else:
        factor = pipe.vae_scale_factor
        steps = round(math.log2(factor))
        channels = config.conditioning_embedding_out_channels or CONDITIONING_CHANNELS[:steps + 1]
        if 2 ** (len(channels) - 1) != factor:
            raise ValueError(f"conditioning_embedding_out_channels={','.join(map(str, channels))} shrink the "
                             f"condition image by {2 ** (len(channels) - 1)} (one stride-2 step between entries) but "
                             f"the VAE shrinks the image by {factor}: give {steps + 1} entries, e.g. "
                             f"{','.join(str(16 * 2 ** i) for i in range(steps + 1))}")
        torch.manual_seed(config.seed)  # the condition encoder's random init (the rest is copied or zero)
        controlnet = minidiff.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)
    minidiff.StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)  # fits the UNet, or says why
    return controlnet


def _check_placeholder_in_captions(dataset, placeholder: str) -> None:
    captions = getattr(dataset, "captions", None)  # an ImageFolderDataset's, without decoding its images
    for index in range(len(dataset)):
        caption = captions[dataset.files[index]] if isinstance(captions, dict) else dataset[index]["caption"]
        if placeholder not in caption:
            where = getattr(dataset, "files", None)
            name = f" ({where[index]})" if where else ""
            raise ValueError(f"the caption {caption!r} of image {index}{name} does not name placeholder_token "
                             f"{placeholder!r}: textual inversion learns the token from captions that use it, e.g. "
                             f"--prompt 'a photo of {placeholder}'")
