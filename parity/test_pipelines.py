"""End-to-end pipeline parity: the same saved components, prompt and seed give the same images in both libraries."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import minidiff
from parity.pipeline_fixtures import make_image, make_mask, randomize_, save_reference_pipeline
from parity.report import compare, compare_exact

NP_TOL = 1e-4  # absolute, images in [0, 1]
SCHEDULERS = ["DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]
PROMPTS = ["a red circle on a blue background", "a small yellow square in the top left"]


def load_minidiff(pipeline_class, folder):
    pipe = pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    reference, folder = save_reference_pipeline(tmp_path_factory.mktemp("sd"))
    return reference, load_minidiff(minidiff.StableDiffusionPipeline, folder), dict(reference.scheduler.config)


def use_scheduler(reference, mine, name: str, base_config: dict) -> None:
    """The same scheduler in both pipelines; minidiff's is built from diffusers' config (cross-library from_config)."""
    reference.scheduler = getattr(diffusers, name).from_config(base_config)
    mine.scheduler = getattr(minidiff, name).from_config(reference.scheduler.config)


def run_both(reference, mine, output_type: str = "np", seed: int = 0, **kwargs):
    ours = mine(**kwargs, generator=torch.Generator().manual_seed(seed), output_type=output_type).images
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(seed), output_type=output_type).images
    return ours, theirs


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_txt2img_per_scheduler(sd, scheduler, guidance_scale):
    reference, mine, config = sd
    use_scheduler(reference, mine, scheduler, config)
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, num_inference_steps=4, height=32, width=32,
                            guidance_scale=guidance_scale)
    compare("StableDiffusionPipeline", f"txt2img {scheduler} cfg={guidance_scale}", ours, theirs, NP_TOL, "abs")


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("negative prompt", dict(negative_prompt=["blurry", "dark"], guidance_scale=5.0)),
        ("2 images per prompt", dict(num_images_per_prompt=2, guidance_scale=4.0)),
        ("guidance_rescale 0.7", dict(guidance_scale=7.0, guidance_rescale=0.7)),
        ("DDIM eta 0.8", dict(eta=0.8, guidance_scale=3.0)),
        ("64x32 image", dict(height=64, width=32, guidance_scale=3.0)),
    ],
)
def test_txt2img_options(sd, case, kwargs):
    reference, mine, config = sd
    use_scheduler(reference, mine, "DDIMScheduler", config)
    kwargs = {"height": 32, "width": 32, **kwargs}
    ours, theirs = run_both(reference, mine, prompt=PROMPTS, num_inference_steps=3, **kwargs)
    compare("StableDiffusionPipeline", case, ours, theirs, NP_TOL, "abs")


def test_txt2img_pil_within_one_level(sd):
    reference, mine, config = sd
    use_scheduler(reference, mine, "EulerDiscreteScheduler", config)
    ours, theirs = run_both(reference, mine, "pil", prompt=PROMPTS[0], num_inference_steps=3, height=32, width=32)
    compare("StableDiffusionPipeline", "PIL output (levels)", np.asarray(ours[0], dtype=np.int16),
            np.asarray(theirs[0], dtype=np.int16), 1.0, "abs")


def test_latent_output_and_prompt_embeds(sd):
    reference, mine, config = sd
    use_scheduler(reference, mine, "DDIMScheduler", config)
    embeds, negative = mine.encode_prompt(PROMPTS, num_images_per_prompt=1, do_classifier_free_guidance=True)
    theirs_embeds, theirs_negative = reference.encode_prompt(PROMPTS, "cpu", 1, True)
    compare("StableDiffusionPipeline", "encode_prompt", torch.cat([negative, embeds]),
            torch.cat([theirs_negative, theirs_embeds]), 1e-5)
    ours, theirs = run_both(reference, mine, "latent", prompt_embeds=theirs_embeds, negative_prompt_embeds=theirs_negative,
                            num_inference_steps=3, height=32, width=32)
    compare("StableDiffusionPipeline", "prompt_embeds in, latents out", ours, theirs, 1e-5)


def test_clip_skip_matches_hand_computed_reference(sd):
    """diffusers' clip_skip path calls text_encoder.text_model, which transformers 5 removed (diffusers #14124):
    the reference embeddings are computed by hand (hidden_states[-(clip_skip+1)] -> final_layer_norm)."""
    reference, mine, config = sd
    use_scheduler(reference, mine, "DDIMScheduler", config)
    ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference.text_encoder(ids, output_hidden_states=True).hidden_states
        embeds = reference.text_encoder.final_layer_norm(hidden[-2])
    theirs = reference(prompt_embeds=embeds, num_inference_steps=3, height=32, width=32, guidance_scale=4.0,
                       negative_prompt=["", ""], generator=torch.Generator().manual_seed(0), output_type="np").images
    ours = mine(prompt=PROMPTS, clip_skip=1, num_inference_steps=3, height=32, width=32, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images
    compare("StableDiffusionPipeline", "clip_skip=1", ours, theirs, NP_TOL, "abs")


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                       "DPMSolverMultistepScheduler"])
def test_img2img(sd, scheduler):
    reference, mine, config = sd
    reference_i2i = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    reference_i2i.set_progress_bar_config(disable=True)
    mine_i2i = minidiff.StableDiffusionImg2ImgPipeline(**mine.components)
    mine_i2i.set_progress_bar_config(disable=True)
    use_scheduler(reference_i2i, mine_i2i, scheduler, config)
    ours, theirs = run_both(reference_i2i, mine_i2i, prompt=PROMPTS, image=make_image(32), strength=0.6,
                            num_inference_steps=5, guidance_scale=5.0)
    compare("StableDiffusionImg2ImgPipeline", f"strength 0.6 {scheduler}", ours, theirs, NP_TOL, "abs")


@pytest.fixture(scope="module")
def inpaint9(tmp_path_factory):
    reference, folder = save_reference_pipeline(tmp_path_factory.mktemp("inpaint"),
                                                diffusers.StableDiffusionInpaintPipeline, in_channels=9)
    return reference, load_minidiff(minidiff.StableDiffusionInpaintPipeline, folder), dict(reference.scheduler.config)


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("channels", [9, 4])
def test_inpaint(sd, inpaint9, channels, strength):
    if channels == 9:
        reference, mine, config = inpaint9
    else:
        base_reference, base_mine, config = sd
        reference = diffusers.StableDiffusionInpaintPipeline(**base_reference.components)
        reference.set_progress_bar_config(disable=True)
        mine = minidiff.StableDiffusionInpaintPipeline(**base_mine.components)
        mine.set_progress_bar_config(disable=True)
    use_scheduler(reference, mine, "DDIMScheduler", config)
    ours, theirs = run_both(reference, mine, prompt=PROMPTS[0], image=make_image(32), mask_image=make_mask(32),
                            height=32, width=32, strength=strength, num_inference_steps=4, guidance_scale=5.0)
    compare("StableDiffusionInpaintPipeline", f"{channels}-channel UNet strength {strength}", ours, theirs, NP_TOL, "abs")


def test_ddim_inversion_matches_diffusers_inverse_scheduler_loop(sd):
    reference, mine, config = sd
    use_scheduler(reference, mine, "DDIMScheduler", config)
    inversion = minidiff.StableDiffusionDDIMInversionPipeline(**mine.components)
    inversion.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = inversion.invert(latents=latents, prompt=PROMPTS[0], num_inference_steps=6)

    inverse = diffusers.DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(6)
    text, _ = reference.encode_prompt(PROMPTS[0], "cpu", 1, False)
    x, theirs = latents, []
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(reference.unet(x, t, encoder_hidden_states=text).sample, t, x).prev_sample
            theirs.append(x)
    compare_exact("StableDiffusionDDIMInversionPipeline", "inverse timesteps", ours.timesteps, inverse.timesteps)
    compare("StableDiffusionDDIMInversionPipeline", "inverted trajectory (6 steps)", torch.stack(ours.latents),
            torch.stack(theirs), 1e-5)


@pytest.fixture(scope="module")
def pixel_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, sample_size=16,
                                 in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    randomize_(unet, 0)
    return unet.eval()


@pytest.mark.parametrize("name, kwargs", [("DDPMPipeline", {}), ("DDIMPipeline", {"eta": 0.0}),
                                          ("DDIMPipeline", {"eta": 1.0})])
def test_unconditional_pipelines(tmp_path, pixel_unet, name, kwargs):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    getattr(diffusers, name)(unet=pixel_unet, scheduler=scheduler).save_pretrained(tmp_path)
    reference = diffusers.DDPMPipeline.from_pretrained(tmp_path) if name == "DDPMPipeline" else \
        diffusers.DDIMPipeline.from_pretrained(tmp_path)
    reference.set_progress_bar_config(disable=True)
    mine = load_minidiff(getattr(minidiff, name), tmp_path)
    args = dict(batch_size=2, num_inference_steps=8, output_type="np", **kwargs)
    ours = mine(generator=torch.Generator().manual_seed(0), **args).images
    theirs = reference(generator=torch.Generator().manual_seed(0), **args).images
    compare(name, f"8 steps {kwargs}" if kwargs else "8 steps", ours, theirs, NP_TOL, "abs")


@pytest.mark.parametrize("pipeline", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"])
def test_lcm_distilled_unet(tmp_path, pipeline):
    """An LCM-distilled UNet (``time_cond_proj_dim``, Luo et al. 2023): no CFG batch; the guidance scale enters as
    the ``timestep_cond`` embedding, with the LCM scheduler, as diffusers runs it (LCM_Dreamshaper-style)."""
    from parity.pipeline_fixtures import reference_components

    components = reference_components(tmp_path)
    config = dict(components["unet"].config)
    torch.manual_seed(0)
    components["unet"] = diffusers.UNet2DConditionModel(**{**config, "time_cond_proj_dim": 32}).eval()
    randomize_(components["unet"], 7)
    components["scheduler"] = diffusers.LCMScheduler.from_config(components["scheduler"].config)
    reference = getattr(diffusers, pipeline)(**components, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp_path / "lcm")
    mine = load_minidiff(getattr(minidiff, pipeline), tmp_path / "lcm")
    assert type(mine.scheduler).__name__ == "LCMScheduler"
    kwargs = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=8.0)
    kwargs.update(dict(image=make_image(32), strength=0.75) if "Img2Img" in pipeline else dict(height=32, width=32))
    ours, theirs = run_both(reference, mine, **kwargs)
    compare("StableDiffusionPipeline", f"{pipeline} with an LCM-distilled UNet (w embedding)", ours, theirs, NP_TOL,
            "abs")
