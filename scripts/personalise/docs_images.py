"""The README's pictures of personalisation: per concept, its training images, then the same held-out prompts
(colours the concept was never shown with) drawn by the built-in model before and after each run; and the old
vocabulary before and after, which shows how much each run forgets. Tiles enlarged 4x, prompts underneath.

    python -m scripts.personalise.docs_images   # -> docs/personalise-ring.png, -teal.png, -forgetting.png
"""

from __future__ import annotations

import os

import PIL.Image
import PIL.ImageDraw
import torch

from minidiff.training.shapes import held_out_prompts
from scripts.builtin.docs_images import grid, labelled
from scripts.personalise.draw import concept_training_set
from scripts.personalise.evaluate import BASE, concept_prompts, generate, load_run
from scripts.personalise.settings import CONCEPTS, DOCS, RUNS_CONFIG, THREADS

COLUMNS = 6


def title(text: str, like: PIL.Image.Image) -> PIL.Image.Image:
    """A blank tile the size of ``like`` naming its row."""
    tile = PIL.Image.new("RGB", like.size, "white")
    PIL.ImageDraw.Draw(tile).text((4, like.height // 2 - 6), text, fill="black")
    return tile


def rows_of(runs: list[str], prompts: list[str]) -> list[PIL.Image.Image]:
    """One row per run: its name, then its image of each prompt (the evaluation's seeds)."""
    tiles = []
    for name in runs:
        images = generate(load_run(name), prompts)
        row = [labelled(PIL.Image.fromarray(image), prompt) for image, prompt in zip(images, prompts)]
        tiles += [title("before" if name == BASE else name, row[0]), *row]
    return tiles


def main() -> None:
    torch.set_num_threads(THREADS)
    os.makedirs(DOCS, exist_ok=True)
    for concept in CONCEPTS:
        images, captions = concept_training_set(concept)
        shown = [labelled(PIL.Image.fromarray(image), caption) for image, caption in zip(images, captions)]
        runs = [name for name, run in RUNS_CONFIG.items() if run["concept"] == concept]
        prompts = [prompt for prompt, _ in concept_prompts(concept)[:COLUMNS]]
        tiles = [title("training", shown[0]), *shown[:COLUMNS]] + rows_of([BASE, *runs], prompts)
        grid(tiles, COLUMNS + 1).save(os.path.join(DOCS, f"personalise-{concept}.png"))
    tiles = rows_of([BASE, *RUNS_CONFIG], held_out_prompts(COLUMNS))
    grid(tiles, COLUMNS + 1).save(os.path.join(DOCS, "personalise-forgetting.png"))
    print(f"wrote {DOCS}/personalise-{{{','.join(CONCEPTS)},forgetting}}.png")


if __name__ == "__main__":
    main()
