"""The built-in model (minidiff/weights/tiny-shapes) and its dataset: the shipped files, images that show what
held-out prompts name (measured with pixel statistics, not with the model), DDIM inversion + edit, every pipeline
and the CLI on it, and bad input."""

from __future__ import annotations

import json
import os

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
    matches, nearest_colour, parse_prompt, random_scene, read_scene, render,
)
from scripts.builtin.evaluate import colour_edit, colour_edits, mask_iou, prompt_match
from tests.training_fixtures import one_thread  # noqa: F401  (the tiny model runs fastest single-threaded)

MAX_BYTES = 15 * 2**20


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
@pytest.mark.slow
def test_images_show_what_held_out_prompts_name(pipe):
    """24 prompts naming (colour, background) pairs no training image shows, seeds never used in training.
    An image counts only if every attribute its prompt names is measured in it."""
    prompts = held_out_prompts(24)
    result = prompt_match(pipe, prompts)
    assert result["fraction"] >= 0.8, result["failures"]
    assert result["fraction"] > 100 * result["chance"]  # chance: ~0.003


@pytest.mark.slow
def test_inversion_and_edit_change_the_colour_and_keep_the_shape(pipe):
    """12 random colour edits (DDIM inversion under the source prompt, resampling under the edited one): the new
    colour shows in every one, on the same background, and most keep the shape where it was (mask IoU >= 0.7);
    redrawing the target prompt from a fresh seed instead keeps it far less often."""
    edits = colour_edits(12)
    results = [colour_edit(pipe, *edit, seed=2000 + i) for i, edit in enumerate(edits)]
    assert all(r["found_after"] == edit[1] and r["background_after"] == edit[3] for r, edit in zip(results, edits)), results
    kept = np.mean([r["ok"] for r in results])
    redrawn = []
    for i, (colour, new_colour, shape, background) in enumerate(edits):
        source = pipe(f"a big {colour} {shape} on a {background} background", num_inference_steps=20,
                      guidance_scale=5.0, generator=torch.Generator().manual_seed(2000 + i)).images[0]
        fresh = pipe(f"a big {new_colour} {shape} on a {background} background", num_inference_steps=20,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(3000 + i)).images[0]
        redrawn.append(mask_iou(read_scene(source)["mask"], read_scene(fresh)["mask"]) >= 0.7)
    assert kept >= 0.6 and kept >= np.mean(redrawn) + 0.3, (kept, np.mean(redrawn), results)


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
    # The VAE decoder's GroupNorms see the whole image, so a repainted left half shifts every colour a little (here
    # ~0.06); what must stay is what the right half shows: the same palette colour at >= 90% of its pixels, away from
    # the seam (a latent pixel is 4x4). The left half gets the yellow square it was asked for.
    before_labels = nearest_colour(np.asarray(image))
    after_labels = nearest_colour((repainted * 255).round().astype(np.uint8))
    assert (after_labels[:, 20:] == before_labels[:, 20:]).mean() >= 0.9
    yellow = list(COLOURS).index("yellow")
    assert (after_labels[:, :16] == yellow).sum() >= 20 and not (before_labels == yellow).any()


def test_prompts_outside_the_vocabulary_still_generate(pipe):
    prompts = ["a photo of an astronaut riding a horse", "", "ünïcödé ☃ !!", " ".join(["words"] * 120)]
    with pytest.warns(UserWarning, match="truncated"):
        images = pipe(prompts, num_inference_steps=5, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (4, 32, 32, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="not in the dataset's grammar"):
        matches("a photo of an astronaut", images[0])


# ---- the command line ---------------------------------------------------------------------------------------------
def test_cli_generate_with_no_model_uses_the_built_in_one(tmp_path, capsys):
    """The README's main job (its time is printed per stage, and measured in the README, not asserted here)."""
    output = tmp_path / "red-circle.png"
    assert cli_main(["generate", "--prompt", "a red circle on a blue background", "--output", str(output)]) == 0
    assert str(output) in capsys.readouterr().out
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


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_cli_rejects_a_seed_torch_cannot_take(tmp_path, capsys, seed):
    assert cli_main(["generate", "--prompt", "a red circle", "--seed", seed, "--output", str(tmp_path / "x.png")]) == 2
    assert "--seed must be an integer in [0, 2**64)" in capsys.readouterr().err


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
