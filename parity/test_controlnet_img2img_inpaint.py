"""StableDiffusionControlNetImg2ImgPipeline and StableDiffusionControlNetInpaintPipeline (4- and 9-channel UNets)
parity with diffusers 0.42.1: the same saved pipeline folders (one ControlNet, and a MultiControlNet of two),
prompts, init image, mask, condition images and seed give the same np images (1e-4 absolute).

Tiny seeded components of parity/pipeline_fixtures.py and the ControlNets of parity/test_controlnet_pipeline.py.
"""

from __future__ import annotations

import pytest

from parity.pipeline_fixtures import make_image, make_mask
from parity.report import compare
from parity.test_controlnet_pipeline import build, reference_controlnet, run_both, use_scheduler
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

NP_TOL = 1e-4  # absolute, images in [0, 1]
IMG2IMG = "StableDiffusionControlNetImg2ImgPipeline"


def build_img2img(folder, controlnet):
    return build(folder, controlnet, IMG2IMG)


@pytest.fixture(scope="module")
def img2img_single(tmp_path_factory):
    return build_img2img(tmp_path_factory.mktemp("cn_img2img"), reference_controlnet(3))


@pytest.fixture(scope="module")
def img2img_multi(tmp_path_factory):
    return build_img2img(tmp_path_factory.mktemp("cn_img2img_multi"), [reference_controlnet(3),
                                                                       reference_controlnet(4)])


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_img2img_single(img2img_single, scheduler, guidance_scale, strength):
    reference, mine = img2img_single
    use_scheduler(reference, mine, scheduler)
    ours, theirs = run_both(reference, mine, image=make_image(32, 7), control_image=make_image(32),
                            guidance_scale=guidance_scale, strength=strength, num_inference_steps=5)
    compare(IMG2IMG, f"1 ControlNet {scheduler} cfg={guidance_scale} strength={strength}", ours, theirs, NP_TOL,
            "abs")


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("guess_mode cfg=5 strength=0.8", dict(guess_mode=True)),
        ("default scale 0.8, window 0.2-0.8, 6 steps", dict(control_guidance_start=0.2, control_guidance_end=0.8,
                                                             num_inference_steps=6)),
        ("40x48 images resized to 32x32, 2 per prompt, negative prompt",
         dict(image=make_image(48, 7).resize((40, 48)), control_image=make_image(48, 1).resize((40, 48)),
              height=32, width=32, num_images_per_prompt=2, negative_prompt=["dark", "blur"])),
    ],
)
def test_img2img_options(img2img_single, case, kwargs):
    reference, mine = img2img_single
    use_scheduler(reference, mine, "DDIMScheduler")
    kwargs = {"image": make_image(32, 7), "control_image": make_image(32), "guidance_scale": 5.0, **kwargs}
    ours, theirs = run_both(reference, mine, **kwargs)
    compare(IMG2IMG, case, ours, theirs, NP_TOL, "abs")


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("2 ControlNets cfg=5 strength=0.8", dict()),
        ("2 ControlNets guess_mode, scales [1.0, 0.5], strength=0.5",
         dict(guess_mode=True, controlnet_conditioning_scale=[1.0, 0.5], strength=0.5, num_inference_steps=6)),
    ],
)
def test_img2img_multi(img2img_multi, case, kwargs):
    reference, mine = img2img_multi
    use_scheduler(reference, mine, "DPMSolverMultistepScheduler")
    ours, theirs = run_both(reference, mine, image=make_image(32, 7), control_image=[make_image(32, 1),
                            make_image(32, 2)], guidance_scale=5.0, **kwargs)
    compare(IMG2IMG, f"{case} (DPMSolver)", ours, theirs, NP_TOL, "abs")


# ---- inpainting ---------------------------------------------------------------------------------------------------
INPAINT = "StableDiffusionControlNetInpaintPipeline"


def build_inpaint(folder, controlnet, in_channels: int):
    return build(folder, controlnet, INPAINT, in_channels)


@pytest.fixture(scope="module", params=[4, 9], ids=["4-channel UNet", "9-channel UNet"])
def inpaint_single(request, tmp_path_factory):
    return build_inpaint(tmp_path_factory.mktemp(f"cn_inpaint{request.param}"), reference_controlnet(3),
                         request.param), request.param


@pytest.mark.parametrize(
    "scheduler, guidance_scale, strength",
    [("DDIMScheduler", 1.0, 1.0), ("DDIMScheduler", 5.0, 0.5), ("EulerAncestralDiscreteScheduler", 5.0, 0.8),
     ("EulerAncestralDiscreteScheduler", 1.0, 0.5)],
)
def test_inpaint_single(inpaint_single, scheduler, guidance_scale, strength):
    (reference, mine), channels = inpaint_single
    use_scheduler(reference, mine, scheduler)
    ours, theirs = run_both(reference, mine, image=make_image(32, 7), mask_image=make_mask(32),
                            control_image=make_image(32), guidance_scale=guidance_scale, strength=strength,
                            num_inference_steps=5)
    compare(INPAINT, f"{channels}-ch UNet, 1 ControlNet {scheduler} cfg={guidance_scale} strength={strength}", ours,
            theirs, NP_TOL, "abs")


def test_inpaint_guess_mode(inpaint_single):
    (reference, mine), channels = inpaint_single
    use_scheduler(reference, mine, "DDIMScheduler")
    ours, theirs = run_both(reference, mine, image=make_image(32, 7), mask_image=make_mask(32),
                            control_image=make_image(32), guidance_scale=5.0, guess_mode=True, strength=0.8)
    compare(INPAINT, f"{channels}-ch UNet, guess_mode cfg=5 strength=0.8", ours, theirs, NP_TOL, "abs")


def test_inpaint_multi(tmp_path):
    reference, mine = build_inpaint(tmp_path, [reference_controlnet(3), reference_controlnet(4)], 9)
    use_scheduler(reference, mine, "DPMSolverMultistepScheduler")
    ours, theirs = run_both(reference, mine, image=make_image(32, 7), mask_image=make_mask(32),
                            control_image=[make_image(32, 1), make_image(32, 2)], guidance_scale=5.0,
                            controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.2],
                            strength=0.8)
    compare(INPAINT, "9-ch UNet, 2 ControlNets scales [1.0, 0.5], windows [0-1, 0.2-1] (DPMSolver)", ours, theirs,
            NP_TOL, "abs")
