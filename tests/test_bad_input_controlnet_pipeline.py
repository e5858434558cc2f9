"""StableDiffusionControlNetPipeline: each bad argument (condition images, ControlNets that do not fit the UNet,
per-net lists of the wrong length, guidance windows) ends in an error naming it, the sizes and the fix; condition
images of another size are resized only as diffusers does (to height/width when given)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.models import ControlNetModel
from minidiff.pipelines.controlnet import MultiControlNetModel, StableDiffusionControlNetPipeline, control_keep
from tests.tiny_components import tiny_components
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

# the tiny UNet's encoder options, with a 2-level condition encoder (the tiny VAE shrinks by 2)
CONTROLNET = dict(block_out_channels=(8, 16), layers_per_block=1, in_channels=4, norm_num_groups=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=16,
                  attention_head_dim=2, conditioning_embedding_out_channels=(4, 8))
RED = PIL.Image.new("RGB", (32, 32), "red")
BLUE = PIL.Image.new("RGB", (40, 40), "blue")


def controlnet(seed: int = 0, **overrides) -> ControlNetModel:
    torch.manual_seed(seed)
    net = ControlNetModel(**{**CONTROLNET, **overrides}).eval()
    with torch.no_grad():  # non-zero zero-convolutions, so the control shows in the output
        for param in net.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    return net


def pipeline(nets) -> StableDiffusionControlNetPipeline:
    pipe = StableDiffusionControlNetPipeline(**tiny_components(), controlnet=nets)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def single():
    return pipeline(controlnet())


@pytest.fixture(scope="module")
def multi():
    return pipeline([controlnet(0), controlnet(1)])


def generate(pipe, **kwargs):
    args = dict(prompt="a red circle", image=RED, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


# ---- what works ---------------------------------------------------------------------------------------------------
def test_runs_and_control_matters(single, multi):
    controlled = generate(single)
    assert controlled.shape == (1, 32, 32, 3)
    assert np.abs(controlled - generate(single, controlnet_conditioning_scale=0.0)).max() > 1e-3
    assert generate(multi, image=[RED, RED], guess_mode=True).shape == (1, 32, 32, 3)


def test_callback_sees_the_condition_images(single):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tuple(tensors["image"][0].shape))
        return tensors

    generate(single, guidance_scale=3.0, callback_on_step_end=callback)
    assert seen == [(2, 3, 32, 32)] * 2  # the CFG batch [uncond, cond], each step


def test_condition_image_of_another_size_is_resized_to_height_width(single):
    """As diffusers: the condition image is stretched to height x width when they are given ..."""
    assert generate(single, image=PIL.Image.new("RGB", (40, 48), "red"), height=32, width=32).shape == (1, 32, 32, 3)
    # ... and sets the output size when they are not (floored to a multiple of the VAE's factor, 2 here)
    assert generate(single, image=PIL.Image.new("RGB", (45, 51), "red")).shape == (1, 50, 44, 3)


def test_condition_images_of_different_sizes_need_height_width(multi):
    with pytest.raises(ValueError, match=r"different sizes \(image\[0\] 32x32, image\[1\] 40x40\).*height= and width="):
        generate(multi, image=[RED, BLUE])
    assert generate(multi, image=[RED, BLUE], height=32, width=32).shape == (1, 32, 32, 3)


def test_latents_must_match_the_condition_image_size(single):
    with pytest.raises(ValueError, match=r"latents of 20x20 make a 40x40 image but the condition image is 32x32; "
                                         r"pass height=40, width=40"):
        generate(single, latents=torch.randn(1, 4, 20, 20))


def test_keep_mask_follows_diffusers_windows():
    assert control_keep(5, [0.2], [0.8]) == [[0.0], [1.0], [1.0], [1.0], [0.0]]
    assert control_keep(4, [0.0, 0.5], [1.0, 1.0]) == [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_folder_round_trip(multi, tmp_path):
    multi.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel"]
    assert (tmp_path / "pipe" / "controlnet_1" / "config.json").is_file()
    loaded = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.controlnet, MultiControlNetModel)
    np.testing.assert_array_equal(generate(loaded, image=[RED, BLUE], height=32, width=32),
                                  generate(multi, image=[RED, BLUE], height=32, width=32))


def test_folder_with_another_controlnet_class(single, tmp_path):
    single.save_pretrained(tmp_path / "pipe")
    index_path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["controlnet"] = ["diffusers", "T2IAdapter"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names T2IAdapter for 'controlnet'; supported: \['ControlNetModel', "
                                         r"'MultiControlNetModel'\]"):
        StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "pipe")
    del index["controlnet"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no controlnet entry; pass controlnet="):
        StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "pipe")


# ---- ControlNets that do not fit ----------------------------------------------------------------------------------
def test_controlnet_channels_must_match_the_unet():
    with pytest.raises(ValueError, match=r"controlnet has block_out_channels=\(8, 32\) but the UNet has "
                                         r"block_out_channels=\(8, 16\) \(its residuals would not fit the UNet's skip tensors\); .*"
                                         r"ControlNetModel.from_unet"):
        pipeline(controlnet(block_out_channels=(8, 32), norm_num_groups=4))
    with pytest.raises(ValueError, match=r"controlnet\[1\] has layers_per_block=2 but the UNet has layers_per_block=1"):
        pipeline([controlnet(), controlnet(layers_per_block=2)])
    with pytest.raises(ValueError, match=r"cross_attention_dim=8 but the UNet has cross_attention_dim=16"):
        pipeline(controlnet(cross_attention_dim=8))


def test_controlnet_condition_encoder_must_shrink_like_the_vae():
    with pytest.raises(ValueError, match=r"shrinks the condition image by 4 .* but the VAE by 2.*2 "
                                         r"conditioning_embedding_out_channels entries"):
        pipeline(controlnet(conditioning_embedding_out_channels=(4, 8, 8)))


@pytest.mark.parametrize("nets, error, message", [
    (None, TypeError, "controlnet must be a ControlNetModel or a list of them .* got None"),
    ([controlnet(), "canny"], TypeError, r"controlnet\[1\] is a str; each entry must be a minidiff ControlNetModel"),
    ([], ValueError, "empty list"),
])
def test_controlnet_component_type(nets, error, message):
    with pytest.raises(error, match=message):
        pipeline(nets)


# ---- condition images ------------------------------------------------------------------------------------------
def test_missing_image(single, multi):
    with pytest.raises(ValueError, match="needs image=: the condition image"):
        generate(single, image=None)
    with pytest.raises(ValueError, match="needs image=.*one per ControlNet"):
        generate(multi, image=None)


@pytest.mark.parametrize("image, error, message", [
    (RED, TypeError, r"with 2 ControlNets, image must be a list of 2 condition images .* got one Image"),
    ([RED], ValueError, r"image has 1 entries but there are 2 ControlNets"),
    ([RED, RED, RED], ValueError, r"image has 3 entries but there are 2 ControlNets"),
    ([[RED, RED], [RED]], ValueError, r"nested list whose sublists have \[1, 2\] entries; .* must hold 2 images"),
])
def test_image_count_per_controlnet(multi, image, error, message):
    with pytest.raises(error, match=message):
        generate(multi, image=image)


def test_images_per_prompt(single):
    with pytest.raises(ValueError, match=r"image holds 3 images but there are 2 prompts; pass 1 condition image"):
        generate(single, prompt=["a", "b"], image=[RED, RED, RED])


def test_condition_image_channels(single):
    with pytest.raises(ValueError, match=r"image has 1 channels \(shape \(1, 1, 32, 32\)\) but its ControlNet takes "
                                         r"conditioning_channels=3"):
        generate(single, image=np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(TypeError, match="image must be a PIL image, numpy array, torch tensor or file path"):
        generate(single, image=3)


# ---- per-net options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(controlnet_conditioning_scale=[1.0, 0.5, 0.2]), ValueError,
     r"controlnet_conditioning_scale has 3 entries but the pipeline has 2 ControlNet\(s\)"),
    (dict(control_guidance_start=[0.0]), ValueError, r"control_guidance_start has 1 entries but the pipeline has 2"),
    (dict(control_guidance_end=[1.0, 1.0, 1.0]), ValueError, r"control_guidance_end has 3 entries"),
    (dict(controlnet_conditioning_scale=True), TypeError, "controlnet_conditioning_scale must be a number"),
    (dict(controlnet_conditioning_scale=[1.0, "x"]), TypeError, "controlnet_conditioning_scale must be a number"),
    (dict(controlnet_conditioning_scale=float("nan")), ValueError, "controlnet_conditioning_scale must be a finite"),
    (dict(guess_mode="yes"), TypeError, "guess_mode must be True or False"),
])
def test_per_net_lists(multi, kwargs, error, message):
    with pytest.raises(error, match=message):
        generate(multi, image=[RED, RED], **kwargs)


@pytest.mark.parametrize("start, end, message", [
    (0.5, 0.5, r"control_guidance_start=0.5 must be below control_guidance_end=0.5"),
    (0.8, 0.2, r"control_guidance_start=0.8 must be below control_guidance_end=0.2"),
    (-0.1, 1.0, r"control_guidance_start must be in \[0, 1\], got -0.1"),
    (0.0, 1.5, r"control_guidance_end must be in \[0, 1\], got 1.5"),
])
def test_guidance_window(single, start, end, message):
    with pytest.raises(ValueError, match=message):
        generate(single, control_guidance_start=start, control_guidance_end=end)


def test_guidance_window_names_the_controlnet(multi):
    with pytest.raises(ValueError, match=r"control_guidance_start=0.9 must be below control_guidance_end=0.3 "
                                         r"\(ControlNet 1\)"):
        generate(multi, image=[RED, RED], control_guidance_start=[0.0, 0.9], control_guidance_end=[1.0, 0.3])
