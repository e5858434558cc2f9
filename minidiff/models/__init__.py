from minidiff.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from minidiff.models.controlnet import ControlNetConfig, ControlNetModel, ControlNetOutput
from minidiff.models.unet_2d import UNet2DConfig, UNet2DModel, UNet2DOutput
from minidiff.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel, UNet2DConditionOutput
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
