"""StableDiffusionControlNetImg2ImgPipeline / StableDiffusionControlNetInpaintPipeline: a missing control image,
init / mask / condition images of different sizes and strength out of range end in an error naming the option, the
sizes and the fix; 9-channel inpainting UNets take 4-channel ControlNets."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.pipelines.controlnet_img2img import (StableDiffusionControlNetImg2ImgPipeline,
                                                  StableDiffusionControlNetInpaintPipeline)
from minidiff.pipelines.images import preprocess_image
from tests.test_bad_input_controlnet_pipeline import controlnet
from tests.tiny_components import tiny_components
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

RED = PIL.Image.new("RGB", (32, 32), "red")
BLUE = PIL.Image.new("RGB", (40, 40), "blue")
MASK = PIL.Image.new("L", (32, 32), 255)


def pipeline(cls, nets, in_channels: int = 4):
    pipe = cls(**tiny_components(in_channels=in_channels), controlnet=nets)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def img2img():
    return pipeline(StableDiffusionControlNetImg2ImgPipeline, controlnet())


@pytest.fixture(scope="module")
def inpaint():
    return pipeline(StableDiffusionControlNetInpaintPipeline, controlnet(), in_channels=9)


def run(pipe, **kwargs):
    args = dict(prompt="a red circle", image=RED, control_image=RED, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0))
    if isinstance(pipe, StableDiffusionControlNetInpaintPipeline):
        args["mask_image"] = MASK
    return pipe(**{**args, **kwargs}).images


# ---- what works ---------------------------------------------------------------------------------------------------
def test_runs_and_control_matters(img2img, inpaint):
    for pipe in (img2img, inpaint):
        controlled = run(pipe)
        assert controlled.shape == (1, 32, 32, 3)
        assert np.abs(controlled - run(pipe, controlnet_conditioning_scale=0.0)).max() > 1e-4


def test_multi_controlnet_and_resizing():
    pipe = pipeline(StableDiffusionControlNetImg2ImgPipeline, [controlnet(0), controlnet(1)])
    out = run(pipe, image=BLUE, control_image=[RED, BLUE], height=32, width=32, guess_mode=True)
    assert out.shape == (1, 32, 32, 3)


def test_four_channel_inpaint_keeps_the_unmasked_region():
    """With a 4-channel UNet and nothing to repaint, the result is the init image's latents (the blend's last step)."""
    pipe = pipeline(StableDiffusionControlNetInpaintPipeline, controlnet())
    keep_all = PIL.Image.new("L", (32, 32), 0)
    out = run(pipe, mask_image=keep_all, strength=0.5, guidance_scale=3.0, output_type="latent")
    pixels = preprocess_image(RED, 32, 32, pipe.vae_scale_factor)  # (1, 3, 32, 32) in [-1, 1]
    clean = pipe.encode_image_latents(pixels, 1, torch.Generator().manual_seed(0))  # the first random draw
    assert torch.allclose(out, clean, atol=1e-6)


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["img2img", "inpaint"])
def test_missing_control_image(request, which):
    pipe = request.getfixturevalue(which)
    with pytest.raises(ValueError, match=r"needs control_image=: the condition image"):
        run(pipe, control_image=None)


def test_missing_init_image_or_mask(img2img, inpaint):
    with pytest.raises(ValueError, match=r"needs image=: the init image .* condition goes in control_image="):
        run(img2img, image=None)
    with pytest.raises(ValueError, match=r"needs mask_image=: the init image and the mask"):
        run(inpaint, mask_image=None)


@pytest.mark.parametrize("which", ["img2img", "inpaint"])
def test_control_image_of_another_size(request, which):
    pipe = request.getfixturevalue(which)
    with pytest.raises(ValueError, match=r"image is 32x32 but control_image is 40x40 .*pass height= and width="):
        run(pipe, control_image=BLUE)


def test_mask_of_another_size(inpaint):
    with pytest.raises(ValueError, match=r"image is 32x32 but mask_image is 40x40; pass height= and width="):
        run(inpaint, mask_image=PIL.Image.new("L", (40, 40), 255))


def test_multi_condition_images_of_different_sizes():
    pipe = pipeline(StableDiffusionControlNetImg2ImgPipeline, [controlnet(0), controlnet(1)])
    with pytest.raises(ValueError, match=r"different sizes \(control_image\[0\] 32x32, control_image\[1\] 40x40\)"):
        run(pipe, control_image=[RED, BLUE])
    with pytest.raises(ValueError, match=r"control_image has 1 entries but there are 2 ControlNets"):
        run(pipe, control_image=[RED])


@pytest.mark.parametrize("which", ["img2img", "inpaint"])
@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_out_of_range(request, which, strength):
    pipe = request.getfixturevalue(which)
    with pytest.raises(ValueError, match=rf"strength must be in \[0, 1\], got {strength}"):
        run(pipe, strength=strength)


def test_strength_leaving_no_step(img2img):
    with pytest.raises(ValueError, match=r"strength=0.1 with num_inference_steps=2 leaves no denoising step"):
        run(img2img, strength=0.1)


def test_controlnet_must_take_the_latents_not_the_inpaint_input():
    with pytest.raises(ValueError, match=r"controlnet has in_channels=9 but its noisy latents have 4 channels"):
        pipeline(StableDiffusionControlNetInpaintPipeline, controlnet(in_channels=9), in_channels=9)
