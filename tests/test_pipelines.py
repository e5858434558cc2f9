"""Pipelines on their own: argument checks, output types, folder I/O, memory options, inversion round trip."""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
from minidiff.pipelines import checks
from minidiff.schedulers import by_name
from minidiff.schedulers.names import SAMPLERS
from minidiff.pipelines.images import postprocess, preprocess_image, preprocess_mask
from tests.tiny_components import run_tiny, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(minidiff.StableDiffusionPipeline)


def test_outputs_in_every_type(pipe):
    assert run_tiny(pipe).images.shape == (1, 32, 32, 3)
    images = run_tiny(pipe, output_type="pil").images
    assert isinstance(images[0], PIL.Image.Image) and images[0].size == (32, 32)
    assert run_tiny(pipe, output_type="pt").images.shape == (1, 3, 32, 32)
    assert run_tiny(pipe, output_type="latent").images.shape == (1, 4, 16, 16)
    images, nsfw = run_tiny(pipe, return_dict=False)
    assert nsfw is None and images.shape == (1, 32, 32, 3)


def test_same_seed_same_image_and_different_seed_differs(pipe):
    a, b = run_tiny(pipe).images, run_tiny(pipe).images
    c = run_tiny(pipe, generator=torch.Generator().manual_seed(1)).images
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    seen = []

    def callback(pipeline, i, t, tensors):
        seen.append((i, int(t)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    run_tiny(pipe, callback_on_step_end=callback, num_inference_steps=3)
    assert [i for i, _ in seen] == [0, 1, 2]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(height=30), ValueError, "multiples of 8"),
    (dict(output_type="jpeg"), ValueError, "output_type='jpeg'.*accepted values"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError, "negative_prompt has 1 entries but prompt has 2"),
    (dict(prompt=None), ValueError, "pass a prompt"),
    (dict(prompt=3), TypeError, "prompt must be a str"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, r"latents have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 16\)"),
    (dict(generator=[torch.Generator()] * 3), ValueError, "3 generators for 1 images"),
])
def test_bad_arguments_are_named(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        run_tiny(pipe, **kwargs)


def test_long_prompt_warns_in_one_line_how_many_tokens_were_cut(pipe):
    prompt = "red " * 80 + "tail end"
    with pytest.warns(UserWarning, match=r"^prompt is 84 tokens long; this tokenizer takes 77, the last 7 were trunc"):
        run_tiny(pipe, prompt=prompt)


def test_img2img_and_inpaint_bad_input():
    img2img = tiny_pipeline(minidiff.StableDiffusionImg2ImgPipeline)
    image = PIL.Image.new("RGB", (32, 32), "red")
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 1.5"):
        img2img("x", image=image, strength=1.5)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        img2img("x", image=image, strength=0.1, num_inference_steps=2)
    inpaint = tiny_pipeline(minidiff.StableDiffusionInpaintPipeline)
    with pytest.raises(ValueError, match=r"image is \(32, 32\) \(h, w\) but mask_image is \(16, 16\)"):
        inpaint("x", image=image, mask_image=PIL.Image.new("L", (16, 16)), height=32, width=32)


def test_img2img_strength_zero_like_keeps_structure():
    img2img = tiny_pipeline(minidiff.StableDiffusionImg2ImgPipeline)
    image = PIL.Image.new("RGB", (32, 32), "red")
    out = img2img("x", image=image, strength=0.5, num_inference_steps=4, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


def test_save_and_load_folder_round_trip(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    again = minidiff.StableDiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(run_tiny(pipe).images, run_tiny(again).images)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json does not exist"):
        minidiff.StableDiffusionPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(ValueError, match="has no entry for the 'vae' component"):
        minidiff.StableDiffusionPipeline.from_pretrained(tmp_path)
    index = {"vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "unet": ["diffusers", "UNet3DConditionModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="UNet3DConditionModel for 'unet'.*from_pretrained\\(folder, unet=...\\)"):
        minidiff.StableDiffusionPipeline.from_pretrained(tmp_path)


def test_attention_slicing_and_vae_slicing_keep_the_image(pipe):
    reference = run_tiny(pipe).images
    pipe.enable_attention_slicing(7)
    pipe.enable_vae_slicing()
    try:
        sliced = run_tiny(pipe).images
    finally:
        pipe.disable_attention_slicing()
        pipe.vae.disable_slicing()
    np.testing.assert_allclose(sliced, reference, atol=1e-5)


def test_every_named_sampler_runs_the_pipeline(pipe):
    """Each sampler name (two calls per step, multistep histories, SDE noise, LCM's skipping schedule) runs the
    pipeline loop to a finite image, built on the model's own scheduler config."""
    original = pipe.scheduler
    try:
        for name in SAMPLERS:
            pipe.scheduler = by_name(name, original.config)
            assert np.isfinite(run_tiny(pipe, num_inference_steps=4).images).all(), name
    finally:
        pipe.scheduler = original


def test_options_a_run_ignores_are_warned_once(pipe, monkeypatch):
    """eta with a scheduler whose step has none, and a negative prompt with guidance off (how LCM runs), are said
    once per process, not at every call."""
    monkeypatch.setattr(checks, "_WARNED", set())
    original = pipe.scheduler
    try:
        pipe.scheduler = minidiff.EulerDiscreteScheduler.from_config(original.config)
        with pytest.warns(UserWarning, match=r"eta=0.5 is ignored: EulerDiscreteScheduler.step takes no eta"):
            run_tiny(pipe, eta=0.5)
        with pytest.warns(UserWarning, match="the negative prompt is ignored: guidance_scale <= 1 turns"):
            run_tiny(pipe, guidance_scale=1.0, negative_prompt="blurry")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_tiny(pipe, eta=0.5, guidance_scale=1.0, negative_prompt="blurry")  # said already
            run_tiny(pipe)  # nothing ignored
    finally:
        pipe.scheduler = original


class SmoothNoiseModel(torch.nn.Module):
    """A stand-in UNet whose noise prediction is smooth in x (eps = 0.3 x + 0.1), like a trained model's is locally;
    an untrained UNet's predictions are not, and DDIM inversion of it diverges."""

    def __init__(self, unet):
        super().__init__()
        self.config, self.dtype = unet.config, unet.dtype

    def forward(self, x, t, encoder_hidden_states=None, cross_attention_kwargs=None, return_dict=True):
        return (0.3 * x + 0.1,)


def test_inversion_reconstructs_latents_and_improves_with_steps():
    inversion = tiny_pipeline(minidiff.StableDiffusionDDIMInversionPipeline)
    inversion.unet = SmoothNoiseModel(inversion.unet)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (10, 100):
        inverted = inversion.invert(latents=latents, prompt="a red circle", num_inference_steps=steps)
        back = inversion.sample(inverted, "a red circle", start_step=0, output_type="latent").images
        errors[steps] = float((back - latents).abs().max() / latents.abs().max())
    assert errors[100] < 0.03 and errors[100] < errors[10] / 4, errors
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 99\]"):
        inversion.sample(inverted, "x", start_step=100)
    with pytest.raises(ValueError, match="exactly one of image or latents"):
        inversion.invert(prompt="x")


def test_image_helpers():
    image = PIL.Image.new("RGB", (37, 21), (255, 0, 0))
    tensor = preprocess_image(image)
    assert tensor.shape == (1, 3, 16, 32) and tensor[0, 0].min() > 0.99 and tensor[0, 1].max() < -0.99
    mask = preprocess_mask(PIL.Image.new("L", (32, 32), 200), 32, 32)
    assert mask.unique().tolist() == [1.0]
    assert postprocess(torch.ones(1, 3, 4, 4), "np").max() == 1.0


def test_colour_guidance_pulls_samples_towards_the_target_colour():
    """The diffusers-course recipe: a loss on x0_hat's distance to a colour steers sampling towards it."""
    torch.manual_seed(0)
    unet = minidiff.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                norm_num_groups=4, layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = minidiff.DDIMPipeline(unet=unet.eval(), scheduler=minidiff.DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    target = torch.tensor([0.9, -0.8, -0.8]).view(1, 3, 1, 1)  # red, in [-1, 1]

    def colour_loss(x0):
        return (x0 - target).abs().mean()

    args = dict(batch_size=2, num_inference_steps=20, output_type="pt")
    plain = pipe(generator=torch.Generator().manual_seed(0), **args).images * 2 - 1
    guided = pipe.guided(colour_loss, loss_scale=40.0, generator=torch.Generator().manual_seed(0), **args).images * 2 - 1
    assert colour_loss(guided) < 0.5 * colour_loss(plain), (colour_loss(guided), colour_loss(plain))
    with pytest.raises(ValueError, match="alpha-bar scheduler"):
        pipe.scheduler = minidiff.EulerDiscreteScheduler()
        pipe.guided(colour_loss, output_type="np")
