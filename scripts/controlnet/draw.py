"""The outline ControlNet's training images: one shape anywhere at any size, its outline as the condition image
and a caption naming its colour, its shape and at random its background (the folder ``--images`` takes with
``--method controlnet``: ``metadata.jsonl`` lines with ``file_name``, ``text`` and ``conditioning_image``).

    python -m scripts.controlnet.draw       # -> runs/controlnet/data/
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image

from minidiff.pipelines.conditions import outline
from minidiff.training.shapes import COLOURS, HELD_OUT_PAIRS, SHAPES, article, jittered, paint, shape_alpha
from scripts.controlnet.settings import BACKGROUND_MENTION, DATA, DATA_SEED, HELD_OUT, HELD_OUT_SEED, IMAGES, RADIUS

RESOLUTION = 32  # the built-in model's


@dataclass(frozen=True)
class Placed:
    """A shape with free geometry: centre (x, y) and half-width in pixels."""

    colour: str
    shape: str
    background: str
    centre: tuple[float, float]
    radius: float

    def caption(self, background: bool = True) -> str:
        words = f"{article(self.colour)} {self.colour} {self.shape}"
        return words + (f" on {article(self.background)} {self.background} background" if background else "")

    def alpha(self) -> np.ndarray:
        """Coverage (H, W) in [0, 1] of the shape."""
        return shape_alpha(self.shape, self.centre, self.radius, RESOLUTION)

    def mask(self) -> np.ndarray:
        """(H, W) bool: the pixels the shape covers more than half."""
        return self.alpha() > 0.5


def place(rng: np.random.Generator, colour: str, background: str) -> Placed:
    """A random shape in ``colour`` on ``background``: half-width uniform in RADIUS (fractions of the side), centre
    uniform where the whole shape stays one pixel inside the frame."""
    radius = rng.uniform(*RADIUS) * RESOLUTION
    centre = rng.uniform(radius + 1, RESOLUTION - radius - 1, 2)
    return Placed(colour, SHAPES[rng.integers(len(SHAPES))], background, (float(centre[0]), float(centre[1])),
                  float(radius))


def training_shapes(count: int = IMAGES, seed: int = DATA_SEED) -> list[Placed]:
    """Random colour pairs (different colours, never a held-out pair: as the built-in model's data)."""
    rng = np.random.default_rng(seed)
    names, shapes = list(COLOURS), []
    while len(shapes) < count:
        colour, background = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        if (colour, background) not in HELD_OUT_PAIRS:
            shapes.append(place(rng, colour, background))
    return shapes


def held_out_shapes(count: int = HELD_OUT, seed: int = HELD_OUT_SEED) -> list[Placed]:
    """New geometry in the held-out colour pairs, which neither the built-in model nor the ControlNet saw."""
    rng = np.random.default_rng(seed)
    return [place(rng, *HELD_OUT_PAIRS[k % len(HELD_OUT_PAIRS)]) for k in range(count)]


def condition_image(placed: Placed) -> np.ndarray:
    """The outline of the shape's mask, (H, W, 3) uint8 white on black."""
    return outline(placed.mask())


def main() -> None:
    os.makedirs(os.path.join(DATA, "conditions"), exist_ok=True)
    rng = np.random.default_rng(DATA_SEED + 1)  # colour jitter and caption choices
    entries = []
    for k, placed in enumerate(training_shapes()):
        image = paint(placed.alpha(), jittered(placed.colour, rng), jittered(placed.background, rng))
        PIL.Image.fromarray(image).save(os.path.join(DATA, f"{k:05d}.png"))
        PIL.Image.fromarray(condition_image(placed)).save(os.path.join(DATA, "conditions", f"{k:05d}.png"))
        caption = placed.caption(background=rng.random() < BACKGROUND_MENTION)
        entries.append(json.dumps({"file_name": f"{k:05d}.png", "text": caption,
                                   "conditioning_image": f"conditions/{k:05d}.png"}))
    with open(os.path.join(DATA, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(entries) + "\n")
    print(f"wrote {len(entries)} images and outlines to {DATA}")


if __name__ == "__main__":
    main()
