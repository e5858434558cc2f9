"""Issue 11, pipelines: every bad argument or non-finite value ends in a one-line error naming it, never an image.

Cases: NaN/Inf at each stage (text encoder, UNet step, scheduler step, VAE decode, callback), guidance_scale /
guidance_rescale / eta / strength bounds, height/width, clip_skip, images by dtype and PIL mode, paths, masks, the
other arguments of every __call__ / invert / sample / edit, the tokenizer length bound, and the memory estimate.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
from minidiff.pipelines import memory
from minidiff.pipelines.checks import NonFiniteError
from minidiff.pipelines.images import preprocess_image, preprocess_mask
from tests.tiny_components import run_tiny, tiny_components, tiny_pipeline
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

NAN = float("nan")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(minidiff.StableDiffusionPipeline)


@pytest.fixture(scope="module")
def img2img():
    return tiny_pipeline(minidiff.StableDiffusionImg2ImgPipeline)


@pytest.fixture(scope="module")
def inpaint():
    return tiny_pipeline(minidiff.StableDiffusionInpaintPipeline)


@pytest.fixture(scope="module")
def inversion():
    return tiny_pipeline(minidiff.StableDiffusionDDIMInversionPipeline)


def run(pipe, **kwargs):
    return run_tiny(pipe, **{"num_inference_steps": 1, **kwargs})  # one step is enough to reach every check


RED = PIL.Image.new("RGB", (32, 32), "red")


# ---- 1. non-finite values, named by stage -------------------------------------------------------------------------
@pytest.mark.parametrize("module, stage", [
    ("text_encoder.final_layer_norm.weight", "text encoder output"),
    ("unet.conv_out.weight", r"UNet output at step 0 \(t=\d+\) has 2048 NaN"),
    ("vae.decoder.conv_out.weight", "VAE decode output has"),
])
def test_nan_weights_are_named_by_stage(module, stage):
    pipe = tiny_pipeline(minidiff.StableDiffusionPipeline)
    with torch.no_grad():
        component, _, name = module.partition(".")
        getattr(pipe, component).get_parameter(name).fill_(NAN)
    with pytest.raises(NonFiniteError, match=stage):
        run(pipe)


def test_nan_from_the_scheduler_and_the_callback_are_named(pipe, monkeypatch):
    def nan_callback(pipeline, i, t, tensors):
        return {"latents": torch.full_like(tensors["latents"], NAN)}

    with pytest.raises(NonFiniteError, match="latents returned by callback_on_step_end at step 0"):
        run(pipe, callback_on_step_end=nan_callback)
    monkeypatch.setattr(pipe.scheduler, "step", lambda output, t, x, **_: (torch.full_like(x, NAN),))
    with pytest.raises(NonFiniteError, match=r"latents after scheduler step 0 \(t=\d+\) has 1024 NaN"):
        run(pipe)


def test_non_finite_error_is_a_value_error():
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(guidance_scale=NAN), ValueError, r"guidance_scale must be a finite number with \|guidance_scale\| <= 10000"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=1e30), ValueError, "got 1e[+]30"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale must be"),
    (dict(guidance_rescale=1.5), ValueError, r"guidance_rescale must be in \[0, 1\], got 1.5"),
    (dict(guidance_rescale=-0.1), ValueError, r"guidance_rescale must be in \[0, 1\]"),
    (dict(eta=-1.0), ValueError, r"eta must be in \[0, inf\), got -1"),
    (dict(eta=NAN), ValueError, "eta must be in"),
    (dict(latents=torch.full((1, 4, 16, 16), NAN)), ValueError, "latents has 1024 NaN"),
    (dict(latents=np.zeros((1, 4, 16, 16))), TypeError, "latents must be a torch.Tensor"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 77, 16), NAN)), ValueError, "prompt_embeds has 1232 NaN"),
    (dict(negative_prompt_embeds=torch.full((1, 77, 16), math.inf)), ValueError,
     "negative_prompt_embeds has 0 NaN and 1232 Inf"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(pipe, **kwargs)


def test_guidance_scale_bound_keeps_the_values_people_use(pipe):
    for scale in (0.0, -2.0, 1.0, 30.0, 100.0):
        assert np.isfinite(run(pipe, guidance_scale=scale).images).all()


def test_strength_nan_is_refused(img2img):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got nan"):
        img2img("x", image=RED, strength=NAN)


def test_inversion_and_ddpm_check_values(inversion):
    with pytest.raises(ValueError, match="latents has 1024 NaN"):
        inversion.invert(latents=torch.full((1, 4, 16, 16), NAN), num_inference_steps=2)
    inverted = inversion.invert(latents=torch.zeros(1, 4, 16, 16), num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        inversion.sample(inverted, "x", guidance_scale=NAN)
    with pytest.raises(ValueError, match="inversion_guidance_scale must be"):
        inversion.edit(RED, "a", "b", num_inference_steps=2, start_step=0, inversion_guidance_scale=math.inf)

    torch.manual_seed(0)
    unet = minidiff.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                norm_num_groups=4, layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2)
    ddpm = minidiff.DDPMPipeline(unet=unet.eval(), scheduler=minidiff.DDPMScheduler(num_train_timesteps=10))
    ddpm.set_progress_bar_config(disable=True)
    with torch.no_grad():
        unet.conv_out.bias.fill_(NAN)
    with pytest.raises(NonFiniteError, match=r"UNet output at step 0 \(t=9\)"):
        ddpm(num_inference_steps=10, output_type="np")


# ---- 2. height / width ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(height=0), ValueError, "height=0: height and width must be positive multiples of 8"),
    (dict(width=0), ValueError, "width=0: height and width must be positive multiples of 8"),
    (dict(height=0, width=0), ValueError, "height=0"),
    (dict(height=-8), ValueError, "height=-8"),
    (dict(width=36), ValueError, "width=36: .*multiples of 8"),
    (dict(height=32.0), TypeError, "height must be an int .* got float 32.0"),
    (dict(width="32"), TypeError, "width must be an int .* got str '32'"),
    (dict(height=True), TypeError, "height must be an int .* got bool"),
])
def test_height_and_width(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(pipe, **kwargs)


def test_height_none_means_default_and_numpy_ints_work(pipe, inpaint):
    assert run(pipe, height=None, width=np.int64(16)).images.shape == (1, 32, 16, 3)
    with pytest.raises(ValueError, match="height=0"):
        inpaint("x", image=RED, mask_image=RED, height=0, width=32)


# ---- 3. clip_skip ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip_skip, error", [(-1, ValueError), (2, ValueError), (50, ValueError),
                                              (1.0, TypeError), (True, TypeError), ("1", TypeError)])
def test_clip_skip_range(pipe, clip_skip, error):
    with pytest.raises(error, match=r"clip_skip must be None or an int in \[0, 1\] .*1 = penultimate"):
        run(pipe, clip_skip=clip_skip)


def test_clip_skip_zero_is_the_last_layer_and_one_the_penultimate(pipe):
    last = pipe.encode_prompt("a cat", clip_skip=None)[0]
    assert torch.allclose(pipe.encode_prompt("a cat", clip_skip=0)[0], last, atol=1e-6)
    assert not torch.allclose(pipe.encode_prompt("a cat", clip_skip=1)[0], last, atol=1e-3)


# ---- 4. images --------------------------------------------------------------------------------------------------
def _gray(value: float, dtype) -> np.ndarray:
    return np.full((32, 32), value, dtype=dtype)


@pytest.mark.parametrize("image, expected", [
    (PIL.Image.fromarray(_gray(32768, np.uint16)), 0.0),  # I;16: read as 16-bit, not clipped to white
    (PIL.Image.fromarray(_gray(65535, np.int32), mode="I"), 1.0),
    (PIL.Image.fromarray(_gray(0.25, np.float32), mode="F"), -0.5),
    (np.full((32, 32, 3), 255, np.uint8), 1.0),  # uint8 arrays are divided by 255
    (np.full((32, 32, 3), 0, np.uint16), -1.0),
    (np.ones((32, 32, 3), bool), 1.0),
    (torch.full((3, 32, 32), 128, dtype=torch.uint8), 2 * 128 / 255 - 1),
    (np.full((32, 32, 3), 0.75, np.float32), 0.5),
    (torch.full((3, 32, 32), -0.5), -0.5),  # float tensors with negatives are already in [-1, 1]
])
def test_images_are_converted_by_dtype_and_mode(image, expected):
    pixels = preprocess_image(image, scale=2)
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels, torch.full_like(pixels, expected), atol=1e-4), float(pixels.mean())


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "1", "L"])
def test_other_pil_modes_go_through_convert(mode):
    pixels = preprocess_image(PIL.Image.new(mode, (32, 32), "white" if mode != "CMYK" else (0, 0, 0, 0)), scale=2)
    assert pixels.shape == (1, 3, 32, 32) and pixels.min() > 0.99


@pytest.mark.parametrize("image, error, match", [
    ([], ValueError, "image is an empty list"),
    (np.full((32, 32, 3), 255.0), ValueError, r"values in \[255, 255\]; float images must lie in \[0, 1\]"),
    (PIL.Image.fromarray(_gray(2.0, np.float32), mode="F"), ValueError, r"PIL mode F\) has values in \[2, 2\]"),
    (np.full((32, 32, 3), NAN, np.float32), ValueError, "3072 NaN/Inf"),
    (np.zeros((32, 32, 3), np.int64), TypeError, "dtype torch.int64; accepted: uint8"),
    (torch.rand(32, 32, 3), ValueError, r"looks channel-last \(H, W, C\).*permute\(2, 0, 1\)"),
    (np.zeros((32, 32, 4), np.uint8), ValueError, "the last axis must be 1 or 3 channels"),
    (5, TypeError, "image must be a PIL image, numpy array, torch tensor or file path"),
    ([RED, np.zeros((32, 32, 3), np.uint8)], TypeError, r"image mixes \['Image', 'ndarray'\]"),
])
def test_unreadable_images_are_refused(image, error, match):
    with pytest.raises(error, match=match):
        preprocess_image(image, scale=2)


def test_image_paths_are_opened(tmp_path, img2img):
    path = tmp_path / "in.png"
    RED.save(path)
    assert torch.equal(preprocess_image(str(path), scale=2), preprocess_image(RED, scale=2))
    assert torch.equal(preprocess_image(path, scale=2), preprocess_image(RED, scale=2))
    with pytest.raises(FileNotFoundError, match="missing.png'?: no such file"):
        img2img("x", image=str(tmp_path / "missing.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png' is not an image file Pillow can read"):
        img2img("x", image=str(tmp_path / "notes.png"))
    with pytest.raises(ValueError, match="is a folder; pass an image file"):
        img2img("x", image=tmp_path)


def test_img2img_runs_on_16_bit_png_from_disk(tmp_path, img2img):
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(_gray(30000, np.uint16)).save(path)
    assert PIL.Image.open(path).mode.startswith("I")
    out = img2img("x", image=str(path), strength=0.5, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_masks(inpaint):
    mask_2d = np.zeros((32, 32), np.uint8)
    mask_2d[:, 16:] = 255  # a uint8 (H, W) mask: one grayscale mask in 0..255
    mask = preprocess_mask(mask_2d, 32, 32)
    assert mask.shape == (1, 1, 32, 32) and mask[..., :16].max() == 0 and mask[..., 16:].min() == 1
    out = inpaint("x", image=RED, mask_image=mask_2d, num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"image has 2 images but mask_image has 3 masks"):
        inpaint("x", image=[RED, RED], mask_image=[mask_2d] * 3, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"image is \(32, 32\) \(h, w\) but mask_image is \(16, 32\)"):
        inpaint("x", image=RED, mask_image=mask_2d[:16], num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image is an empty list"):
        inpaint("x", image=RED, mask_image=[], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 16\)"):
        inpaint("x", image=RED, mask_image=mask_2d, latents=torch.zeros(1, 4, 8, 8), num_inference_steps=1)


# ---- 5. other arguments --------------------------------------------------------------------------------------------
def _none_callback(pipeline, i, t, tensors):
    return None


def _shape_callback(pipeline, i, t, tensors):
    return {"latents": tensors["latents"][:, :2]}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(negative_prompt=5), TypeError, "negative_prompt must be a str or a list of str, got int"),
    (dict(prompt=[]), ValueError, "prompt is an empty list"),
    (dict(prompt=["a", 3]), TypeError, "prompt must be a str or a list of str"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an int >= 1, got 0"),
    (dict(num_images_per_prompt=-1), ValueError, "num_images_per_prompt must be an int >= 1"),
    (dict(num_images_per_prompt=1.5), TypeError, "num_images_per_prompt must be an int >= 1, got float"),
    (dict(generator="abc"), TypeError, "generator must be a torch.Generator or a list of them .* got str"),
    (dict(generator=["abc"]), TypeError, "generator must be a torch.Generator"),
    (dict(generator=[]), ValueError, "generator is an empty list"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32)), ValueError,
     r"prompt_embeds has shape \(1, 77, 32\); expected \(batch, tokens, 16\): 16 is the UNet's cross_attention_dim"),
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 16)), ValueError, r"prompt_embeds has shape \(77, 16\)"),
    (dict(prompt=None, prompt_embeds=[[0.0]]), TypeError, "prompt_embeds must be a torch.Tensor"),
    (dict(negative_prompt_embeds=torch.zeros(1, 77, 8)), ValueError, r"negative_prompt_embeds has shape \(1, 77, 8\)"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 16)), ValueError,
     "either negative_prompt or negative_prompt_embeds"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 16), negative_prompt_embeds=torch.zeros(2, 77, 16)),
     ValueError, r"negative_prompt_embeds has shape \(2, 77, 16\) but prompt_embeds has \(1, 77, 16\)"),
    (dict(callback_on_step_end=_none_callback), TypeError,
     "callback_on_step_end must return a dict .* got NoneType at step 0"),
    (dict(callback_on_step_end=_shape_callback), ValueError,
     r"callback_on_step_end returned latents of \(1, 2, 16, 16\) at step 0; expected .*\(1, 4, 16, 16\)"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an int >= 1, got 0"),
    (dict(num_inference_steps=2.0), TypeError, "num_inference_steps must be an int"),
    (dict(num_inference_steps=True), TypeError, "num_inference_steps must be an int"),
    (dict(output_type=None), ValueError, "output_type=None is not supported"),
    (dict(output_type=["np"]), ValueError, "output_type=.* is not supported"),
])
def test_other_arguments_are_named(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(pipe, **kwargs)


def test_empty_prompt_is_a_valid_unconditional_prompt(pipe):
    assert run(pipe, prompt="").images.shape == (1, 32, 32, 3)


def test_img2img_checks_its_arguments_before_work(img2img):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        img2img("x", image=RED, generator="abc")
    with pytest.raises(ValueError, match="num_images_per_prompt must be an int >= 1"):
        img2img("x", image=RED, num_images_per_prompt=0)
    with pytest.raises(ValueError, match=r"img2img needs an image \(PIL image, numpy array, tensor or file path\)"):
        img2img("x")


def test_inversion_arguments(inversion):
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        inversion.invert(latents=torch.zeros(1, 4, 16, 16), num_inference_steps=2.5)
    inverted = inversion.invert(latents=torch.zeros(1, 4, 16, 16), num_inference_steps=2)
    with pytest.raises(TypeError, match="start_step must be an int >= 0, got str"):
        inversion.sample(inverted, "x", start_step="1")
    with pytest.raises(ValueError, match="start_step must be an int >= 0, got -1"):
        inversion.sample(inverted, "x", start_step=-1)
    with pytest.raises(TypeError, match="inverted must be the InversionOutput"):
        inversion.sample([torch.zeros(1, 4, 16, 16)], "x")
    with pytest.raises(TypeError, match="prompt must be a str or a list of str"):
        inversion.sample(inverted, None)
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 1\] for num_inference_steps=2, got 5"):
        inversion.edit(RED, "a", "b", num_inference_steps=2, start_step=5)
    with pytest.raises(ValueError, match="output_type='jpg' is not supported"):
        inversion.edit(RED, "a", "b", num_inference_steps=2, start_step=0, output_type="jpg")


def test_ddpm_and_ddim_arguments():
    torch.manual_seed(0)
    unet = minidiff.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                norm_num_groups=4, layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2)
    ddim = minidiff.DDIMPipeline(unet=unet.eval(), scheduler=minidiff.DDIMScheduler())
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ddim(batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int >= 1, got float"):
        ddim(batch_size=2.0)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        ddim(num_inference_steps=0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, inf\), got -1"):
        ddim(eta=-1.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ddim(generator="abc", num_inference_steps=1)


# ---- 6. tokenizer length bound --------------------------------------------------------------------------------------
def test_tokenizer_model_max_length_is_bounded_by_the_text_encoder():
    components = tiny_components()
    components["tokenizer"] = minidiff.CLIPTokenizer(model_max_length=1000)  # the tokenizer refuses > 1e6 itself
    with pytest.warns(UserWarning, match="model_max_length is 1000 but the text encoder has 77 positions"):
        pipe = minidiff.StableDiffusionPipeline(**components)
    assert pipe.prompt_length == 77
    positive, negative = pipe.encode_prompt("a cat")
    assert positive.shape == negative.shape == (1, 77, 16)


# ---- 7. memory estimate ---------------------------------------------------------------------------------------------
def test_memory_check_refuses_what_does_not_fit(pipe, monkeypatch):
    estimate = memory.estimate_peak_bytes(pipe.unet, pipe.vae, 1, 32, 32, 2)
    monkeypatch.setattr(memory, "available_memory", lambda device: estimate * 10)  # 32x32 fits, 256x256 not
    assert run(pipe).images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"1 image\(s\) of 256x256 need about .* GiB of activation memory, but .* "
                                         r"available .*smaller height/width.*enable_attention_slicing\(\).*"
                                         r"--attention chunked.*enable_vae_tiling\(\).*--vae-tiling"):
        run(pipe, height=256, width=256)
    monkeypatch.setattr(memory, "available_memory", lambda device: None)  # unknown: no check
    assert run(pipe, height=48, width=48).images.shape == (1, 48, 48, 3)


def test_memory_estimate_follows_the_formula(pipe):
    unet, vae = pipe.unet, pipe.vae
    base = memory.estimate_peak_bytes(unet, vae, 1, 512, 512, 2)
    assert memory.vae_decode_bytes(vae, 1, 512, 512) == memory.VAE_LIVE * 8 * 512 * 512 * 4
    assert memory.unet_bytes(unet, 2, 256, 256) == memory.UNET_LIVE * 2 * 8 * 256 * 256 * 4
    assert memory.estimate_peak_bytes(unet, vae, 2, 512, 512, 2) == 2 * base  # linear in the batch
    with minidiff.ops.use_backend("attention", "math"):  # math holds the (B' * heads, N, N) scores
        math_unet = memory.unet_bytes(unet, 2, 256, 256)
        math_vae = memory.vae_decode_bytes(vae, 1, 512, 512)
    assert math_unet - memory.unet_bytes(unet, 2, 256, 256) == 2 * 2 * 2 * (128 * 128) ** 2 * 4
    assert math_vae - memory.vae_decode_bytes(vae, 1, 512, 512) == 2 * (256 * 256) ** 2 * 4
    vae.enable_tiling()
    try:
        tiled = memory.vae_decode_bytes(vae, 1, 512, 512)
    finally:
        vae.disable_tiling()
    assert tiled == memory.VAE_LIVE * 8 * vae.tile_sample_min_size**2 * 4


def test_available_memory_reads_the_system():
    free = memory.available_memory(torch.device("cpu"))
    assert free is None or free > 0
    assert memory.available_memory(torch.device("meta")) is None
