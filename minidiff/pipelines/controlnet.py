"""Text to image with ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): the Stable Diffusion loop, with one or more ControlNets adding residuals to the frozen UNet at every step.

Each step, every ControlNet sees the noisy latents, the text and its condition image c_i (edges, depth, pose, ...)
and returns one residual per UNet skip tensor plus one for the mid block (Eq. 2); the residuals of several
ControlNets are summed (MultiControlNet), each net scaled by its ``controlnet_conditioning_scale``. A net only acts
on the steps inside its window [control_guidance_start, control_guidance_end] of the schedule (fractions of the
steps: step i is kept when ``start <= i / N`` and ``(i + 1) / N <= end``).

The condition image is preprocessed as diffusers does: PIL / numpy / tensor (or a list), resized to (height, width)
(Lanczos for PIL, nearest for arrays and tensors), values in [0, 1] (not normalised to [-1, 1]), tiled to the batch
and doubled for classifier-free guidance. Without height/width the output takes the condition image's size.
``guess_mode`` runs the ControlNets on the conditional half of the CFG batch only and adds zeros to the
unconditional half, so the control comes through even with an empty prompt.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Callable

import torch
from torch import nn

from minidiff.loading.hub import resolve_folder
from minidiff.models.controlnet import ControlNetModel
from minidiff.models.modeling import merge_dtype_arguments
from minidiff.pipelines.base import MODEL_LOAD_OPTIONS, component_dtype, entry_class_name, read_model_index
from minidiff.pipelines.checks import check_number, check_sampling_arguments, check_size
from minidiff.pipelines.images import to_float_batch, as_image_list, default_size
from minidiff.pipelines.stable_diffusion import StableDiffusionBase, prompt_batch

CONTROLNET_CLASSES = ("ControlNetModel", "MultiControlNetModel")


def summed_residuals(nets, sample, timestep, encoder_hidden_states, controlnet_cond: list[torch.Tensor],
                     conditioning_scale: list[float], guess_mode: bool = False, cross_attention_kwargs=None):
    """(down residuals, mid residual): the sum over the nets of ``net(sample, ..., controlnet_cond[k],
    conditioning_scale[k])`` (in net order, as diffusers adds them); a net of scale 0 is skipped (it would add
    zeros). (None, None) when every scale is 0."""
    down, mid = None, None
    for net, cond, scale in zip(nets, controlnet_cond, conditioning_scale):
        if scale == 0:
            continue
        net_down, net_mid = net(sample, timestep, encoder_hidden_states, controlnet_cond=cond,
                                conditioning_scale=scale, guess_mode=guess_mode,
                                cross_attention_kwargs=cross_attention_kwargs, return_dict=False)
        if down is None:
            down, mid = list(net_down), net_mid
        else:
            down = [total + residual for total, residual in zip(down, net_down)]  # (B, C_k, h_k, w_k) each
            mid = mid + net_mid  # (B, C_last, h, w)
    return down, mid


class MultiControlNetModel(nn.Module):
    """Several ControlNets used together: each sees its own condition image and scale, and their residuals are
    summed (diffusers' MultiControlNetModel). Saved as ``folder``, ``folder_1``, ``folder_2``, ... as in diffusers."""

    def __init__(self, controlnets: list[ControlNetModel] | tuple[ControlNetModel, ...]):
        super().__init__()
        controlnets = list(controlnets)
        if not controlnets:
            raise ValueError("MultiControlNetModel got an empty list; pass at least one ControlNetModel")
        for i, net in enumerate(controlnets):
            if not isinstance(net, ControlNetModel):
                raise TypeError(f"controlnet[{i}] is a {type(net).__name__}; each entry must be a minidiff "
                                "ControlNetModel (ControlNetModel.from_pretrained(folder))")
        self.nets = nn.ModuleList(controlnets)

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond: list[torch.Tensor],
                conditioning_scale: list[float], guess_mode: bool = False, cross_attention_kwargs=None,
                return_dict: bool = False):
        """(down residuals, mid residual) summed over the nets (see ``summed_residuals``)."""
        return summed_residuals(self.nets, sample, timestep, encoder_hidden_states, controlnet_cond,
                                conditioning_scale, guess_mode, cross_attention_kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **options: Any) -> None:
        """Each net with ModelMixin.save_pretrained's ``options`` (variant, max_shard_size, ...)."""
        for i, net in enumerate(self.nets):
            net.save_pretrained(os.fspath(save_directory) + ("" if i == 0 else f"_{i}"), **options)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype=None, variant: str | None = None, **options: Any):
        """The nets saved in ``folder``, ``folder_1``, ``folder_2``, ... (until one is missing), each loaded with
        ModelMixin.from_pretrained's ``options`` (device_map, ...)."""
        folder, nets = os.fspath(folder), []
        while os.path.isdir(folder + ("" if not nets else f"_{len(nets)}")):
            path = folder + ("" if not nets else f"_{len(nets)}")
            nets.append(ControlNetModel.from_pretrained(path, torch_dtype=torch_dtype, variant=variant, **options))
        if not nets:
            raise FileNotFoundError(f"{folder} is not a folder; a MultiControlNetModel is saved as {folder}, "
                                    f"{folder}_1, ...")
        return cls(nets)


def per_net(name: str, value: Any, count: int, what: str) -> list:
    """``value`` as one entry per ControlNet: a list/tuple of ``count`` entries, or one value for every net."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries but the pipeline has {count} ControlNet(s); pass one "
                         f"{what} per ControlNet, or a single value for all of them")
    return list(value)


def check_guidance_windows(starts: list, ends: list) -> None:
    """Each ControlNet's window 0 <= control_guidance_start < control_guidance_end <= 1."""
    for k, (start, end) in enumerate(zip(starts, ends)):
        label = "" if len(starts) == 1 else f" (ControlNet {k})"
        start = check_number(f"control_guidance_start{label}", start, low=0.0, high=1.0)
        end = check_number(f"control_guidance_end{label}", end, low=0.0, high=1.0)
        if start >= end:
            raise ValueError(f"control_guidance_start={start} must be below control_guidance_end={end}{label}: "
                             "they are the fractions of the steps where the ControlNet acts, e.g. 0.0 and 1.0 "
                             "for all steps")


def control_keep(num_steps: int, starts: list[float], ends: list[float]) -> list[list[float]]:
    """keep[i][k] = 1.0 when ControlNet k acts at step i (its window holds [i / N, (i + 1) / N]), else 0.0."""
    return [[1.0 - float(i / num_steps < start or (i + 1) / num_steps > end) for start, end in zip(starts, ends)]
            for i in range(num_steps)]


class StableDiffusionControlNetPipeline(StableDiffusionBase):
    """Text to image controlled by one ControlNet, or several (pass a list: residuals summed)."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "controlnet", "scheduler")
    optional_components = ("controlnet",)  # set after the shared __init__, checked there

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, **ignored: Any) -> None:
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, **ignored)
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if not isinstance(controlnet, (ControlNetModel, MultiControlNetModel)):
            got = "None" if controlnet is None else type(controlnet).__name__
            raise TypeError(f"controlnet must be a ControlNetModel or a list of them (MultiControlNet), got {got}")
        self.controlnet = controlnet
        for k, net in enumerate(self.controlnets):
            self._check_controlnet_fits(net, k)

    @property
    def controlnets(self) -> list[ControlNetModel]:
        """The ControlNets as a list (one entry for a single ControlNetModel)."""
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

    def control_input_channels(self) -> int:
        """The channels of the latents the ControlNets see: the UNet's input channels."""
        return self.unet.config.in_channels

    def _check_controlnet_fits(self, net: ControlNetModel, k: int) -> None:
        """A ControlNet's residuals must fit the UNet's skips, and its condition embedding the latent size."""
        label = "controlnet" if isinstance(self.controlnet, ControlNetModel) else f"controlnet[{k}]"
        u, c = self.unet.config, net.config
        reasons = {"block_out_channels": "its residuals would not fit the UNet's skip tensors",
                   "layers_per_block": "its residuals would not fit the UNet's skip tensors",
                   "in_channels": "it takes the UNet's noisy latents",
                   "cross_attention_dim": "it takes the UNet's text embeddings"}
        for field, reason in reasons.items():
            mine, theirs, what = c[field], u[field], f"the UNet has {field}={u[field]}"
            if field == "in_channels":  # the noisy latents only (an inpainting UNet takes 9 channels, its nets 4)
                theirs = self.control_input_channels()
                if theirs != u[field]:
                    what = f"its noisy latents have {theirs} channels"
            if isinstance(mine, (list, tuple)) or isinstance(theirs, (list, tuple)):
                mine = list(mine) if isinstance(mine, (list, tuple)) else [mine] * len(u.block_out_channels)
                theirs = list(theirs) if isinstance(theirs, (list, tuple)) else [theirs] * len(u.block_out_channels)
            if mine != theirs:
                raise ValueError(f"{label} has {field}={c[field]} but {what} ({reason}); "
                                 "use a ControlNet trained for this UNet (or built with ControlNetModel.from_unet"
                                 "(unet))")
        if c.addition_embed_type is not None:
            raise ValueError(f"{label} has addition_embed_type={c.addition_embed_type!r} (an SDXL ControlNet); "
                             f"{type(self).__name__} runs SD 1.x / 2.x ControlNets")
        factor = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
        if factor != self.vae_scale_factor:
            raise ValueError(
                f"{label} shrinks the condition image by {factor} (conditioning_embedding_out_channels="
                f"{list(c.conditioning_embedding_out_channels)}) but the VAE by {self.vae_scale_factor}: a condition "
                "image at the output size would not match the latent size; use a ControlNet with "
                f"{len(self.vae.config.block_out_channels)} conditioning_embedding_out_channels entries")

    # ---- folders ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, variant: str | None = None,
                        **overrides):
        """As ``DiffusionPipeline.from_pretrained``; the ``controlnet`` entry of model_index.json is a
        ControlNetModel (folder ``controlnet/``) or a MultiControlNetModel (``controlnet/``, ``controlnet_1/``, ...),
        or pass ``controlnet=`` (a ControlNetModel or a list of them) yourself."""
        if "controlnet" not in overrides:
            folder = resolve_folder(pretrained_model_name_or_path)
            index_path, index = read_model_index(folder)
            class_name = entry_class_name(index_path, "controlnet", index.get("controlnet"))
            if class_name is None:
                raise ValueError(f"{index_path} has no controlnet entry; pass controlnet="
                                 "ControlNetModel.from_pretrained(...) (or a list of them) to from_pretrained")
            if class_name not in CONTROLNET_CLASSES:
                raise ValueError(f"{index_path} names {class_name} for 'controlnet'; supported: "
                                 f"{list(CONTROLNET_CLASSES)}. Fix the entry or pass controlnet=... yourself")
            path = os.path.join(folder, "controlnet")
            options = {key: overrides[key] for key in MODEL_LOAD_OPTIONS if key in overrides}
            dtype = component_dtype(merge_dtype_arguments(torch_dtype, options.pop("dtype", None)), "controlnet")
            loader = ControlNetModel if class_name == "ControlNetModel" else MultiControlNetModel
            overrides["controlnet"] = loader.from_pretrained(path, torch_dtype=dtype, variant=variant, **options)
        return super().from_pretrained(pretrained_model_name_or_path, torch_dtype, variant, **overrides)

    # ---- condition images ---------------------------------------------------------------------------------------
    def images_per_net(self, image: Any, option: str = "image") -> list:
        """The condition image(s) of each ControlNet (the argument named ``option``). One net: ``image``. Several: a
        list with one entry per net (each an image or a list of images), or diffusers' nested form
        [[net 0, net 1, ...] per prompt]."""
        count = len(self.controlnets)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs {option}=: the condition image (PIL image, numpy "
                             f"array, tensor, path or a list of them){'' if count == 1 else ', one per ControlNet'}")
        if count == 1:
            return [image]
        if not isinstance(image, (list, tuple)):
            raise TypeError(f"with {count} ControlNets, {option} must be a list of {count} condition images (one per "
                            f"ControlNet), got one {type(image).__name__}")
        if all(isinstance(entry, (list, tuple)) for entry in image):  # [[net 0, net 1, ...] per prompt]
            lengths = sorted({len(entry) for entry in image})
            if lengths != [count]:
                raise ValueError(f"{option} is a nested list whose sublists have {lengths} entries; each sublist "
                                 f"(one per prompt) must hold {count} images, one per ControlNet")
            image = [list(per_prompt) for per_prompt in zip(*image)]  # transpose -> one list per net
        if len(image) != count:
            raise ValueError(f"{option} has {len(image)} entries but there are {count} ControlNets; pass one condition "
                             "image (or list of images) per ControlNet")
        return list(image)

    def prepare_control_image(self, image: Any, height: int | None, width: int | None, batch: int, prompts: int,
                              double: bool, net: ControlNetModel, name: str) -> torch.Tensor:
        """One net's condition image (B, C, H, W) in [0, 1] (diffusers' control image processor: no [-1, 1]
        normalisation), resized to (height, width) (default: its own size floored to a multiple of the VAE's
        factor, 8 for Stable Diffusion), repeated to the batch (one image for all, or each of one per prompt
        ``num_images_per_prompt`` times), doubled for CFG when ``double``."""
        images = as_image_list(image, name)
        height, width = default_size(images, height, width, self.vae_scale_factor, name)
        if height < self.vae_scale_factor or width < self.vae_scale_factor:
            raise ValueError(f"{name} of size {height}x{width} is smaller than one latent pixel "
                             f"({self.vae_scale_factor}x{self.vae_scale_factor})")
        cond = to_float_batch(images, height, width, "RGB", name)  # (n, C, H, W)
        channels = net.config.conditioning_channels
        if cond.shape[1] != channels:
            raise ValueError(f"{name} has {cond.shape[1]} channels (shape {tuple(cond.shape)}) but its ControlNet "
                             f"takes conditioning_channels={channels}; pass images with {channels} channels")
        count = cond.shape[0]
        if count not in (1, prompts):
            raise ValueError(f"{name} holds {count} images but there are {prompts} prompts; pass 1 condition image "
                             "(used for every prompt) or one per prompt")
        cond = cond.repeat_interleave(batch // count, dim=0).to(device=self.device, dtype=net.dtype)  # (B, C, H, W)
        return torch.cat([cond] * 2) if double else cond  # CFG batch [uncond, cond]

    def prepare_control_images(self, image: Any, height: int | None, width: int | None, batch: int, prompts: int,
                               double: bool, option: str = "image") -> list[torch.Tensor]:
        """Every net's condition images (the argument named ``option``), checked to share one size (the output
        size)."""
        nets = self.controlnets
        per_net_images = self.images_per_net(image, option)
        conds = []
        for k, (net, images) in enumerate(zip(nets, per_net_images)):
            name = option if len(nets) == 1 else f"{option}[{k}]"
            conds.append(self.prepare_control_image(images, height, width, batch, prompts, double, net, name))
        sizes = [tuple(cond.shape[-2:]) for cond in conds]
        if len(set(sizes)) > 1:
            listed = ", ".join(f"{option}[{k}] {h}x{w}" for k, (h, w) in enumerate(sizes))
            raise ValueError(f"the condition images have different sizes ({listed}); pass height= and width= (each "
                             "image is then resized to them) or condition images of one size")
        return conds

    # ---- the ControlNets' residuals ---------------------------------------------------------------------------------
    def control_residuals(self, latents: torch.Tensor, t, text: torch.Tensor, conds: list[torch.Tensor],
                          scales: list[float], guess_mode: bool, do_cfg: bool):
        """The summed residuals of the ControlNets for the UNet's batch (2B with CFG), or (None, None) when no net
        acts at this step. In guess mode with CFG the nets see only the conditional half; the unconditional half
        gets zero residuals. As in diffusers, ``cross_attention_kwargs`` (a LoRA scale) reach the UNet only."""
        cond_half_only = guess_mode and do_cfg
        control_input = latents if cond_half_only or not do_cfg else torch.cat([latents] * 2)  # (B or 2B, 4, h, w)
        control_input = self.scheduler.scale_model_input(control_input, t)
        control_text = text.chunk(2)[1] if cond_half_only else text  # (B or 2B, 77, D)
        down, mid = summed_residuals(self.controlnets, control_input, t, control_text, conds, scales, guess_mode)
        if down is not None and cond_half_only:
            down = [torch.cat([torch.zeros_like(residual), residual]) for residual in down]  # (2B, C_k, h_k, w_k)
            mid = torch.cat([torch.zeros_like(mid), mid])
        return (None, None) if down is None else (tuple(down), mid)

    def controlled_noise(self, latents: torch.Tensor, t, text: torch.Tensor, conds: list[torch.Tensor],
                         scales: list[float], keep: list[float], guess_mode: bool, guidance_scale: float, step: int,
                         cross_attention_kwargs: dict | None = None,
                         extra_channels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's (guided) noise prediction at x_t with the ControlNets' residuals added; ``keep`` is this
        step's row of :func:`control_keep` (0 turns a net off outside its window)."""
        step_scales = [scale * kept for scale, kept in zip(scales, keep)]
        down, mid = self.control_residuals(latents, t, text, conds, step_scales, guess_mode,
                                           self.uses_cfg(guidance_scale))
        return self.predict_noise(latents, t, text, guidance_scale, extra_channels=extra_channels, step=step,
                                  cross_attention_kwargs=cross_attention_kwargs,
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def _control_options(self, controlnet_conditioning_scale, guess_mode, control_guidance_start,
                         control_guidance_end) -> tuple[list[float], list[float], list[float], bool]:
        """(scales, starts, ends): one entry per ControlNet, checked; and the guess mode in effect (a
        global-pool ControlNet implies it, as in diffusers)."""
        count = len(self.controlnets)
        scales = per_net("controlnet_conditioning_scale", controlnet_conditioning_scale, count, "scale")
        for scale in scales:
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise TypeError(f"controlnet_conditioning_scale must be a number (or a list of {count}, one per "
                                f"ControlNet), got {type(scale).__name__} {scale!r}")
            check_number("controlnet_conditioning_scale", scale)
        if not isinstance(guess_mode, bool):
            raise TypeError(f"guess_mode must be True or False, got {guess_mode!r}")
        starts = per_net("control_guidance_start", control_guidance_start, count, "start")
        ends = per_net("control_guidance_end", control_guidance_end, count, "end")
        check_guidance_windows(starts, ends)
        guess_mode = guess_mode or self.controlnets[0].config.global_pool_conditions
        return [float(s) for s in scales], [float(s) for s in starts], [float(e) for e in ends], guess_mode

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
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
        cross_attention_kwargs: dict | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
    ):
        check_size("height", height)
        check_size("width", width)
        self.check_output_type(output_type)
        check_sampling_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, eta, 0.0, generator)
        scales, starts, ends, guess_mode = self._control_options(controlnet_conditioning_scale, guess_mode,
                                                                 control_guidance_start, control_guidance_end)
        device, do_cfg = self.device, self.uses_cfg(guidance_scale)
        self.images_per_net(image)  # a missing image is reported before any work
        text, batch = self.text_conditioning(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             num_images_per_prompt, guidance_scale, clip_skip, cross_attention_kwargs)
        prompts = prompt_batch(prompt, prompt_embeds)
        conds = self.prepare_control_images(image, height, width, batch, prompts, do_cfg and not guess_mode)
        height, width = conds[0].shape[-2:]  # the condition images' size is the output size
        self.check_latent_size(latents, height, width)
        self.check_memory(batch, height, width, guidance_scale)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, text.dtype, device,
                                       generator, latents)
        step_kwargs = self.step_kwargs(generator, eta)
        keep = control_keep(len(timesteps), starts, ends)  # (steps, nets) of 0.0 / 1.0

        for i, t in enumerate(self.progress_bar(timesteps)):
            noise_pred = self.controlled_noise(latents, t, text, conds, scales, keep[i], guess_mode, guidance_scale, i,
                                               cross_attention_kwargs)
            latents = self.scheduler_step(noise_pred, t, latents, i, **step_kwargs)
            latents = self.after_step(callback_on_step_end, i, t, latents, prompt_embeds=text, image=conds)
        return self.finish(latents, output_type, return_dict)

    def check_latent_size(self, latents: Any, height: int, width: int) -> None:
        """Given ``latents`` must make an image of the condition image's size."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            return  # prepare_latents reports other problems
        size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        if size != (height, width):
            raise ValueError(f"latents of {latents.shape[-2]}x{latents.shape[-1]} make a {size[0]}x{size[1]} image "
                             f"but the condition image is {height}x{width}; pass height={size[0]}, width={size[1]} "
                             "(the condition image is resized to them) or latents of "
                             f"{height // self.vae_scale_factor}x{width // self.vae_scale_factor}")
