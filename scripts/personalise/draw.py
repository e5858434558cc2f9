"""The training images of each concept (PNG + ``metadata.jsonl`` captions, the folder ``--images`` takes) and the
prior-preservation class images the frozen built-in model draws from its own vocabulary.

    python -m scripts.personalise.draw      # -> runs/personalise/data/<concept>/, runs/personalise/class_images/
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import torch

from minidiff.builtin import load_builtin_pipeline
from minidiff.training.shapes import HELD_OUT_PAIRS, Scene, concept_caption, concept_scenes, random_scene, render
from scripts.personalise.settings import CLASS, CLASS_IMAGES, CONCEPTS, DATA, THREADS


def write_folder(folder: str, images: list, captions: list[str], stem: str) -> None:
    """``images`` as ``<stem>-00000.png``, ... with their captions in ``metadata.jsonl``."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for k, (image, caption) in enumerate(zip(images, captions)):
        name = f"{stem}-{k:05d}.png"
        PIL.Image.fromarray(np.asarray(image)).save(os.path.join(folder, name))
        entries.append(json.dumps({"file_name": name, "text": caption}))
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(entries) + "\n")


def training_scenes(name: str, rng: np.random.Generator) -> list[Scene]:
    """What the concept's few training images show: the first draws of ``rng`` seeded with the concept's seed."""
    concept = CONCEPTS[name]
    return concept_scenes(rng, concept["images"], concept["shapes"], concept["colours"], concept["backgrounds"],
                          concept["sizes"])


def concept_training_set(name: str) -> tuple[list[np.ndarray], list[str]]:
    """The concept's few images (colours jittered) and their captions, the concept named by its new word."""
    concept = CONCEPTS[name]
    rng = np.random.default_rng(concept["seed"])
    scenes = training_scenes(name, rng)
    images = [render(scene, 32, rng) for scene in scenes]
    return images, [concept_caption(scene.random_caption(rng), concept["words"]) for scene in scenes]


def class_prompts() -> list[str]:
    """Prompts of the frozen model's class images: random scenes of the dataset's grammar (never a held-out pair,
    so the old-vocabulary test stays held out)."""
    rng = np.random.default_rng(CLASS["seed"])
    return [random_scene(rng, exclude=HELD_OUT_PAIRS).random_caption(rng) for _ in range(CLASS["count"])]


def draw_class_images() -> None:
    """The class prompts with guidance (as the evaluation samples), then the unconditional images: the empty
    caption without guidance, which keeps the unconditional prediction that classifier-free guidance subtracts."""
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    batches = [(class_prompts(), CLASS["guidance"]), ([""] * CLASS["unconditional"], 1.0)]
    images, captions = [], []
    for prompts, guidance in batches:
        generators = [torch.Generator().manual_seed(CLASS["seed"] * 10_000 + len(images) + k)
                      for k in range(len(prompts))]
        drawn = pipe(prompts, num_inference_steps=CLASS["steps"], guidance_scale=guidance, generator=generators,
                     output_type="np").images
        images += list((drawn * 255).round().astype(np.uint8))
        captions += prompts
    write_folder(CLASS_IMAGES, images, captions, "class")


def main() -> None:
    torch.set_num_threads(THREADS)
    for name in CONCEPTS:
        images, captions = concept_training_set(name)
        write_folder(os.path.join(DATA, name), images, captions, name)
    draw_class_images()
    print(f"wrote {', '.join(CONCEPTS)} to {DATA} and {CLASS['count'] + CLASS['unconditional']} class images to "
          f"{CLASS_IMAGES}")


if __name__ == "__main__":
    main()
