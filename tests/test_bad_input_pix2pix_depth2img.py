"""Structure control pipelines (InstructPix2Pix, depth2img): each bad argument ends in an error naming it, its shape
and the fix; plus the depth_estimator and from_pretrained paths that have no diffusers counterpart to compare with."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.pipelines import StableDiffusionDepth2ImgPipeline, StableDiffusionInstructPix2PixPipeline
from minidiff.pipelines.checks import NonFiniteError
from tests.tiny_components import tiny_components, tiny_pipeline
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

RED = PIL.Image.new("RGB", (32, 32), "red")


def depth(height: int = 32, width: int = 32, batch: int = 1) -> torch.Tensor:
    x = torch.linspace(1.0, 2.0, width)
    return x.expand(batch, height, width).clone()  # (B, H, W), depth growing left to right


@pytest.fixture(scope="module")
def pix2pix():
    return tiny_pipeline(StableDiffusionInstructPix2PixPipeline, in_channels=8)


@pytest.fixture(scope="module")
def depth2img():
    return tiny_pipeline(StableDiffusionDepth2ImgPipeline, in_channels=5)


def edit(pipe, **kwargs):
    args = dict(prompt="make it blue", image=RED, num_inference_steps=1, output_type="np",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs})


def redraw(pipe, **kwargs):
    return edit(pipe, **{"depth_map": depth(), "strength": 1.0, **kwargs})


# ---- InstructPix2Pix ------------------------------------------------------------------------------------------------
def test_pix2pix_runs(pix2pix):
    assert edit(pix2pix, num_images_per_prompt=2).images.shape == (2, 32, 32, 3)


def test_pix2pix_memory_estimate_counts_its_three_guidance_copies(pix2pix, monkeypatch):
    from minidiff.pipelines import memory
    one = memory.estimate_peak_bytes(pix2pix.unet, pix2pix.vae, 1, 32, 32, 1)
    three = memory.estimate_peak_bytes(pix2pix.unet, pix2pix.vae, 1, 32, 32, 3)
    assert one < memory.estimate_peak_bytes(pix2pix.unet, pix2pix.vae, 1, 32, 32, 2) < three
    monkeypatch.setattr(memory, "available_memory", lambda device: three - 1)  # fits twice the batch, not 3 times
    with pytest.raises(ValueError, match="activation memory"):
        edit(pix2pix, guidance_scale=7.5)
    assert edit(pix2pix, guidance_scale=1.0).images.shape == (1, 32, 32, 3)  # no guidance: one copy


def test_pix2pix_needs_an_8_channel_unet():
    with pytest.raises(ValueError, match=r"8 input channels \(4 noisy latents \+ 4 input-image latents\).*"
                                         r"in_channels=4.*StableDiffusionImg2ImgPipeline"):
        StableDiffusionInstructPix2PixPipeline(**tiny_components())


@pytest.mark.parametrize("value", [0.5, 0.0, -2.0])
def test_pix2pix_image_guidance_below_one_is_explained(pix2pix, value):
    with pytest.raises(ValueError, match=r"image_guidance_scale=.* is below 1.*how closely the edit follows the "
                                         r"input image.*1 adds no image guidance.*>= 1"):
        edit(pix2pix, image_guidance_scale=value)


@pytest.mark.parametrize("value, error", [(float("nan"), ValueError), ("1.5", TypeError), (True, TypeError)])
def test_pix2pix_image_guidance_must_be_a_finite_number(pix2pix, value, error):
    with pytest.raises(error, match="image_guidance_scale"):
        edit(pix2pix, image_guidance_scale=value)


def test_pix2pix_needs_an_image(pix2pix):
    with pytest.raises(ValueError, match="needs the image to edit: pass image="):
        edit(pix2pix, image=None)


def test_pix2pix_images_must_spread_over_the_prompts(pix2pix):
    with pytest.raises(ValueError, match=r"image has 3 entries.*batch of 2 images.*pass 1 image or one per prompt"):
        edit(pix2pix, prompt=["a", "b"], image=[RED] * 3)


def test_pix2pix_latents_shape_is_checked(pix2pix):
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 16\)"):
        edit(pix2pix, latents=torch.zeros(1, 4, 8, 8))


# ---- depth2img --------------------------------------------------------------------------------------------------
def test_depth2img_runs_and_returns_images(depth2img):
    out = redraw(depth2img, prompt=["a", "b"], num_images_per_prompt=2, strength=0.8, num_inference_steps=2)
    assert out.images.shape == (4, 32, 32, 3)
    assert redraw(depth2img, return_dict=False)[0].shape == (1, 32, 32, 3)


def test_depth2img_needs_a_5_channel_unet():
    with pytest.raises(ValueError, match=r"5 input channels \(4 noisy latents \+ 1 depth\).*in_channels=4.*"
                                         r"stable-diffusion-2-depth"):
        StableDiffusionDepth2ImgPipeline(**tiny_components())
    with pytest.raises(ValueError, match="in_channels=8"):
        StableDiffusionDepth2ImgPipeline(**tiny_components(in_channels=8))


@pytest.mark.parametrize("bad, fix", [(depth()[0], "depth_map[None]"), (depth()[:, None], "depth_map.squeeze(1)"),
                                      (torch.ones(1, 1, 1, 32, 32), "a (B, H, W) tensor")])
def test_depth2img_depth_map_shape(depth2img, bad, fix):
    expected = f"depth_map has shape {tuple(bad.shape)}; expected (B, H, W)"
    with pytest.raises(ValueError, match=re.escape(expected) + ".*pass " + re.escape(fix)):
        redraw(depth2img, depth_map=bad)


def test_depth2img_depth_map_must_be_a_tensor(depth2img):
    with pytest.raises(TypeError, match=r"depth_map must be a torch.Tensor of shape \(B, H, W\), got ndarray"):
        redraw(depth2img, depth_map=np.ones((1, 32, 32)))


def test_depth2img_depth_map_batch_must_spread(depth2img):
    with pytest.raises(ValueError, match=r"depth_map has 3 entries.*batch of 2"):
        redraw(depth2img, prompt=["a", "b"], depth_map=depth(batch=3))


def test_depth2img_constant_or_nonfinite_depth(depth2img):
    with pytest.raises(ValueError, match="depth_map is constant"):
        redraw(depth2img, depth_map=torch.ones(1, 32, 32))
    bad = depth()
    bad[0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="depth_map has 1 NaN"):
        redraw(depth2img, depth_map=bad)


def test_depth2img_without_depth_says_what_to_pass(depth2img):
    with pytest.raises(ValueError, match=r"pass depth_map= .*or build the pipeline with a depth_estimator"):
        redraw(depth2img, depth_map=None)


def test_depth2img_strength_and_image(depth2img):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        redraw(depth2img, strength=1.5)
    with pytest.raises(ValueError, match="depth2img needs an image"):
        redraw(depth2img, image=None)


def test_depth_estimator_is_any_callable():
    seen = []

    def estimator(pixels):
        seen.append(tuple(pixels.shape))
        return depth(16, 24, batch=pixels.shape[0])  # any spatial size: resized to the latent size

    components = tiny_components(in_channels=5)
    with_estimator = StableDiffusionDepth2ImgPipeline(**components, depth_estimator=estimator)
    with_estimator.set_progress_bar_config(disable=True)
    plain = StableDiffusionDepth2ImgPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    estimated = redraw(with_estimator, depth_map=None).images
    given = redraw(plain, depth_map=depth(16, 24)).images
    assert seen == [(1, 3, 32, 32)]
    np.testing.assert_array_equal(estimated, given)


def test_depth_estimator_errors():
    with pytest.raises(TypeError, match="depth_estimator must be a callable"):
        StableDiffusionDepth2ImgPipeline(**tiny_components(in_channels=5), depth_estimator="dpt")
    pipe = StableDiffusionDepth2ImgPipeline(**tiny_components(in_channels=5), depth_estimator=lambda x: x)
    with pytest.raises(ValueError, match=r"depth_estimator output has shape \(1, 3, 32, 32\); expected \(B, H, W\)"):
        redraw(pipe, depth_map=None)


def test_depth2img_folder_with_a_dpt_entry_loads_with_a_warning(depth2img, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        depth2img.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "model_index.json").read_text())["depth_estimator"] == [None, None]
        StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path)  # a null entry: no warning
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.update(depth_estimator=["transformers", "DPTForDepthEstimation"],
                 feature_extractor=["transformers", "DPTImageProcessor"])
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match=r"lists a depth_estimator \(DPTForDepthEstimation\); minidiff does not load "
                                         r"transformers' depth models.*pass depth_map="):
        pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path)
    assert pipe.depth_estimator is None
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="pass depth_map="):
        redraw(pipe, depth_map=None)
    assert redraw(pipe).images.shape == (1, 32, 32, 3)


def test_depth2img_saving_a_plain_callable_estimator_warns(tmp_path):
    pipe = StableDiffusionDepth2ImgPipeline(**tiny_components(in_channels=5), depth_estimator=lambda x: x[:, 0])
    with pytest.warns(UserWarning, match="plain callable and is not saved"):
        pipe.save_pretrained(tmp_path)
    assert pipe.depth_estimator is not None
    assert json.loads((tmp_path / "model_index.json").read_text())["depth_estimator"] == [None, None]
