"""Unconditional image generation in pixel space: DDPMPipeline (Ho et al. 2020) and DDIMPipeline (Song et al. 2021).

Start from Gaussian noise of the UNet's sample size and walk the scheduler's timesteps, one UNet call per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.outputs import BaseOutput
from minidiff.pipelines.base import DiffusionPipeline
from minidiff.pipelines.images import OUTPUT_TYPES, postprocess
from minidiff.random import randn_tensor


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: Any


class DDPMPipeline(DiffusionPipeline):
    """Ancestral sampling with whatever scheduler is attached (a DDPMScheduler in the tutorials)."""

    component_names = ("unet", "scheduler")

    def __init__(self, unet, scheduler) -> None:
        super().__init__(unet=unet, scheduler=scheduler)

    def initial_noise(self, batch_size: int, generator) -> torch.Tensor:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}; pass one per image")
        shape = (batch_size, self.unet.config.in_channels, height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000, output_type: str = "pil",
                 return_dict: bool = True, **step_kwargs: Any):
        if output_type not in OUTPUT_TYPES[:3]:
            raise ValueError(f"output_type={output_type!r} is not supported; accepted values: {list(OUTPUT_TYPES[:3])}")
        image = self.initial_noise(batch_size, generator)  # x_T ~ N(0, I), (B, C, H, W)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t).sample
            image = self.scheduler.step(model_output, t, image, generator=generator, **step_kwargs).prev_sample
        images = postprocess(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class DDIMPipeline(DDPMPipeline):
    """DDIM sampling (Song et al. 2021): few steps, ``eta`` = 0 deterministic, 1 like DDPM."""

    def __init__(self, unet, scheduler) -> None:
        from minidiff.schedulers import DDIMScheduler

        super().__init__(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))

    def __call__(self, batch_size: int = 1, generator=None, eta: float = 0.0, num_inference_steps: int = 50,
                 use_clipped_model_output: bool | None = None, output_type: str = "pil", return_dict: bool = True):
        return super().__call__(batch_size, generator, num_inference_steps, output_type, return_dict, eta=eta,
                                use_clipped_model_output=bool(use_clipped_model_output))
