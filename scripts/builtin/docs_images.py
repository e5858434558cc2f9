"""The README's pictures of the built-in model, made by the very commands the README shows (run in-process), then
enlarged 4x (nearest neighbour) with their prompts written underneath.

    python -m scripts.builtin.docs_images     # -> docs/builtin-prompts.png, docs/builtin-pipelines.png
"""

from __future__ import annotations

import os
import tempfile
import textwrap

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from minidiff.builtin import load_builtin_pipeline
from minidiff.cli import main as cli
from scripts.builtin.settings import REPO

DOCS = os.path.join(REPO, "docs")
ZOOM, LABEL_LINES = 4, 3
PROMPTS = [
    "a red circle on a blue background", "a small yellow square in the top left",
    "a big green triangle at the bottom on a black background", "a white circle in the center on a purple background",
    "a small blue square on the right on a yellow background", "an orange triangle in the top right",
    "a big purple circle on a white background", "a black square at the top on an orange background",
    # held-out pairs: no training image shows these colours on these backgrounds
    "a yellow circle on a blue background", "a big red square on a green background",
    "a small blue triangle on a white background", "a purple square in the bottom left on a yellow background",
]
SOURCE = "a red circle on a blue background"
COMMANDS = {  # title -> minidiff arguments; {dir} is a scratch folder
    "generate": ["generate", "--prompt", SOURCE, "--output", "{dir}/red-circle.png"],
    "img2img": ["img2img", "--image", "{dir}/red-circle.png", "--prompt", "a red square on a blue background",
                "--strength", "0.7", "--output", "{dir}/img2img.png"],
    "inpaint": ["inpaint", "--image", "{dir}/red-circle.png", "--mask", "{dir}/left-half.png", "--prompt",
                "a small yellow triangle on the left on a blue background", "--output", "{dir}/inpaint.png"],
    "edit": ["edit", "--image", "{dir}/red-circle.png", "--source-prompt", SOURCE, "--prompt",
             "a yellow circle on a blue background", "--start-step", "10", "--output", "{dir}/edit.png"],
}


def labelled(image: PIL.Image.Image, text: str) -> PIL.Image.Image:
    """``image`` enlarged ZOOM times with ``text`` wrapped in the strip below it."""
    big = image.convert("RGB").resize((image.width * ZOOM, image.height * ZOOM), PIL.Image.NEAREST)
    tile = PIL.Image.new("RGB", (big.width, big.height + 12 * LABEL_LINES + 4), "white")
    tile.paste(big, (0, 0))
    draw = PIL.ImageDraw.Draw(tile)
    for i, line in enumerate(textwrap.wrap(text, width=big.width // 6)[:LABEL_LINES]):
        draw.text((2, big.height + 2 + 12 * i), line, fill="black")
    return tile


def grid(tiles: list[PIL.Image.Image], columns: int) -> PIL.Image.Image:
    rows = -(-len(tiles) // columns)
    width, height = tiles[0].size
    sheet = PIL.Image.new("RGB", (columns * (width + 4), rows * (height + 4)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (width + 4), (i // columns) * (height + 4)))
    return sheet


def main() -> None:
    torch.set_num_threads(1)
    os.makedirs(DOCS, exist_ok=True)
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tiles = [labelled(pipe(p, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images[0], p)
             for p in PROMPTS]
    grid(tiles, 6).save(os.path.join(DOCS, "builtin-prompts.png"))

    with tempfile.TemporaryDirectory() as scratch:
        mask = np.zeros((32, 32), np.uint8)
        mask[:, :16] = 255
        PIL.Image.fromarray(mask).save(os.path.join(scratch, "left-half.png"))
        tiles = []
        for title, args in COMMANDS.items():
            args = [a.format(dir=scratch) for a in args]
            if cli(args) != 0:
                raise SystemExit(f"minidiff {' '.join(args)} failed")
            with PIL.Image.open(args[args.index("--output") + 1]) as image:
                tiles.append(labelled(image, f"{title}: {args[args.index('--prompt') + 1]}"))
            if title == "inpaint":
                with PIL.Image.open(os.path.join(scratch, "left-half.png")) as image:
                    tiles.insert(-1, labelled(image, "inpaint mask (white: repaint)"))
    grid(tiles, len(tiles)).save(os.path.join(DOCS, "builtin-pipelines.png"))
    print(f"wrote {DOCS}/builtin-prompts.png and builtin-pipelines.png")


if __name__ == "__main__":
    main()
