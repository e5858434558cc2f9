"""The built-in model (minidiff/weights/tiny-shapes) and its dataset: the shipped files, images that show what
held-out prompts name (measured with pixel statistics, not with the model), DDIM inversion + edit, every pipeline
and the CLI on it, and bad input."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open

import minidiff
from minidiff.builtin import builtin_model_folder, load_builtin_pipeline, vocabulary
from minidiff.cli import main as cli_main
from minidiff.training.shapes import (
    COLOURS, HELD_OUT_PAIRS, POSITIONS, SHAPES, SIZES, CaptionedShapes, Scene, chance_of_match, held_out_prompts,
    matches, parse_prompt, random_scene, read_scene, render,
)
from scripts.builtin.evaluate import invert_and_edit, prompt_match

MAX_BYTES = 15 * 2**20


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the shipped folder -------------------------------------------------------------------------------------------
def test_folder_is_a_small_diffusers_folder_of_float16_weights():
    folder = builtin_model_folder()
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {name: index[name][1] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")} == {
        "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
        "unet": "UNet2DConditionModel", "scheduler": "DDIMScheduler"}
    sizes = {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names}
    assert sum(sizes.values()) < MAX_BYTES, sizes
    weights = [path for path in sizes if path.endswith(".safetensors")]
    assert sorted(weights) == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                               "vae/diffusion_pytorch_model.safetensors"]
    for path in weights:
        with safe_open(os.path.join(folder, path), "pt") as handle:
            assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}, path
    assert "README.md" in sizes  # the model card


def test_loads_as_float32_with_the_shipped_tokenizer(pipe):
    for name in ("vae", "text_encoder", "unet"):
        assert getattr(pipe, name).dtype == torch.float32
    prompt = "a small yellow square in the top left"
    assert pipe.tokenizer.encode(prompt) == minidiff.CLIPTokenizer().encode(prompt)


def test_vocabulary_lists_what_the_model_knows():
    known = vocabulary()
    assert known["colours"] == list(COLOURS) and known["shapes"] == list(SHAPES)
    assert known["sizes"] == list(SIZES) and len(known["positions"]) == len(POSITIONS)


# ---- what the images show -----------------------------------------------------------------------------------------
def test_images_show_what_held_out_prompts_name(pipe):
    """24 prompts naming (colour, background) pairs no training image shows, seeds never used in training.
    An image counts only if every attribute its prompt names is measured in it."""
    prompts = held_out_prompts(24)
    result = prompt_match(pipe, prompts)
    assert result["fraction"] >= 0.8, result["failures"]
    assert result["fraction"] > 100 * result["chance"]  # chance: ~0.003


@pytest.mark.parametrize("colour, new_colour, shape, background", [
    ("red", "yellow", "circle", "blue"), ("green", "purple", "square", "white"), ("blue", "orange", "triangle", "black"),
])
def test_inversion_and_edit_change_the_colour_and_keep_the_shape(pipe, colour, new_colour, shape, background):
    source = f"a big {colour} {shape} on a {background} background"
    result = invert_and_edit(pipe, source, source.replace(colour, new_colour, 1), seed=7)
    assert (result["before"]["colour"], result["before"]["shape"]) == (colour, shape)
    assert result["after"]["colour"] == new_colour
    assert result["after"]["background"] == background
    assert result["iou"] >= 0.7, result["iou"]


def test_img2img_keeps_the_layout_and_inpainting_keeps_the_unmasked_half(pipe):
    generator = torch.Generator().manual_seed(11)
    image = pipe("a big red circle in the center on a blue background", num_inference_steps=20, guidance_scale=5.0,
                 generator=generator).images[0]
    img2img = minidiff.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    varied = img2img("a big red circle in the center on a blue background", image=image, strength=0.5,
                     num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator().manual_seed(1)).images[0]
    before, after = read_scene(image), read_scene(varied)
    assert (after["colour"], after["background"], after["position"]) == ("red", "blue", "center")
    assert np.logical_and(before["mask"], after["mask"]).sum() / np.logical_or(before["mask"], after["mask"]).sum() > 0.6

    inpaint = minidiff.StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # repaint the left half
    repainted = inpaint("a small yellow square on the left on a blue background", image=image,
                        mask_image=PIL.Image.fromarray(mask), num_inference_steps=20, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    kept = np.asarray(image, np.float32)[:, 20:] / 255  # away from the seam (a latent pixel is 4x4)
    assert np.abs(repainted[:, 20:] - kept).mean() < 0.05


def test_prompts_outside_the_vocabulary_still_generate(pipe):
    prompts = ["a photo of an astronaut riding a horse", "", "ünïcödé ☃ !!", " ".join(["words"] * 120)]
    with pytest.warns(UserWarning, match="truncated"):
        images = pipe(prompts, num_inference_steps=5, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (4, 32, 32, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="not in the dataset's grammar"):
        matches("a photo of an astronaut", images[0])


# ---- the command line ---------------------------------------------------------------------------------------------
def test_cli_generate_writes_the_png_in_seconds(tmp_path):
    output = tmp_path / "red-circle.png"
    start = time.perf_counter()
    assert cli_main(["generate", "--prompt", "a red circle on a blue background", "--output", str(output)]) == 0
    assert time.perf_counter() - start < 30
    with PIL.Image.open(output) as image:
        assert image.size == (32, 32)
        assert read_scene(image)["colour"] == "red"


@pytest.mark.parametrize("args, message", [
    (["--height", "36"], "multiples of 8"),
    (["--width", "-8"], "multiples of 8"),
    (["--steps", "0"], "num_inference_steps"),
])
def test_cli_rejects_bad_sizes_and_steps(tmp_path, capsys, args, message):
    assert cli_main(["generate", "--prompt", "a red circle", "--output", str(tmp_path / "x.png"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_rejects_a_negative_seed(tmp_path):
    with pytest.raises(SystemExit, match="--seed must be a non-negative integer"):
        cli_main(["generate", "--prompt", "a red circle", "--seed", "-1", "--output", str(tmp_path / "x.png")])


# ---- the dataset ------------------------------------------------------------------------------------------------
def test_dataset_is_seeded_and_never_shows_a_held_out_pair():
    a, b = CaptionedShapes(300, seed=3), CaptionedShapes(300, seed=3)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, CaptionedShapes(300, seed=4).images)
    assert not {(s.colour, s.background) for s in a.scenes} & set(HELD_OUT_PAIRS)
    assert all(s.colour != s.background for s in a.scenes)
    example = a[0]
    assert example["pixel_values"].shape == (3, 32, 32) and -1 <= example["pixel_values"].min()
    assert parse_prompt(example["caption"])["colour"] == a.scenes[0].colour


def test_read_scene_recovers_every_rendered_scene():
    """The measure the generation tests rely on is exact on the data itself (held-out pairs included)."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        scene = random_scene(rng, exclude=())
        seen = read_scene(render(scene, 32, rng))
        assert {k: seen[k] for k in ("colour", "shape", "size", "position", "background")} == vars(scene)


def test_captions_parse_back_and_chance_is_small():
    scene = Scene("orange", "triangle", "small", "top left", "white")
    assert scene.caption() == "a small orange triangle in the top left on a white background"
    assert scene.caption(size=False, position=False) == "an orange triangle on a white background"
    assert parse_prompt(scene.caption()) == vars(scene)
    assert parse_prompt("A  RED circle") == {"colour": "red", "shape": "circle"}
    assert parse_prompt("a red cat") is None
    assert chance_of_match("a red circle") == pytest.approx(1 / 24)
    assert chance_of_match(scene.caption()) == pytest.approx(1 / (8 * 3 * 2 * 9 * 7))
    assert all(parse_prompt(p)["background"] for p in held_out_prompts(16))
