"""SDXL pipelines on tiny minidiff components: properties (text encoding, micro-conditioning, the base -> refiner
split, folders, the float16 VAE) and every bad input ending in an error that names the fix."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import minidiff
from tests.tiny_components import tiny_components, tiny_sdxl_components
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

PROMPTS = ["a red circle", "a blue square"]


def make(pipeline_class, **kwargs):
    config = {key: kwargs.pop(key) for key in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")
              if key in kwargs}
    pipe = pipeline_class(**tiny_sdxl_components(**kwargs), **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base():
    return make(minidiff.StableDiffusionXLPipeline)


@pytest.fixture(scope="module")
def refiner():
    return make(minidiff.StableDiffusionXLImg2ImgPipeline, refiner=True, requires_aesthetics_score=True)


def run(pipe, **kwargs):
    """np images of a 2-step seeded call (32x32 for the pipelines that take a size)."""
    args = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    if "height" in inspect.signature(pipe.__call__).parameters:
        args.update(height=32, width=32)
    return pipe(**{**args, **kwargs}).images


# ---- text encoding --------------------------------------------------------------------------------------------------
def test_encode_prompt_shapes_and_zero_negatives(base):
    embeds, negative, pooled, negative_pooled = base.encode_prompt(PROMPTS, num_images_per_prompt=3)
    assert embeds.shape == (6, 77, 64) and pooled.shape == (6, 32)  # 32 + 32 features: both towers concatenated
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[2], embeds[3])  # each prompt's rows together
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt
    _, negative, _, negative_pooled = base.encode_prompt(PROMPTS, negative_prompt="")
    assert negative.abs().sum() > 0 and negative_pooled.abs().sum() > 0
    assert base.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[1] is None


def test_prompt_2_defaults_to_prompt_and_reaches_only_the_second_tower(base):
    default = base.encode_prompt(PROMPTS)[0]
    assert torch.equal(default, base.encode_prompt(PROMPTS, prompt_2=PROMPTS)[0])
    other = base.encode_prompt(PROMPTS, prompt_2="an oil painting")[0]
    assert torch.equal(other[..., :32], default[..., :32]) and not torch.equal(other[..., 32:], default[..., 32:])


def test_clip_skip_reads_an_earlier_layer(base):
    ids = base.tokenizer_2(PROMPTS[0], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = base.text_encoder_2(ids, output_hidden_states=True).hidden_states
    embeds = base.encode_prompt(PROMPTS[0], clip_skip=2)[0]
    assert torch.equal(embeds[..., 32:], hidden[-4])  # penultimate is -2; clip_skip=2 goes 2 layers further


# ---- micro-conditioning ---------------------------------------------------------------------------------------------
def test_time_ids_and_their_cfg_batch(base, refiner):
    positive, negative = base.micro_conditioning(32, 48, original_size=(64, 96), crops_coords_top_left=(4, 8),
                                                 negative_target_size=(16, 16))
    assert positive.tolist() == [[64, 96, 4, 8, 32, 48]] and negative.tolist() == [[64, 96, 4, 8, 16, 16]]
    positive, negative = refiner.micro_conditioning(32, 32, scores=(7.0, 2.0))
    assert positive.tolist() == [[32, 32, 0, 0, 7.0]] and negative.tolist() == [[32, 32, 0, 0, 2.0]]
    encoded = base.encode_prompt(PROMPTS)
    cond = base.cfg_batch(encoded, torch.tensor([[1.0] * 6]), torch.tensor([[2.0] * 6]), do_cfg=True)
    assert cond["add_time_ids"][:, 0].tolist() == [2.0, 2.0, 1.0, 1.0]  # [negatives, positives] for every batch size
    assert torch.equal(cond["add_text_embeds"][2:], encoded[2])


def test_size_conditioning_changes_the_image(base):
    assert not torch.allclose(torch.as_tensor(run(base)), torch.as_tensor(run(base, original_size=(512, 512))))


# ---- base -> refiner ------------------------------------------------------------------------------------------------
def test_denoising_end_and_start_split_one_trajectory(base):
    """With the same UNet, base up to 0.5 then img2img from 0.5 is the full Euler run (no noise added between)."""
    full = run(base, num_inference_steps=4, output_type="latent")
    first = run(base, num_inference_steps=4, denoising_end=0.5, output_type="latent")
    second_half = minidiff.StableDiffusionXLImg2ImgPipeline(**base.components)
    second_half.set_progress_bar_config(disable=True)
    rest = second_half(prompt=PROMPTS[0], image=torch.as_tensor(first), num_inference_steps=4, denoising_start=0.5,
                       output_type="latent").images
    assert not torch.allclose(torch.as_tensor(first), torch.as_tensor(full))
    torch.testing.assert_close(rest, torch.as_tensor(full), rtol=1e-5, atol=1e-5)


def test_refiner_uses_the_aesthetic_score(refiner):
    image = torch.rand(1, 3, 32, 32)
    low, high = (run(refiner, image=image, strength=0.5, aesthetic_score=score) for score in (1.0, 9.0))
    assert not torch.allclose(torch.as_tensor(low), torch.as_tensor(high))


def test_turbo_one_step():
    pipe = make(minidiff.StableDiffusionXLPipeline)
    pipe.scheduler = minidiff.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                          timestep_spacing="trailing")
    images = run(pipe, num_inference_steps=1, guidance_scale=0.0)
    assert pipe.scheduler.timesteps.tolist() == [999] and images.shape == (1, 32, 32, 3)


def test_callback_sees_the_requested_tensors_and_may_replace_them(base):
    seen = []

    def zero_time_ids(pipe, i, t, tensors):
        seen.append(sorted(tensors))
        return {**tensors, "add_time_ids": torch.zeros_like(tensors["add_time_ids"])}

    images = run(base, callback_on_step_end=zero_time_ids,
                 callback_on_step_end_tensor_inputs=["latents", "add_time_ids"])
    assert seen == [["add_time_ids", "latents"]] * 2
    assert not torch.allclose(torch.as_tensor(images), torch.as_tensor(run(base)))


def test_output_tuple_and_float16_vae_decodes_in_float32():
    pipe = make(minidiff.StableDiffusionXLPipeline)
    latents = pipe(PROMPTS[0], num_inference_steps=1, height=32, width=32, output_type="latent", return_dict=False)
    assert isinstance(latents, tuple) and len(latents) == 1
    expected = pipe.decode(latents[0])
    pipe.vae.to(torch.float16)
    decoded = pipe.decode(latents[0])
    assert pipe.vae.dtype == torch.float16 and decoded.dtype == torch.float32  # upcast for the call, then restored
    torch.testing.assert_close(decoded, expected, atol=2e-2, rtol=0)  # only the weights' float16 rounding differs


# ---- folders --------------------------------------------------------------------------------------------------------
def test_save_and_load_keep_pipeline_config_and_missing_encoder(refiner, tmp_path):
    refiner.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    assert index["force_zeros_for_empty_prompt"] is True
    loaded = minidiff.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path)
    assert loaded.text_encoder is None and loaded.tokenizer is None and loaded.requires_aesthetics_score is True
    overridden = minidiff.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path, force_zeros_for_empty_prompt=False)
    assert overridden.force_zeros_for_empty_prompt is False
    as_txt2img = minidiff.StableDiffusionXLPipeline.from_pretrained(tmp_path)  # requires_aesthetics_score not its own
    assert not hasattr(as_txt2img, "requires_aesthetics_score")


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_sd1_unet_in_sdxl_pipeline_and_sdxl_unet_in_sd_pipeline():
    components = tiny_sdxl_components()
    with pytest.raises(ValueError, match="needs an SDXL UNet.*use StableDiffusionPipeline"):
        minidiff.StableDiffusionXLPipeline(**{**components, "unet": tiny_components()["unet"]})
    sd = tiny_components()
    with pytest.raises(ValueError, match="got an SDXL UNet.*StableDiffusionXLPipeline"):
        minidiff.StableDiffusionPipeline(**{**sd, "unet": components["unet"]})


def test_folder_of_the_other_family(base, tmp_path):
    minidiff.StableDiffusionPipeline(**tiny_components()).save_pretrained(tmp_path / "sd")
    with pytest.raises(ValueError, match="no entry for the 'text_encoder_2'.*holds a StableDiffusionPipeline"):
        minidiff.StableDiffusionXLPipeline.from_pretrained(tmp_path / "sd")
    base.save_pretrained(tmp_path / "sdxl")
    with pytest.raises(ValueError, match="got an SDXL UNet.*StableDiffusionXLPipeline"):
        minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "sdxl")


def test_refiner_unet_without_aesthetic_conditioning():
    components = tiny_sdxl_components(refiner=True)
    pipe = minidiff.StableDiffusionXLImg2ImgPipeline(**components)
    with pytest.raises(ValueError, match=r"refiner-like UNet.*set requires_aesthetics_score=True"):
        run(pipe, image=torch.rand(1, 3, 32, 32), strength=0.5)
    base_unet = minidiff.StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_components(), requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="base-like UNet.*set requires_aesthetics_score=False"):
        run(base_unet, image=torch.rand(1, 3, 32, 32), strength=0.5)
    txt2img = minidiff.StableDiffusionXLPipeline(**components)
    with pytest.raises(ValueError, match=r"StableDiffusionXLImg2ImgPipeline.from_pretrained\(\.\.\., requires_aes"):
        run(txt2img)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(original_size=1024), TypeError, "original_size must be a pair of ints"),
    (dict(crops_coords_top_left=(0.5, 0)), TypeError, "crops_coords_top_left must be a pair of ints"),
    (dict(negative_target_size=[16, 16, 16]), TypeError, "negative_target_size must be a pair"),
    (dict(denoising_end=1.0), ValueError, "strictly between 0 and 1"),
    (dict(denoising_end=0.001, num_inference_steps=2), ValueError, "denoising_end=0.001 stops before the first"),
    (dict(prompt=PROMPTS, prompt_2=["one"]), ValueError, "prompt_2 has 1 entries but prompt has 2"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 64)), ValueError,
     "prompt_embeds were given without pooled_prompt_embeds"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 64), pooled_prompt_embeds=torch.zeros(1, 77, 32)),
     ValueError, r"pooled_prompt_embeds must be a \(batch, 32\) tensor"),
    (dict(negative_prompt_embeds=torch.zeros(1, 77, 64)), ValueError,
     "negative_prompt_embeds were given without negative_pooled_prompt_embeds"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 64),
          negative_pooled_prompt_embeds=torch.zeros(1, 32)), ValueError, "pass either negative_prompt"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
    (dict(clip_skip=5), ValueError, "clip_skip must be"),
])
def test_bad_txt2img_arguments(base, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(base, **kwargs)


def test_bad_img2img_and_inpaint_arguments(refiner):
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="denoising_start=0.8 must be below denoising_end=0.5"):
        run(refiner, image=image, denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(ValueError, match="needs an image"):
        run(refiner)
    with pytest.raises(ValueError, match="only text_encoder_2.*drop them"):
        run(refiner, image=image, prompt_2="a photo")
    inpaint = make(minidiff.StableDiffusionXLInpaintPipeline)
    mask = torch.ones(1, 1, 32, 32)
    with pytest.raises(ValueError, match="padding_mask_crop is not supported"):
        run(inpaint, image=image, mask_image=mask, padding_mask_crop=8)
    with pytest.raises(ValueError, match="pass latents or denoising_start, not both"):
        run(inpaint, image=image, mask_image=mask, latents=torch.zeros(1, 4, 4, 4), denoising_start=0.5)
    with pytest.raises(ValueError, match="needs both image and mask_image"):
        run(inpaint, image=image)


def test_bad_components():
    components = tiny_sdxl_components()
    with pytest.raises(ValueError, match="needs text_encoder_2"):
        minidiff.StableDiffusionXLPipeline(**{**components, "text_encoder_2": None})
    with pytest.raises(ValueError, match="pass text_encoder and tokenizer together"):
        minidiff.StableDiffusionXLPipeline(**{**components, "tokenizer": None})
    with pytest.raises(ValueError, match="invisible watermark"):
        minidiff.StableDiffusionXLPipeline(**components, add_watermarker=True)
    with pytest.raises(TypeError, match="requires_aesthetics_score must be True or False"):
        minidiff.StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score="yes")
