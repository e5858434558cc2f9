"""Captioned shapes: the procedural dataset the built-in model (``minidiff/weights/tiny-shapes``) was trained on.

Every image is one flat shape on a flat background, drawn from a :class:`Scene` - a colour, a shape, a size, a
position and a background colour - and captioned in a small fixed grammar that names the colour and the shape and,
at random, any of the other three::

    a red circle on a blue background
    a small yellow square in the top left
    a big green triangle at the bottom on a black background

Attributes the caption leaves out are still drawn at random, so a prompt that names fewer of them gets any of the
rest. Nothing is downloaded: the same seed always gives the same scenes, pixels and captions.

Some (shape colour, background colour) pairs are held out (:data:`HELD_OUT_PAIRS`): no training image shows them,
so prompts naming them test whether the model composes what it learned. :func:`read_scene` measures a scene back
from pixels with plain colour statistics, independent of any model; the tests and ``scripts/builtin/evaluate.py``
use it to check that generated images show what their prompts name.

Personalisation (``scripts/personalise``) teaches the model concepts this dataset never shows: a shape
(:data:`CONCEPT_SHAPES`, a ring) and a colour (:data:`CONCEPT_COLOURS`, teal). :func:`render` and
:func:`shape_alpha` draw them like the others, :func:`concept_scenes` gives the few training scenes and the held-out
ones, and ``read_scene(image, shapes=..., colours=...)`` reads them back from pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from minidiff.pipelines.conditions import reachable

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 50), "green": (40, 160, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.15, "big": 0.25}  # half the shape's width, as a fraction of the image side
POSITIONS = {  # name -> (phrase, centre (x, y) as fractions of the image side)
    "top left": ("in the top left", (0.3, 0.3)), "top": ("at the top", (0.5, 0.3)),
    "top right": ("in the top right", (0.7, 0.3)), "left": ("on the left", (0.3, 0.5)),
    "center": ("in the center", (0.5, 0.5)), "right": ("on the right", (0.7, 0.5)),
    "bottom left": ("in the bottom left", (0.3, 0.7)), "bottom": ("at the bottom", (0.5, 0.7)),
    "bottom right": ("in the bottom right", (0.7, 0.7)),
}
# (shape colour, background colour) pairs no training image shows; each colour once on each side
HELD_OUT_PAIRS = (("red", "green"), ("orange", "purple"), ("yellow", "blue"), ("green", "black"),
                  ("blue", "white"), ("purple", "yellow"), ("white", "orange"), ("black", "red"))
MENTION_PROBABILITY = {"size": 0.5, "position": 0.6, "background": 0.6}  # colour and shape are always named
COLOUR_JITTER = 12  # each image's colours vary by up to this much per RGB channel
POSITION_JITTER = 0.03  # and its centre by up to this fraction of the side
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges
# Concepts the dataset never shows, for personalisation: drawn and read like the others, never in CaptionedShapes.
CONCEPT_SHAPES = ("ring",)
CONCEPT_COLOURS = {"teal": (20, 160, 160)}
ALL_COLOURS = {**COLOURS, **CONCEPT_COLOURS}
RING_HOLE = 0.5  # the hole's radius, as a fraction of the ring's


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``caption`` says it in the dataset's grammar, naming the optional parts asked for."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def caption(self, size: bool = True, position: bool = True, background: bool = True) -> str:
        words = [*([self.size] if size else []), self.colour, self.shape]
        words.insert(0, article(words[0]))
        if position:
            words.append(POSITIONS[self.position][0])
        if background:
            words.append(f"on {article(self.background)} {self.background} background")
        return " ".join(words)

    def random_caption(self, rng: np.random.Generator) -> str:
        """A caption naming each optional attribute with its :data:`MENTION_PROBABILITY`."""
        mention = {name: rng.random() < p for name, p in MENTION_PROBABILITY.items()}
        return self.caption(**mention)

    def named(self, size: bool = True, position: bool = True, background: bool = True) -> dict[str, str]:
        """The attributes ``caption`` with the same arguments names, as :func:`read_scene` reports them."""
        optional = {"size": size, "position": position, "background": background}
        return {"colour": self.colour, "shape": self.shape,
                **{name: getattr(self, name) for name, mentioned in optional.items() if mentioned}}


def random_scene(rng: np.random.Generator, exclude: tuple[tuple[str, str], ...] = HELD_OUT_PAIRS) -> Scene:
    """A uniformly drawn scene whose shape and background colours differ and are not an ``exclude`` pair."""
    colours = list(COLOURS)
    while True:
        colour, background = (colours[i] for i in rng.choice(len(colours), size=2, replace=False))
        if (colour, background) not in exclude:
            break
    return Scene(colour, SHAPES[rng.integers(len(SHAPES))], list(SIZES)[rng.integers(len(SIZES))],
                 list(POSITIONS)[rng.integers(len(POSITIONS))], background)


def shape_alpha(shape: str, centre: tuple[float, float], radius: float, resolution: int) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by ``shape`` (centre and half-width in pixels): drawn at 4x, box-filtered.
    Circles, squares and rings (a disc with a hole of RING_HOLE x ``radius``) are centred on ``centre``; the
    upward triangle fills the same box."""
    big = resolution * SUPERSAMPLE
    canvas = PIL.Image.new("L", (big, big), 0)
    cx, cy, r = centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE, radius * SUPERSAMPLE
    draw = PIL.ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - RING_HOLE * r, cy - RING_HOLE * r, cx + RING_HOLE * r, cy + RING_HOLE * r), fill=0)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    return np.asarray(canvas.resize((resolution, resolution), resample=PIL.Image.BOX), dtype=np.float32) / 255.0


def jittered(colour: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The RGB of a named colour (float32), varied by up to COLOUR_JITTER per channel when ``rng`` is given."""
    offset = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3) if rng is not None else 0
    return np.clip(np.array(ALL_COLOURS[colour]) + offset, 0, 255).astype(np.float32)


def paint(alpha: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Coverage ``alpha`` (H, W) in the ``foreground`` RGB over the ``background`` RGB as (H, W, 3) uint8."""
    return (background + alpha[..., None] * (foreground - background)).round().astype(np.uint8)


def render(scene: Scene, resolution: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a (resolution, resolution, 3) uint8 image; ``rng`` jitters colours and position (else none)."""
    background, foreground = jittered(scene.background, rng), jittered(scene.colour, rng)
    centre = np.array(POSITIONS[scene.position][1])
    if rng is not None:
        centre = centre + rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
    alpha = shape_alpha(scene.shape, tuple(centre * resolution), SIZES[scene.size] * resolution, resolution)
    return paint(alpha, foreground, background)


def concept_scenes(rng: np.random.Generator, count: int, shapes: tuple[str, ...], colours: tuple[str, ...],
                   backgrounds: tuple[str, ...], sizes: tuple[str, ...] = tuple(SIZES),
                   exclude: frozenset[tuple[str, str]] = frozenset()) -> list[Scene]:
    """``count`` scenes drawn uniformly from the given choices (any position; shape and background colours differ,
    and their pair is not in ``exclude``): the few training images of a concept, or the held-out scenes it is tested
    on (``exclude`` the training images' pairs)."""
    if not any(colour != background and (colour, background) not in exclude
               for colour in colours for background in backgrounds):
        raise ValueError(f"colours {colours} and backgrounds {backgrounds} leave no pair of different colours "
                         "outside the excluded ones")
    scenes = []
    while len(scenes) < count:
        colour, background = colours[rng.integers(len(colours))], backgrounds[rng.integers(len(backgrounds))]
        if colour != background and (colour, background) not in exclude:
            scenes.append(Scene(colour, shapes[rng.integers(len(shapes))], sizes[rng.integers(len(sizes))],
                                list(POSITIONS)[rng.integers(len(POSITIONS))], background))
    return scenes


def concept_caption(caption: str, words: dict[str, str]) -> str:
    """``caption`` with each concept's name replaced by the word that teaches it: with ``{"ring": "sks"}``,
    'a red ring on a blue background' -> 'a red sks on a blue background'."""
    for name, word in words.items():
        caption = re.sub(rf"\b{re.escape(name)}\b", word, caption)
    return caption


def held_out_concept_prompts(scenes: list[Scene], words: dict[str, str], seed: int = 1) -> list[tuple[str, dict]]:
    """(prompt, attributes it names) for each scene, the concept under its word: colour, shape and background
    always named, size and position each at random (as :func:`held_out_prompts`)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for scene in scenes:
        mention = {"size": rng.random() < 0.5, "position": rng.random() < 0.5, "background": True}
        prompts.append((concept_caption(scene.caption(**mention), words), scene.named(**mention)))
    return prompts


class CaptionedShapes:
    """``num_images`` seeded scenes (held-out pairs excluded) rendered at ``resolution``; ``dataset[i]`` is
    ``{"pixel_values": (3, H, W) in [-1, 1], "class_label": 0, "caption": str}`` like minidiff's other datasets,
    with the caption drawn once per image; :meth:`caption` draws a fresh one from any generator."""

    def __init__(self, num_images: int = 20000, resolution: int = 32, seed: int = 0):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        rng = np.random.default_rng(seed)
        self.scenes = [random_scene(rng) for _ in range(num_images)]
        self.images = np.stack([render(scene, resolution, rng) for scene in self.scenes])  # (N, H, W, 3) uint8
        self.captions = [scene.random_caption(rng) for scene in self.scenes]

    def __len__(self) -> int:
        return len(self.scenes)

    def pixel_values(self, indices) -> torch.Tensor:
        """Images ``indices`` as a (B, 3, H, W) float tensor in [-1, 1]."""
        pixels = torch.from_numpy(self.images[np.asarray(indices)]).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        return pixels.float() / 127.5 - 1.0

    def caption(self, index: int, rng: np.random.Generator) -> str:
        return self.scenes[index].random_caption(rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixel_values([index])[0], "class_label": 0, "caption": self.captions[index]}


# ---- prompts and pixels back to attributes ------------------------------------------------------------------------
_PROMPT = re.compile(
    r"^an? (?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes})"
    r"(?: (?P<position>{positions}))?(?: on an? (?P<background>{colours}) background)?$".format(
        sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES),
        positions="|".join(re.escape(phrase) for phrase, _ in POSITIONS.values()),
    )
)
_POSITION_OF_PHRASE = {phrase: name for name, (phrase, _) in POSITIONS.items()}


def parse_prompt(prompt: str) -> dict[str, str] | None:
    """The attributes a prompt in the dataset's grammar names (``{"colour": "red", "shape": "circle", ...}``), or
    None for a prompt outside it (the model still draws something for those, see the model card)."""
    match = _PROMPT.match(" ".join(prompt.lower().split()))
    if match is None:
        return None
    named = {k: v for k, v in match.groupdict().items() if v is not None}
    if "position" in named:
        named["position"] = _POSITION_OF_PHRASE[named["position"]]
    return named


def nearest_colour(pixels: np.ndarray, colours: dict[str, tuple[int, int, int]] = COLOURS) -> np.ndarray:
    """Index into ``colours`` of the nearest palette colour (RGB distance) of each pixel of (..., 3) uint8."""
    palette = np.array(list(colours.values()), dtype=np.float32)  # (K, 3)
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float32) - palette, axis=-1)  # (..., K)
    return distances.argmin(-1)


# shape -> (its half-width given its area, how far its centroid lies below its box centre, in half-widths)
# (a ring is fitted as the disc it makes with its hole filled)
SHAPE_FITS = {"circle": (lambda area: np.sqrt(area / np.pi), 0.0), "square": (lambda area: np.sqrt(area) / 2, 0.0),
              "triangle": (lambda area: np.sqrt(area / 2), 1 / 3), "ring": (lambda area: np.sqrt(area / np.pi), 0.0)}
# A shape is read as a ring when its mask encloses a hole of at least this fraction of the hole a drawn ring of the
# same outer size has (RING_HOLE ** 2 of its disc): generated rings' holes come out smaller and off-centre, which
# the template fit alone reads as a disc, while a disc, a square or a triangle encloses none.
RING_MIN_HOLE = 0.3


def enclosed(mask: np.ndarray) -> np.ndarray:
    """The pixels outside ``mask`` (H, W) bool that no 4-connected path outside it joins to the image border: the
    holes the shape encloses."""
    border = np.zeros_like(mask)
    border[[0, -1], :] = border[:, [0, -1]] = True
    return ~mask & ~reachable(border, ~mask)


def read_scene(image: np.ndarray | PIL.Image.Image, shapes: tuple[str, ...] = SHAPES,
               colours: dict[str, tuple[int, int, int]] = COLOURS) -> dict[str, Any]:
    """Measure a scene from pixels with colour statistics and the dataset's geometry alone (no model).
    ``shapes`` and ``colours`` are the candidates (default: the dataset's; add the concepts' to read those).

    1. Colours: each pixel is labelled with its nearest palette colour; the background is the commonest label on
       the 1-pixel border, the shape's colour the commonest other label.
    2. Coverage: each pixel's colour projected on the segment from the background's to the shape's (median) colour,
       ``alpha = <p - bg, fg - bg> / |fg - bg|^2`` clipped to [0, 1]; ``mask`` is ``alpha > 1/2``.
    3. Shape: for each candidate shape, the coverage of that shape with the measured area and centroid (a ring's:
       those of the coverage with its enclosed holes filled); the one nearest the measured coverage (L1) wins,
       except that a ring (when a candidate) is read exactly when the mask encloses a hole of at least
       :data:`RING_MIN_HOLE` of a drawn ring's. The winner's half-width gives the size (nearer of small/big, in log
       scale) and its box centre the position (nearest grid cell).
    Returns those attributes plus ``mask`` (H, W) bool, ``rgb`` (the shape's median colour), ``fit_errors``
    (each candidate's L1 error per pixel of area: the smaller, the better that shape explains the coverage) and
    ``hole`` (the enclosed hole's area over a drawn ring's of the same outer size: about 1 for a ring, 0 for the
    others).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)  # float images in [0, 1]
    side = pixels.shape[0]
    names = list(colours)
    labels = nearest_colour(pixels, colours)  # (H, W)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = np.bincount(border, minlength=len(names)).argmax()
    counts = np.bincount(labels.ravel(), minlength=len(names))
    counts[background] = 0
    colour = counts.argmax()
    scene: dict[str, Any] = {"background": names[background], "colour": names[colour]}
    rgb = pixels.astype(np.float32)
    if counts[colour] == 0:  # one flat colour: no shape
        scene["mask"], scene["rgb"] = np.zeros(labels.shape, dtype=bool), np.median(rgb.reshape(-1, 3), axis=0)
        return scene
    bg, fg = np.median(rgb[labels == background], axis=0), np.median(rgb[labels == colour], axis=0)
    alpha = np.clip((rgb - bg) @ (fg - bg) / max(float((fg - bg) @ (fg - bg)), 1e-6), 0, 1)  # (H, W)
    scene["mask"], scene["rgb"] = alpha > 0.5, fg
    area = alpha.sum()
    if area < 1:
        return scene
    hole = enclosed(scene["mask"])
    filled = np.maximum(alpha, hole)  # (H, W): the coverage with the holes filled
    scene["hole"] = float(hole.sum() / (RING_HOLE ** 2 * filled.sum()))
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    candidates = {}
    for shape in shapes:
        coverage = filled if shape == "ring" else alpha
        radius_of_area, drop = SHAPE_FITS[shape]
        radius = radius_of_area(coverage.sum())
        centroid = np.array([(coverage * xs).sum(), (coverage * ys).sum()]) / coverage.sum()
        centre = centroid - np.array([0.0, drop * radius])
        error = np.abs(shape_alpha(shape, tuple(centre), radius, side) - alpha).sum()
        candidates[shape] = (error, radius, centre)
    scene["fit_errors"] = {shape: float(error / area) for shape, (error, _, _) in candidates.items()}
    solid = [shape for shape in candidates if shape != "ring"]
    if "ring" in candidates and (scene["hole"] >= RING_MIN_HOLE or not solid):
        scene["shape"] = "ring"
    else:
        scene["shape"] = min(solid, key=lambda shape: candidates[shape][0])
    _, radius, centre = candidates[scene["shape"]]
    scene["size"] = min(SIZES, key=lambda name: abs(np.log(SIZES[name] * side / radius)))
    cells = {name: np.array(xy) * side for name, (_, xy) in POSITIONS.items()}
    scene["position"] = min(cells, key=lambda name: np.linalg.norm(cells[name] - centre))
    return scene


def matches(prompt: str, image: np.ndarray | PIL.Image.Image, shapes: tuple[str, ...] = SHAPES) -> dict[str, bool]:
    """For each attribute ``prompt`` names, whether :func:`read_scene` (among ``shapes``) finds it in ``image``."""
    named = parse_prompt(prompt)
    if named is None:
        raise ValueError(f"prompt {prompt!r} is not in the dataset's grammar, e.g. 'a small red circle in the top "
                         "left on a blue background'")
    seen = read_scene(image, shapes=shapes)
    return {name: seen.get(name) == value for name, value in named.items()}


def chance_of_match(prompt: str) -> float:
    """Probability that a scene drawn uniformly at random shows everything ``prompt`` names."""
    named = parse_prompt(prompt)
    if named is None:
        raise ValueError(f"prompt {prompt!r} is not in the dataset's grammar")
    choices = {"colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES), "position": len(POSITIONS),
               "background": len(COLOURS) - 1}
    return float(np.prod([1.0 / choices[name] for name in named]))


def held_out_prompts(count: int, seed: int = 1) -> list[str]:
    """``count`` prompts naming a held-out (colour, background) pair - combinations no training image shows -
    cycling through :data:`HELD_OUT_PAIRS`, with a random shape and a random choice of size and position."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        colour, background = HELD_OUT_PAIRS[i % len(HELD_OUT_PAIRS)]
        scene = Scene(colour, SHAPES[rng.integers(len(SHAPES))], list(SIZES)[rng.integers(len(SIZES))],
                      list(POSITIONS)[rng.integers(len(POSITIONS))], background)
        prompts.append(scene.caption(size=rng.random() < 0.5, position=rng.random() < 0.5, background=True))
    return prompts
