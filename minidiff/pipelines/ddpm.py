"""Unconditional image generation in pixel space: DDPMPipeline (Ho et al. 2020) and DDIMPipeline (Song et al. 2021).

Start from Gaussian noise of the UNet's sample size and walk the scheduler's timesteps, one UNet call per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidiff.outputs import BaseOutput
from minidiff.pipelines.base import DiffusionPipeline
from minidiff.pipelines.checks import check_finite, check_int, check_number
from minidiff.pipelines.guidance import sample_with_loss_guidance
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

    def initial_noise(self, batch_size: int, generator, output_type: str) -> torch.Tensor:
        """x_T ~ N(0, I) of shape (B, C, H, W), after checking the arguments every sampler here shares."""
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES[:3]:
            raise ValueError(f"output_type={output_type!r} is not supported; accepted values: {list(OUTPUT_TYPES[:3])}")
        check_int("batch_size", batch_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}; pass one per image")
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)

    @staticmethod
    def package(image: torch.Tensor, output_type: str, return_dict: bool):
        images = postprocess(check_finite(image, "the sampled image", hint="check the UNet weights"), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000, output_type: str = "pil",
                 return_dict: bool = True, **step_kwargs: Any):
        check_int("num_inference_steps", num_inference_steps)
        image = self.initial_noise(batch_size, generator, output_type)  # x_T, (B, C, H, W)
        self.scheduler.set_timesteps(num_inference_steps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_output = check_finite(self.unet(image, t).sample, f"UNet output at step {i} (t={int(t)})")
            image = self.scheduler.step(model_output, t, image, generator=generator, **step_kwargs).prev_sample
            check_finite(image, f"sample after scheduler step {i} (t={int(t)})")
        return self.package(image, output_type, return_dict)

    def guided(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], loss_scale: float = 40.0, batch_size: int = 1,
               num_inference_steps: int = 50, generator=None, output_type: str = "pil", return_dict: bool = True):
        """Sampling steered by ``loss_fn(x0_hat)`` (x0_hat in [-1, 1]), e.g. a colour loss; see
        ``minidiff.pipelines.guidance.sample_with_loss_guidance``."""
        check_int("num_inference_steps", num_inference_steps)
        check_number("loss_scale", loss_scale)
        noise = self.initial_noise(batch_size, generator, output_type)
        image = sample_with_loss_guidance(self.unet, self.scheduler, noise, loss_fn, loss_scale, num_inference_steps,
                                          self.progress_bar)
        return self.package(image, output_type, return_dict)


class DDIMPipeline(DDPMPipeline):
    """DDIM sampling (Song et al. 2021): few steps, ``eta`` = 0 deterministic, 1 like DDPM."""

    def __init__(self, unet, scheduler) -> None:
        from minidiff.schedulers import DDIMScheduler

        super().__init__(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))

    def __call__(self, batch_size: int = 1, generator=None, eta: float = 0.0, num_inference_steps: int = 50,
                 use_clipped_model_output: bool | None = None, output_type: str = "pil", return_dict: bool = True):
        check_number("eta", eta, low=0.0)
        return super().__call__(batch_size, generator, num_inference_steps, output_type, return_dict, eta=eta,
                                use_clipped_model_output=bool(use_clipped_model_output))
