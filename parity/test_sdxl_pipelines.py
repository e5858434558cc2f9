"""SDXL pipeline parity: the same saved tiny SDXL components, prompt and seed give the same images in both libraries.

Covers text to image (3 schedulers, with and without guidance, the conditioning options), image to image, inpainting
(4- and 9-channel UNets), the base -> refiner hand-off, a refiner-like UNet with aesthetic scores, SDXL-Turbo and
SD-Turbo, and minidiff <-> diffusers folder round trips with the pipeline-level config values.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

import minidiff
from parity.pipeline_fixtures import make_image, make_mask, save_reference_pipeline
from parity.report import compare
from parity.sdxl_fixtures import save_sdxl_reference
from parity.test_pipelines import load_minidiff, run_both, use_scheduler
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

NP_TOL = 1e-4  # absolute, images in [0, 1]
PROMPTS = ["a red circle on a blue background", "a small yellow square in the top left"]
SIZE = dict(height=32, width=32)
XL = "StableDiffusionXLPipeline"


def pair(reference_class, minidiff_class, reference, mine, **config):
    """Both libraries' ``*_class`` pipelines over the components of an existing pair."""
    theirs = reference_class(**reference.components, **config)
    ours = minidiff_class(**mine.components, **config)
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    reference, folder = save_sdxl_reference(tmp_path_factory.mktemp("sdxl"))
    return reference, load_minidiff(minidiff.StableDiffusionXLPipeline, folder), dict(reference.scheduler.config)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    """A refiner-like img2img pair (only text_encoder_2, 5 time ids, requires_aesthetics_score=True)."""
    reference, folder = save_sdxl_reference(tmp_path_factory.mktemp("refiner"),
                                            diffusers.StableDiffusionXLImg2ImgPipeline, refiner=True)
    return reference, load_minidiff(minidiff.StableDiffusionXLImg2ImgPipeline, folder), folder


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                       "DPMSolverMultistepScheduler"])
def test_txt2img_per_scheduler(sdxl, scheduler, guidance_scale):
    reference, mine, config = sdxl
    use_scheduler(reference, mine, scheduler, config)
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance_scale,
                            **SIZE)
    compare(XL, f"txt2img {scheduler} cfg={guidance_scale}", ours, theirs, NP_TOL, "abs")


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("negative prompts", dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], negative_prompt_2="ugly")),
        ("prompt_2", dict(prompt=PROMPTS, prompt_2=["an oil painting", "a photo"])),
        ("2 images per prompt", dict(prompt=PROMPTS[0], num_images_per_prompt=2)),
        ("guidance_rescale 0.7", dict(prompt=PROMPTS[0], guidance_rescale=0.7)),
        ("size conditioning", dict(prompt=PROMPTS, original_size=(64, 48), crops_coords_top_left=(4, 8),
                                   target_size=(48, 32))),
        ("negative size conditioning", dict(prompt=PROMPTS[0], original_size=(64, 48), target_size=(40, 40),
                                            negative_original_size=(16, 16), negative_crops_coords_top_left=(2, 6),
                                            negative_target_size=(24, 24))),
        ("clip_skip=1", dict(prompt=PROMPTS[0], clip_skip=1)),
        ("64x32 image", dict(prompt=PROMPTS[0], height=64, width=32)),
        ("generator list", dict(prompt=PROMPTS, generator_list=True)),
        ("denoising_end 0.6", dict(prompt=PROMPTS[0], num_inference_steps=4, denoising_end=0.6)),
    ],
)
def test_txt2img_options(sdxl, case, kwargs):
    reference, mine, config = sdxl
    use_scheduler(reference, mine, "EulerDiscreteScheduler", config)
    kwargs = {**SIZE, "guidance_scale": 5.0, "num_inference_steps": 2, "output_type": "np", **kwargs}
    if kwargs.pop("generator_list", False):
        ours = mine(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
        theirs = reference(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    else:
        output_type = kwargs.pop("output_type")
        ours, theirs = run_both(reference, mine, output_type, **kwargs)
    compare(XL, case, ours, theirs, NP_TOL, "abs")


def test_force_zeros_off(sdxl):
    reference, mine, config = sdxl
    theirs, ours = pair(diffusers.StableDiffusionXLPipeline, minidiff.StableDiffusionXLPipeline, reference, mine,
                        force_zeros_for_empty_prompt=False)
    use_scheduler(theirs, ours, "EulerDiscreteScheduler", config)
    ours_images, theirs_images = run_both(theirs, ours, prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0,
                                          **SIZE)
    compare(XL, "force_zeros_for_empty_prompt=False", ours_images, theirs_images, NP_TOL, "abs")


def test_encode_prompt_and_embeds_in(sdxl):
    reference, mine, config = sdxl
    use_scheduler(reference, mine, "EulerDiscreteScheduler", config)
    kwargs = dict(prompt=PROMPTS, prompt_2=["a photo", "a drawing"], device="cpu", num_images_per_prompt=2,
                  do_classifier_free_guidance=True, negative_prompt="blurry")
    theirs = reference.encode_prompt(**kwargs)
    ours = mine.encode_prompt(**kwargs)
    for name, a, b in zip(("prompt_embeds", "negative", "pooled", "negative pooled"), ours, theirs):
        compare(XL, f"encode_prompt {name}", a, b, 1e-5)
    embeds = dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                       "negative_pooled_prompt_embeds"), theirs))
    ours_images, theirs_images = run_both(reference, mine, num_inference_steps=2, guidance_scale=4.0, **embeds, **SIZE)
    compare(XL, "prompt_embeds + pooled_prompt_embeds in", ours_images, theirs_images, NP_TOL, "abs")


def test_callback_replaces_latents_and_pooled(sdxl):
    reference, mine, config = sdxl
    use_scheduler(reference, mine, "EulerDiscreteScheduler", config)
    seen = {"minidiff": [], "diffusers": []}

    def callback(library):
        def on_step_end(pipe, i, t, tensors):
            seen[library].append(sorted(tensors))
            return {"latents": tensors["latents"] * 0.9, "add_text_embeds": tensors["add_text_embeds"] * 1.5}
        return on_step_end

    inputs = ["latents", "add_text_embeds", "add_time_ids"]
    args = dict(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                callback_on_step_end_tensor_inputs=inputs, **SIZE)
    ours = mine(**args, callback_on_step_end=callback("minidiff"), generator=torch.Generator().manual_seed(0)).images
    theirs = reference(**args, callback_on_step_end=callback("diffusers"),
                       generator=torch.Generator().manual_seed(0)).images
    assert seen["minidiff"] == seen["diffusers"] == [sorted(inputs)] * 2
    compare(XL, "callback_on_step_end (latents, add_text_embeds)", ours, theirs, NP_TOL, "abs")


def test_per_block_transformer_depth(tmp_path):
    """A UNet with other per-block transformer depths (and reversed ones for the up blocks) through the pipeline."""
    reference, folder = save_sdxl_reference(tmp_path, transformer_layers_per_block=(2, 3),
                                            reverse_transformer_layers_per_block=((1, 2, 1), (3, 1, 2)))
    mine = load_minidiff(minidiff.StableDiffusionXLPipeline, folder)
    ours, theirs = run_both(reference, mine, prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, **SIZE)
    compare(XL, "transformer_layers_per_block (2, 3), reversed per layer", ours, theirs, NP_TOL, "abs")


def test_latents_mean_and_std(sdxl):
    """A VAE config with latents_mean/latents_std (the SDXL-derived VAEs that set them): decode and encode."""
    reference, mine, config = sdxl
    statistics = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0])
    theirs_i2i, ours_i2i = pair(diffusers.StableDiffusionXLImg2ImgPipeline, minidiff.StableDiffusionXLImg2ImgPipeline,
                                reference, mine)
    reference.vae.register_to_config(**statistics)
    for key, value in statistics.items():
        setattr(mine.vae.config, key, tuple(value))
    try:
        use_scheduler(reference, mine, "EulerDiscreteScheduler", config)
        ours, theirs = run_both(reference, mine, prompt=PROMPTS[0], num_inference_steps=2, **SIZE)
        compare(XL, "VAE latents_mean/std: txt2img", ours, theirs, NP_TOL, "abs")
        use_scheduler(theirs_i2i, ours_i2i, "EulerDiscreteScheduler", config)
        ours, theirs = run_both(theirs_i2i, ours_i2i, prompt=PROMPTS[0], image=make_image(32), strength=0.6,
                                num_inference_steps=2)
        compare("StableDiffusionXLImg2ImgPipeline", "VAE latents_mean/std", ours, theirs, NP_TOL, "abs")
    finally:
        reference.vae.register_to_config(latents_mean=None, latents_std=None)
        mine.vae.config.latents_mean = mine.vae.config.latents_std = None


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_img2img_strength(sdxl, scheduler):
    reference, mine, config = sdxl
    theirs, ours = pair(diffusers.StableDiffusionXLImg2ImgPipeline, minidiff.StableDiffusionXLImg2ImgPipeline,
                        reference, mine)
    use_scheduler(theirs, ours, scheduler, config)
    ours_images, theirs_images = run_both(theirs, ours, prompt=PROMPTS, image=make_image(32), strength=0.6,
                                          num_inference_steps=4, guidance_scale=5.0, negative_prompt="dark")
    compare("StableDiffusionXLImg2ImgPipeline", f"strength 0.6 {scheduler}", ours_images, theirs_images, NP_TOL, "abs")


@pytest.mark.parametrize("case, kwargs", [
    ("aesthetic scores", dict(aesthetic_score=7.5, negative_aesthetic_score=1.5)),
    ("aesthetic + sizes and negative crops", dict(original_size=(64, 64), crops_coords_top_left=(8, 0),
                                                  negative_original_size=(16, 24),
                                                  negative_crops_coords_top_left=(0, 4))),
])
def test_refiner_like_img2img(refiner, case, kwargs):
    reference, mine, _ = refiner
    ours, theirs = run_both(reference, mine, prompt=PROMPTS[0], image=make_image(32, seed=1), strength=0.5,
                            num_inference_steps=3, guidance_scale=5.0, **kwargs)
    compare("StableDiffusionXLImg2ImgPipeline", f"refiner-like: {case}", ours, theirs, NP_TOL, "abs")


def test_base_to_refiner_handoff(sdxl, refiner):
    """Base: the first 80% of the schedule, latents out; refiner: the last 20% from those latents, no new noise."""
    base_reference, base_mine, config = sdxl
    refiner_reference, refiner_mine, _ = refiner
    use_scheduler(base_reference, base_mine, "EulerDiscreteScheduler", config)
    use_scheduler(refiner_reference, refiner_mine, "EulerDiscreteScheduler", config)
    steps = dict(num_inference_steps=5, guidance_scale=5.0)
    ours_latents, theirs_latents = run_both(base_reference, base_mine, "latent", prompt=PROMPTS[0], denoising_end=0.8,
                                            **steps, **SIZE)
    compare(XL, "hand-off: base latents (denoising_end 0.8)", ours_latents, theirs_latents, 1e-5)
    ours, theirs = run_both(refiner_reference, refiner_mine, prompt=PROMPTS[0], image=theirs_latents,
                            denoising_start=0.8, aesthetic_score=6.5, **steps)
    compare("StableDiffusionXLImg2ImgPipeline", "hand-off: refiner from latents (denoising_start 0.8)", ours, theirs,
            NP_TOL, "abs")


@pytest.fixture(scope="module", params=[4, 9], ids=["4-channel", "9-channel"])
def inpaint(request, tmp_path_factory):
    reference, folder = save_sdxl_reference(tmp_path_factory.mktemp("inpaint"),
                                            diffusers.StableDiffusionXLInpaintPipeline, in_channels=request.param)
    return reference, load_minidiff(minidiff.StableDiffusionXLInpaintPipeline, folder)


@pytest.mark.parametrize("strength", [0.9999, 0.5])
def test_inpaint(inpaint, strength):
    reference, mine = inpaint
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, image=make_image(32), mask_image=make_mask(32),
                            strength=strength, num_inference_steps=3, guidance_scale=5.0, **SIZE)
    channels = mine.unet.config.in_channels
    compare("StableDiffusionXLInpaintPipeline", f"{channels}-channel UNet, strength {strength}", ours, theirs,
            NP_TOL, "abs")


def test_inpaint_with_masked_image_latents(inpaint):
    reference, mine = inpaint
    masked_image_latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ours, theirs = run_both(reference, mine, prompt=PROMPTS[0], image=make_image(32), mask_image=make_mask(32),
                            masked_image_latents=masked_image_latents, num_inference_steps=2, guidance_scale=5.0,
                            **SIZE)
    channels = mine.unet.config.in_channels
    compare("StableDiffusionXLInpaintPipeline", f"{channels}-channel UNet, masked_image_latents given", ours, theirs,
            NP_TOL, "abs")


def test_inpaint_masked_image_latents_of_the_wrong_shape(inpaint):
    _, mine = inpaint
    latents = torch.zeros(1, 4, 8, 8)  # 32 x 32 pixels are 16 x 16 latents for the tiny VAE (factor 2)
    with pytest.raises(ValueError, match=r"masked_image_latents have shape \(1, 4, 8, 8\); height=32 width=32 need "
                                         r"\(B, 4, 16, 16\)"):
        mine(prompt=PROMPTS[0], image=make_image(32), mask_image=make_mask(32), masked_image_latents=latents,
             num_inference_steps=2, **SIZE)


def test_inpaint_handoff_from_latents(inpaint):
    """diffusers' inpainting ensemble of experts: the base stops at denoising_end with latents out, the second call
    takes those latents as ``image`` and continues at denoising_start."""
    reference, mine = inpaint
    kwargs = dict(prompt=PROMPTS[0], mask_image=make_mask(32), num_inference_steps=5, guidance_scale=5.0, **SIZE)
    _, base_latents = run_both(reference, mine, "latent", image=make_image(32), denoising_end=0.6, **kwargs)
    if mine.unet.config.in_channels == 9:
        with pytest.raises(ValueError, match="needs masked_image_latents"):
            mine(image=base_latents, denoising_start=0.6, **kwargs)
        return
    ours, theirs = run_both(reference, mine, image=base_latents, denoising_start=0.6, **kwargs)
    compare("StableDiffusionXLInpaintPipeline", "hand-off: latents as image (denoising_start 0.6)", ours, theirs,
            NP_TOL, "abs")
    with pytest.raises(ValueError, match="pass denoising_start"):
        mine(image=base_latents, **kwargs)
    with pytest.raises(ValueError, match="pass the base's height and width"):
        mine(image=base_latents, denoising_start=0.6, **{**kwargs, "height": 64, "width": 64})


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo(sdxl, steps):
    """SDXL-Turbo's recipe (Sauer et al. 2023): EulerAncestral with trailing spacing, no guidance, 1-4 steps."""
    reference, mine, config = sdxl
    use_scheduler(reference, mine, "EulerAncestralDiscreteScheduler", {**config, "timestep_spacing": "trailing"})
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, num_inference_steps=steps, guidance_scale=0.0, **SIZE)
    compare(XL, f"SDXL-Turbo {steps} step(s)", ours, theirs, NP_TOL, "abs")


def test_sd_turbo(tmp_path):
    """SD-Turbo: StableDiffusionPipeline (an SD2-like tiny model) with the same recipe, 1 and 4 steps."""
    reference, folder = save_reference_pipeline(tmp_path, sd2=True)
    mine = load_minidiff(minidiff.StableDiffusionPipeline, folder)
    use_scheduler(reference, mine, "EulerAncestralDiscreteScheduler",
                  {**reference.scheduler.config, "timestep_spacing": "trailing"})
    for steps in (1, 4):
        ours, theirs = run_both(reference, mine, prompt=PROMPTS, num_inference_steps=steps, guidance_scale=0.0,
                                **SIZE)
        compare("StableDiffusionPipeline", f"SD-Turbo {steps} step(s)", ours, theirs, NP_TOL, "abs")


def test_folders_round_trip_with_pipeline_config(sdxl, refiner, tmp_path):
    """minidiff writes force_zeros_for_empty_prompt / requires_aesthetics_score where diffusers reads them, and
    reads diffusers' refiner folder (text_encoder/tokenizer [null, null]) with those components None."""
    reference, mine, _ = sdxl
    _, refiner_mine, refiner_folder = refiner
    assert refiner_mine.text_encoder is None and refiner_mine.tokenizer is None
    assert refiner_mine.requires_aesthetics_score is True
    ours = minidiff.StableDiffusionXLPipeline(**mine.components, force_zeros_for_empty_prompt=False)
    ours.save_pretrained(tmp_path / "base")
    loaded = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    assert loaded.config.force_zeros_for_empty_prompt is False
    refiner_mine.save_pretrained(tmp_path / "refiner")
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    reloaded = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner")
    assert reloaded.config.requires_aesthetics_score is True and reloaded.text_encoder is None
    loaded.set_progress_bar_config(disable=True)
    ours_images, theirs_images = run_both(loaded, ours, prompt=PROMPTS[0], num_inference_steps=1, guidance_scale=5.0,
                                          **SIZE)
    compare(XL, "minidiff folder -> diffusers (force_zeros off)", ours_images, theirs_images, NP_TOL, "abs")
