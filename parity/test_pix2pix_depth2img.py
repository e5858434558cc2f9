"""Structure control parity: InstructPix2Pix (8-channel UNet, three-way guidance) and depth2img (5-channel SD2 depth
UNet) against diffusers, from the same saved folders, images, prompts and seeds."""

from __future__ import annotations

import diffusers
import pytest
import torch

from minidiff.pipelines import StableDiffusionDepth2ImgPipeline, StableDiffusionInstructPix2PixPipeline
from parity.pipeline_fixtures import make_image, reference_components
from parity.report import compare
from parity.test_pipelines import NP_TOL, PROMPTS, load_minidiff, run_both, use_scheduler

SCHEDULERS = ["DDIMScheduler", "EulerAncestralDiscreteScheduler"]
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
NO_DEPTH_ESTIMATOR = dict(depth_estimator=None, feature_extractor=None)  # minidiff takes depth_map= instead


def saved_pair(folder, reference_class, mine_class, absent: dict, **component_kwargs):
    """The diffusers pipeline (built from seeded tiny components, saved) and minidiff's from_pretrained of the
    folder (float32: the multi-step guided cases stay within ~3e-6 of diffusers, float64 is not needed)."""
    components = reference_components(folder, **component_kwargs)
    reference = reference_class(**components, **absent)
    reference.save_pretrained(folder / "pipe")
    reference.set_progress_bar_config(disable=True)
    mine = load_minidiff(mine_class, folder / "pipe")
    return reference, mine, dict(reference.scheduler.config), folder / "pipe"


@pytest.fixture(scope="module")
def pix2pix(tmp_path_factory):
    return saved_pair(tmp_path_factory.mktemp("pix2pix"), diffusers.StableDiffusionInstructPix2PixPipeline,
                      StableDiffusionInstructPix2PixPipeline, NO_SAFETY_CHECKER, in_channels=8)


@pytest.fixture(scope="module")
def depth2img(tmp_path_factory):
    return saved_pair(tmp_path_factory.mktemp("depth2img"), diffusers.StableDiffusionDepth2ImgPipeline,
                      StableDiffusionDepth2ImgPipeline, NO_DEPTH_ESTIMATOR, in_channels=5, sd2=True)


@pytest.mark.parametrize("guidance_scale, image_guidance_scale", [(1.0, 1.5), (6.0, 1.0), (6.0, 1.5)])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_pix2pix(pix2pix, scheduler, guidance_scale, image_guidance_scale):
    reference, mine, config, _ = pix2pix
    use_scheduler(reference, mine, scheduler, config)
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, image=make_image(32), num_inference_steps=4,
                            guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale)
    compare("StableDiffusionInstructPix2PixPipeline",
            f"{scheduler} cfg={guidance_scale} image cfg={image_guidance_scale}", ours, theirs, NP_TOL, "abs")


def test_pix2pix_two_images_per_prompt(pix2pix):
    reference, mine, config, _ = pix2pix
    use_scheduler(reference, mine, "DDIMScheduler", config)
    images = [make_image(32, seed=1), make_image(32, seed=2)]
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, image=images, num_images_per_prompt=2,
                            num_inference_steps=3, guidance_scale=5.0, image_guidance_scale=1.5,
                            negative_prompt=["blurry", "dark"])
    assert ours.shape == (4, 32, 32, 3)
    compare("StableDiffusionInstructPix2PixPipeline", "2 images per prompt, negative prompt", ours, theirs,
            NP_TOL, "abs")


def depth_map(height: int = 32, width: int = 32) -> torch.Tensor:
    """A smooth (1, H, W) depth ramp plus a bump, in arbitrary units (the pipelines min-max normalise it)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return (3.0 + 2.0 * x + torch.exp(-((x - 0.4) ** 2 + (y - 0.6) ** 2) / 0.05))[None]


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_depth2img(depth2img, scheduler, strength):
    reference, mine, config, _ = depth2img
    use_scheduler(reference, mine, scheduler, config)
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, image=make_image(32), depth_map=depth_map(24, 40),
                            strength=strength, num_inference_steps=5, guidance_scale=5.0)
    compare("StableDiffusionDepth2ImgPipeline", f"{scheduler} strength {strength}", ours, theirs, NP_TOL,
            "abs")


def test_depth2img_folder_scheduler_no_guidance_two_per_prompt(depth2img):
    """The scheduler as saved in the folder (steps_offset=0: diffusers' depth2img does not correct it), no guidance."""
    reference, _, _, folder = depth2img
    reference.scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    mine = load_minidiff(StableDiffusionDepth2ImgPipeline, folder)
    ours, theirs = run_both(reference, mine, prompt=PROMPTS[0], image=make_image(32), depth_map=depth_map(),
                            strength=0.8, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=2)
    assert ours.shape == (2, 32, 32, 3)
    compare("StableDiffusionDepth2ImgPipeline", "folder's scheduler, no guidance, 2 images per prompt", ours, theirs,
            NP_TOL, "abs")
