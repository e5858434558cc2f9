"""StableDiffusionControlNetPipeline parity with diffusers 0.42.1: the same saved pipeline folders (one ControlNet, and
a MultiControlNet of two), prompt, condition images and seed give the same np images (1e-4 absolute).

The ControlNets share the tiny UNet's encoder options (parity/pipeline_fixtures.py) with a 2-level condition encoder
(the tiny VAE's factor 2); every parameter is perturbed so the zero convolutions take part.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import minidiff
from minidiff.pipelines.controlnet import MultiControlNetModel, StableDiffusionControlNetPipeline
from parity.pipeline_fixtures import make_image, randomize_, reference_components
from parity.report import compare
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

NP_TOL = 1e-4  # absolute, images in [0, 1]
PROMPTS = ["a red circle on a blue background", "a small yellow square in the top left"]
COMPONENT = "StableDiffusionControlNetPipeline"


def reference_controlnet(seed: int, **extra) -> diffusers.ControlNetModel:
    """A ControlNet with the fixture UNet's encoder (block_out_channels (8, 16), one layer per block)."""
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4, down_block_types=("DownBlock2D",
                                                                                          "CrossAttnDownBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2, conditioning_embedding_out_channels=(4, 8),
        **extra,
    )
    randomize_(net, seed, scale=0.1)
    return net.eval()


def build(folder, controlnet, name: str = "StableDiffusionControlNetPipeline", in_channels: int = 4):
    """diffusers' pipeline ``name`` with ``controlnet`` on the tiny reference components, saved, and minidiff's
    pipeline of the same name loaded from that folder."""
    reference = getattr(diffusers, name)(
        **reference_components(folder, in_channels=in_channels), controlnet=controlnet, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(folder / "pipe")
    mine = getattr(minidiff, name).from_pretrained(folder / "pipe")
    mine.set_progress_bar_config(disable=True)
    return reference, mine


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return build(tmp_path_factory.mktemp("controlnet"), reference_controlnet(3))


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    return build(tmp_path_factory.mktemp("multicontrolnet"), [reference_controlnet(3), reference_controlnet(4)])


def use_scheduler(reference, mine, name: str) -> None:
    reference.scheduler = getattr(diffusers, name).from_config(reference.scheduler.config)
    mine.scheduler = getattr(minidiff, name).from_config(reference.scheduler.config)


def run_both(reference, mine, seed: int = 0, **kwargs):
    args = {"prompt": PROMPTS, "num_inference_steps": 4, "output_type": "np", **kwargs}
    ours = mine(**args, generator=torch.Generator().manual_seed(seed)).images
    theirs = reference(**args, generator=torch.Generator().manual_seed(seed)).images
    return ours, theirs


def test_loaded_components(single, multi):
    assert isinstance(single[1].controlnet, minidiff.ControlNetModel)
    assert isinstance(multi[1].controlnet, MultiControlNetModel) and len(multi[1].controlnets) == 2


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_single_controlnet(single, scheduler, guidance_scale):
    reference, mine = single
    use_scheduler(reference, mine, scheduler)
    ours, theirs = run_both(reference, mine, image=make_image(32), guidance_scale=guidance_scale)
    compare(COMPONENT, f"1 ControlNet {scheduler} cfg={guidance_scale}", ours, theirs, NP_TOL, "abs")


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("guess_mode cfg=5", dict(guess_mode=True, guidance_scale=5.0)),
        ("scale 0.5, window 0.2-0.8, 5 steps", dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.2,
                                                    control_guidance_end=0.8, num_inference_steps=5)),
        ("48x40 PIL image resized to 32x32, negative prompt",
         dict(image=make_image(48, seed=1).resize((40, 48)), height=32, width=32, negative_prompt=["dark", "blur"])),
        ("per-prompt images, 2 per prompt", dict(image=[make_image(32, 1), make_image(32, 2)],
                                                 num_images_per_prompt=2)),
        ("float numpy image (1, 40, 40, 3) resized to 32x32",
         dict(image=np.random.default_rng(3).random((1, 40, 40, 3)), height=32, width=32)),
        ("float tensor image, 64x32 output", dict(image=torch.rand(1, 3, 64, 32, generator=torch.Generator()
                                                                   .manual_seed(5)))),
    ],
)
def test_single_controlnet_options(single, case, kwargs):
    reference, mine = single
    use_scheduler(reference, mine, "DDIMScheduler")
    kwargs = {"image": make_image(32), "guidance_scale": 5.0, **kwargs}
    ours, theirs = run_both(reference, mine, **kwargs)
    compare(COMPONENT, case, ours, theirs, NP_TOL, "abs")


def test_global_pool_controlnet_implies_guess_mode(single, tmp_path):
    reference, mine = single
    net = reference_controlnet(5, global_pool_conditions=True)
    net.save_pretrained(tmp_path / "net")
    reference = diffusers.StableDiffusionControlNetPipeline(**{**reference.components, "controlnet": net})
    reference.set_progress_bar_config(disable=True)
    loaded = minidiff.ControlNetModel.from_pretrained(tmp_path / "net")
    mine = StableDiffusionControlNetPipeline(**{**mine.components, "controlnet": loaded})
    mine.set_progress_bar_config(disable=True)
    use_scheduler(reference, mine, "DDIMScheduler")
    ours, theirs = run_both(reference, mine, image=make_image(32), guidance_scale=5.0)
    compare(COMPONENT, "global_pool_conditions (guess mode implied) cfg=5", ours, theirs, NP_TOL, "abs")


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("2 ControlNets cfg=5", dict()),
        ("2 ControlNets scales [1.0, 0.5], windows [0-1, 0.2-0.8]",
         dict(controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.2],
              control_guidance_end=[1.0, 0.8], num_inference_steps=5)),
        ("2 ControlNets guess_mode, scale 0.5", dict(guess_mode=True, controlnet_conditioning_scale=0.5)),
    ],
)
def test_multi_controlnet(multi, case, kwargs):
    reference, mine = multi
    use_scheduler(reference, mine, "DPMSolverMultistepScheduler")
    ours, theirs = run_both(reference, mine, image=[make_image(32, 1), make_image(32, 2)], guidance_scale=5.0,
                            **kwargs)
    compare(COMPONENT, f"{case} (DPMSolver)", ours, theirs, NP_TOL, "abs")


def test_minidiff_saved_folder_loads_in_diffusers(multi, tmp_path):
    reference, mine = multi
    use_scheduler(reference, mine, "DDIMScheduler")
    mine.save_pretrained(tmp_path / "saved")
    theirs = diffusers.StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.controlnet).__name__ == "MultiControlNetModel" and len(theirs.controlnet.nets) == 2
    ours, reread = run_both(theirs, mine, image=[make_image(32, 1), make_image(32, 2)], guidance_scale=3.0,
                            num_inference_steps=2)
    assert np.abs(ours - reread).max() <= NP_TOL
