"""The README's picture of the outline ControlNet: held-out outlines (colour pairs never trained on), what the
built-in model draws for their prompts alone and with the shipped ControlNet; then one outline under six other
prompts, whose colours it follows. Tiles enlarged 4x, prompts underneath. Also the README's example condition
image: a triangle's outline off the model's grid.

    python -m scripts.controlnet.docs_images   # -> docs/controlnet-outline.png, docs/outline-triangle.png
"""

from __future__ import annotations

import dataclasses
import os

import PIL.Image
import torch

from minidiff.builtin import load_builtin_pipeline
from minidiff.pipelines.conditions import outline
from minidiff.training.shapes import HELD_OUT_PAIRS, shape_alpha
from scripts.builtin.docs_images import grid, labelled
from scripts.controlnet.draw import condition_image, held_out_shapes
from scripts.controlnet.evaluate import controlnet_pipeline, generate
from scripts.controlnet.settings import DOCS, SHIPPED, THREADS
from scripts.personalise.docs_images import title

COLUMNS = 6
PICTURE = os.path.join(DOCS, "controlnet-outline.png")
EXAMPLE = os.path.join(DOCS, "outline-triangle.png")  # `minidiff generate --control-image docs/outline-triangle.png`


def row(name: str, images, captions: list[str]) -> list[PIL.Image.Image]:
    tiles = [labelled(PIL.Image.fromarray(image), caption) for image, caption in zip(images, captions)]
    return [title(name, tiles[0]), *tiles]


def main() -> None:
    torch.set_num_threads(THREADS)
    shapes = held_out_shapes(COLUMNS)
    recoloured = [dataclasses.replace(shapes[0], colour=colour, background=background)
                  for colour, background in HELD_OUT_PAIRS[1:COLUMNS + 1]]
    base = load_builtin_pipeline()
    base.set_progress_bar_config(disable=True)
    controlled = controlnet_pipeline(SHIPPED)
    captions = [placed.caption() for placed in shapes]
    tiles = (row("outline", [condition_image(placed) for placed in shapes], ["(condition image)"] * COLUMNS)
             + row("model alone", generate(base, shapes), captions)
             + row("ControlNet", generate(controlled, shapes), captions)
             + row("one outline", generate(controlled, recoloured), [placed.caption() for placed in recoloured]))
    os.makedirs(DOCS, exist_ok=True)
    grid(tiles, COLUMNS + 1).save(PICTURE)
    PIL.Image.fromarray(outline(shape_alpha("triangle", (20.0, 12.0), 8.0, 32) > 0.5)).save(EXAMPLE)
    print(f"wrote {PICTURE} and {EXAMPLE}")


if __name__ == "__main__":
    main()
