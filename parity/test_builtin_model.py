"""The built-in model (minidiff/weights/tiny-shapes) and its outline ControlNet (tiny-shapes-outline) in diffusers
and transformers: the shipped folders load there unchanged, and the same prompt and seed give the same image as in
minidiff."""

from __future__ import annotations

import diffusers
import PIL.Image
import pytest
import torch
import transformers

import minidiff
from minidiff.builtin import builtin_controlnet_folder, builtin_model_folder
from minidiff.pipelines.conditions import outline
from minidiff.training.shapes import shape_alpha
from parity.report import compare, compare_exact
from tests.training_fixtures import one_thread  # noqa: F401  (the tiny model runs fastest single-threaded)

NP_TOL = 1e-4  # absolute, images in [0, 1]
PROMPTS = ["a red circle on a blue background", "a small yellow square in the top left",
           "a photo of an astronaut riding a horse"]  # the last is outside what the model was taught


@pytest.fixture(scope="module")
def pipelines():
    folder = builtin_model_folder()
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    mine = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    for pipe in (reference, mine):
        pipe.set_progress_bar_config(disable=True)
    return reference, mine


def test_weights_load_as_float32_in_both(pipelines):
    """The files hold float16; every loader builds float32 models and upcasts."""
    for pipe in pipelines:
        for name in ("vae", "text_encoder", "unet"):
            assert getattr(pipe, name).dtype == torch.float32, (type(pipe).__module__, name)


def test_tokenizer_ids(pipelines):
    reference, mine = pipelines
    for prompt in PROMPTS:
        ours = mine.tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        theirs = reference.tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        compare_exact("CLIPTokenizer", f"built-in tokenizer: {prompt!r}", ours, theirs)


def test_text_encoder(pipelines):
    reference, mine = pipelines
    ids = mine.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    text_encoder = transformers.CLIPTextModel.from_pretrained(builtin_model_folder(), subfolder="text_encoder")
    with torch.no_grad():
        ours = mine.text_encoder(ids).last_hidden_state
        theirs = text_encoder(ids).last_hidden_state
    compare("CLIPTextModel", "built-in text encoder, 3 prompts", ours, theirs, 1e-5)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_to_image(pipelines, prompt):
    reference, mine = pipelines
    kwargs = dict(prompt=prompt, num_inference_steps=20, guidance_scale=5.0, output_type="np")
    ours = mine(**kwargs, generator=torch.Generator().manual_seed(3)).images
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(3)).images
    compare("StableDiffusionPipeline", f"built-in model, DDIM 20 steps: {prompt!r}", ours, theirs, NP_TOL, "abs")


def test_text_to_image_other_scheduler_and_negative_prompt(pipelines):
    reference, mine = (type(p)(**p.components) for p in pipelines)  # the module's pipelines keep their DDIM
    reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    mine.scheduler = minidiff.DPMSolverMultistepScheduler.from_config(mine.scheduler.config)
    for pipe in (reference, mine):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS[:2], negative_prompt=["a green circle", "a blue square"], num_inference_steps=12,
                  guidance_scale=4.0, output_type="np")
    ours = mine(**kwargs, generator=torch.Generator().manual_seed(5)).images
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(5)).images
    compare("StableDiffusionPipeline", "built-in model, DPM++ 12 steps, negative prompts", ours, theirs, NP_TOL, "abs")


def test_the_shipped_outline_controlnet(pipelines):
    """minidiff/weights/tiny-shapes-outline loads in diffusers' ControlNetModel and draws the same image there."""
    reference, mine = pipelines
    folder = builtin_controlnet_folder()
    theirs_pipe = diffusers.StableDiffusionControlNetPipeline(
        **reference.components, controlnet=diffusers.ControlNetModel.from_pretrained(folder))
    ours_pipe = minidiff.StableDiffusionControlNetPipeline(
        **mine.components, controlnet=minidiff.ControlNetModel.from_pretrained(folder))
    assert theirs_pipe.controlnet.dtype == ours_pipe.controlnet.dtype == torch.float32
    condition = PIL.Image.fromarray(outline(shape_alpha("triangle", (20.0, 12.0), 8.0, 32) > 0.5))
    kwargs = dict(prompt="a yellow triangle on a blue background", image=condition, num_inference_steps=20,
                  guidance_scale=5.0, output_type="np")
    for pipe in (theirs_pipe, ours_pipe):
        pipe.set_progress_bar_config(disable=True)
    ours = ours_pipe(**kwargs, generator=torch.Generator().manual_seed(2)).images
    theirs = theirs_pipe(**kwargs, generator=torch.Generator().manual_seed(2)).images
    compare("StableDiffusionControlNetPipeline", "built-in model + its outline ControlNet, DDIM 20 steps", ours,
            theirs, NP_TOL, "abs")
