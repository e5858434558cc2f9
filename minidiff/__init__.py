"""minidiff: a small, readable, plain-PyTorch Stable Diffusion stack, checked numerically against diffusers.

Public names mirror diffusers, so ``from minidiff import StableDiffusionPipeline, DDIMScheduler`` replaces the
diffusers import. Names are resolved on first use, so importing minidiff stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "minidiff.schedulers": (
        "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
        "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "SchedulerOutput",
        "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
        "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler",
        "TCDScheduler",
    ),
    "minidiff.models": ("UNet2DModel", "UNet2DConditionModel", "ControlNetModel", "AutoencoderKL", "CLIPTextModel",
                        "CLIPTextModelWithProjection", "CLIPTextConfig"),
    "minidiff.text": ("CLIPTokenizer",),
    "minidiff.pipelines": (
        "DiffusionPipeline", "DDPMPipeline", "DDIMPipeline", "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionDDIMInversionPipeline",
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
        "StableDiffusionInstructPix2PixPipeline", "StableDiffusionDepth2ImgPipeline",
        "StableDiffusionControlNetPipeline", "MultiControlNetModel", "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["ops"]


def __getattr__(name: str):
    if name == "ops":
        return importlib.import_module("minidiff.ops")
    if name not in _WHERE:
        raise AttributeError(f"module 'minidiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
