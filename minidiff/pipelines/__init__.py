"""Pipelines: each a readable sampling loop over the shared Stable Diffusion helpers."""

from minidiff.pipelines.base import DiffusionPipeline
from minidiff.pipelines.controlnet import MultiControlNetModel, StableDiffusionControlNetPipeline
from minidiff.pipelines.controlnet_img2img import (StableDiffusionControlNetImg2ImgPipeline,
                                                  StableDiffusionControlNetInpaintPipeline)
from minidiff.pipelines.ddpm import DDIMPipeline, DDPMPipeline, ImagePipelineOutput
from minidiff.pipelines.depth2img import StableDiffusionDepth2ImgPipeline
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline
from minidiff.pipelines.inpaint import StableDiffusionInpaintPipeline
from minidiff.pipelines.inversion import InversionOutput, StableDiffusionDDIMInversionPipeline
from minidiff.pipelines.pix2pix import StableDiffusionInstructPix2PixPipeline
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput
from minidiff.pipelines.stable_diffusion_xl import StableDiffusionXLPipeline, StableDiffusionXLPipelineOutput
from minidiff.pipelines.stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline
from minidiff.pipelines.stable_diffusion_xl_inpaint import StableDiffusionXLInpaintPipeline

__all__ = [
    "DiffusionPipeline", "DDPMPipeline", "DDIMPipeline", "ImagePipelineOutput",
    "StableDiffusionPipeline", "StableDiffusionPipelineOutput", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline", "StableDiffusionDDIMInversionPipeline", "InversionOutput",
    "StableDiffusionXLPipeline", "StableDiffusionXLPipelineOutput", "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline", "StableDiffusionInstructPix2PixPipeline", "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionControlNetPipeline", "MultiControlNetModel", "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
]
