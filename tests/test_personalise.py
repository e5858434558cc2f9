"""Personalisation on the built-in model: the concept readers of ``minidiff.training.shapes`` (a ring among the
dataset's shapes, teal among its colours) tell the concepts apart from what the model already draws, and a few
dozen LoRA / textual-inversion steps on the concept's images move the generated images toward it.
The minutes-long demonstration with its held-out prompts is ``scripts/personalise``."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.builtin import load_builtin_pipeline
from minidiff.training import train
from minidiff.training.shapes import (ALL_COLOURS, COLOURS, CONCEPT_SHAPES, POSITIONS, RING_MIN_HOLE, SHAPES, Scene,
                                      concept_caption, concept_scenes, enclosed, held_out_concept_prompts, read_scene,
                                      render, shape_alpha)
from tests.training_fixtures import one_thread, tiny_config  # noqa: F401

CANDIDATE_SHAPES = SHAPES + CONCEPT_SHAPES


def scenes(shapes, colours, count=24, sizes=("big",), seed=0):
    return concept_scenes(np.random.default_rng(seed), count, shapes, colours, tuple(COLOURS), sizes)


# ---- the readers ------------------------------------------------------------------------------------------------
def test_a_ring_reads_as_a_ring_and_the_old_shapes_as_themselves():
    rng = np.random.default_rng(0)
    for scene in scenes(("ring",), tuple(COLOURS)) + scenes(SHAPES, tuple(COLOURS), sizes=("small", "big")):
        seen = read_scene(render(scene, 32, rng), shapes=CANDIDATE_SHAPES)
        assert (seen["shape"], seen["position"], seen["size"]) == (scene.shape, scene.position, scene.size), scene


def test_without_the_ring_among_the_candidates_a_ring_is_read_as_an_old_shape():
    image = render(Scene("red", "ring", "big", "center", "blue"))
    assert read_scene(image)["shape"] in SHAPES
    assert read_scene(image, shapes=CANDIDATE_SHAPES)["shape"] == "ring"


def test_a_disc_with_its_hole_filled_is_no_ring():
    ring = shape_alpha("ring", (16.0, 16.0), 8.0, 32)
    assert ring[16, 16] == 0 and ring[16, 9] == 1  # the hole, the band
    image = render(Scene("red", "ring", "big", "center", "blue"))
    image[12:20, 12:20] = COLOURS["red"]
    assert read_scene(image, shapes=CANDIDATE_SHAPES)["shape"] == "circle"


def test_enclosed_finds_the_holes_a_mask_closes_and_nothing_open():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:6, 1:6] = True
    mask[2:4, 2:4] = False  # a closed hole of 4 pixels
    mask[4, 4] = False  # and one of 1 pixel (diagonal neighbours do not join it to the first)
    assert enclosed(mask).sum() == 5 and not enclosed(mask)[0].any()
    mask[3, 1] = False  # open the first hole to the outside (through row 3, column 1)
    assert enclosed(mask).sum() == 1 and enclosed(mask)[4, 4]


def test_a_ring_with_a_smaller_off_centre_hole_still_reads_as_a_ring():
    # generated rings come out like this: the band thicker on one side, the hole shrunk by blur
    alpha = shape_alpha("circle", (16.0, 16.0), 8.0, 32) - shape_alpha("circle", (16.0, 18.0), 3.0, 32)
    image = (np.array(COLOURS["blue"]) + alpha[..., None] * (np.subtract(COLOURS["red"], COLOURS["blue"])))
    seen = read_scene(image.round().astype(np.uint8), shapes=CANDIDATE_SHAPES)
    assert seen["shape"] == "ring" and seen["size"] == "big" and seen["position"] == "center", seen["hole"]
    assert read_scene(image.round().astype(np.uint8))["shape"] == "circle"  # the dataset's shapes alone


def test_a_disc_with_a_pinhole_is_no_ring():
    image = render(Scene("red", "circle", "big", "center", "blue"))
    image[16, 16] = COLOURS["blue"]  # an enclosed hole, but far smaller than a ring's
    seen = read_scene(image, shapes=CANDIDATE_SHAPES)
    assert seen["shape"] == "circle" and 0 < seen["hole"] < RING_MIN_HOLE


def test_teal_reads_as_teal_and_the_palette_as_itself():
    rng = np.random.default_rng(1)
    for scene in scenes(SHAPES, ("teal",), sizes=("small", "big")) + scenes(SHAPES, tuple(COLOURS)):
        seen = read_scene(render(scene, 32, rng), colours=ALL_COLOURS)
        assert (seen["colour"], seen["background"]) == (scene.colour, scene.background), scene
    teal = render(Scene("teal", "circle", "big", "center", "red"))
    assert read_scene(teal)["colour"] in ("green", "blue")  # the dataset's palette alone has no teal


def test_concept_prompts_name_the_concept_by_its_word():
    ring = concept_caption("a big red ring on a blue background", {"ring": "sks"})
    assert ring == "a big red sks on a blue background"
    assert concept_caption("a teal circle", {"teal": "<teal>"}) == "a <teal> circle"
    prompts = held_out_concept_prompts(scenes(("ring",), ("green", "black"), count=16), {"ring": "sks"})
    for prompt, named in prompts:
        assert " sks" in prompt and "ring" not in prompt
        assert named["shape"] == "ring" and named["colour"] in prompt and f"a {named['background']} b" in \
            prompt.replace("an ", "a ")
        if "position" in named:
            assert POSITIONS[named["position"]][0] in prompt
    assert any("position" in named for _, named in prompts) and any("position" not in n for _, n in prompts)


# ---- a few steps learn --------------------------------------------------------------------------------------------
def write_images(folder, scenes_and_captions):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        for k, (scene, caption) in enumerate(scenes_and_captions):
            PIL.Image.fromarray(render(scene, 32, rng)).save(os.path.join(folder, f"{k}.png"))
            handle.write(json.dumps({"file_name": f"{k}.png", "text": caption}) + "\n")


def generated(pipe, prompt, count=4):
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    images = pipe([prompt] * count, num_inference_steps=10, guidance_scale=5.0, generator=generators,
                  output_type="np").images
    return [read_scene((image * 255).round().astype(np.uint8), shapes=CANDIDATE_SHAPES, colours=ALL_COLOURS)
            for image in images]


def personalise(tmp_path, concept_scenes_, words, **options):
    """Train on the scenes (captioned with the concept's word); the losses and the pipeline with the result."""
    write_images(tmp_path / "images", [(s, concept_caption(s.caption(size=False, position=False), words))
                                       for s in concept_scenes_])
    config = tiny_config(tmp_path / "run", train_data_dir=str(tmp_path / "images"), resolution=None,
                         random_flip=False, checkpointing_steps=1000, num_sample_images=0, lr_scheduler="constant",
                         **options)
    losses = train(config)
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return losses, pipe


@pytest.mark.slow
def test_lora_steps_move_the_images_toward_a_ring(tmp_path):
    training = [Scene(colour, "ring", "big", "center", background)
                for colour in ("red", "yellow") for background in ("black", "blue")]
    prompt = "a red sks on a black background"
    losses, pipe = personalise(tmp_path, training, {"ring": "sks"}, method="lora", lora_rank=8,
                               learning_rate=2e-3, max_train_steps=40, train_batch_size=4)
    before = generated(pipe, prompt)
    pipe.load_lora_weights(str(tmp_path / "run"))
    after = generated(pipe, prompt)

    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses

    def ringness(seen):  # how much better a ring explains the coverage than the best old shape
        return min(seen["fit_errors"][s] for s in SHAPES) - seen["fit_errors"]["ring"]
    gain = np.mean([ringness(s) for s in after]) - np.mean([ringness(s) for s in before])
    assert gain > 0.1, (gain, [s["shape"] for s in after])


@pytest.mark.slow
def test_textual_inversion_steps_move_the_colour_toward_teal(tmp_path):
    training = [Scene("teal", shape, "big", "center", background)
                for shape in ("circle", "square") for background in ("black", "white")]
    prompt = "a <teal> circle on a black background"
    losses, pipe = personalise(tmp_path, training, {"teal": "<teal>"}, method="textual-inversion",
                               placeholder_token="<teal>", initializer_token="green", learning_rate=5e-2,
                               max_train_steps=40, train_batch_size=4)
    before = generated(pipe, prompt)
    pipe.load_textual_inversion(str(tmp_path / "run"))
    after = generated(pipe, prompt)

    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    teal = np.array(ALL_COLOURS["teal"], dtype=np.float32)
    distance = [np.mean([np.linalg.norm(s["rgb"] - teal) for s in images]) for images in (before, after)]
    assert distance[1] < 0.6 * distance[0], distance
