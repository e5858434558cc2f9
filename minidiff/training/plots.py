"""PNG pictures of a run, drawn with PIL alone: the loss curve and a grid of samples."""

from __future__ import annotations

import math
import os

import numpy as np
import PIL.Image
import PIL.ImageDraw


def save_png(image: PIL.Image.Image, path: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a PNG."""
    tmp = path + ".tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average (as TensorBoard's smoothing slider), bias-corrected at the start."""
    out, running = np.empty_like(values), 0.0
    for i, value in enumerate(values):
        running = weight * running + (1 - weight) * value
        out[i] = running / (1 - weight ** (i + 1))
    return out


def loss_curve(losses: list[float], width: int = 640, height: int = 360) -> PIL.Image.Image:
    """Per-step losses (light) and their smoothed trend (dark) on a log scale, steps on the x axis."""
    image = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 16, height - 32
    draw.rectangle((left, top, right, bottom), outline="black")
    values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
    if len(values) == 0:
        return image
    low, high = float(values.min()), float(values.max())
    span = max(high - low, 1e-6)

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(len(values) - 1, 1))
        return x, bottom - (bottom - top) * (value - low) / span

    for series, colour in ((values, (190, 200, 230)), (smooth(values, 0.9), (20, 50, 160))):
        draw.line([point(i, v) for i, v in enumerate(series)], fill=colour, width=2 if colour[0] < 100 else 1)
    draw.text((4, top), f"{10 ** high:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{10 ** low:.3g}", fill="black")
    draw.text((left, bottom + 8), "step 1", fill="black")
    draw.text((right - 80, bottom + 8), f"step {len(values)}", fill="black")
    draw.text((left + 8, top + 4), "training loss (log scale)", fill="black")
    return image


def image_grid(images: np.ndarray, min_tile: int = 64) -> PIL.Image.Image:
    """(N, H, W, C) uint8 images in a near-square grid, tiles enlarged (nearest) to at least ``min_tile`` pixels."""
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = max(1, math.ceil(min_tile / max(height, width)))
    grid = PIL.Image.new("RGB", (columns * width * scale, rows * height * scale), "white")
    for index, array in enumerate(images):
        tile = PIL.Image.fromarray(array[..., 0] if channels == 1 else array).convert("RGB")
        tile = tile.resize((width * scale, height * scale), resample=PIL.Image.NEAREST)
        grid.paste(tile, ((index % columns) * width * scale, (index // columns) * height * scale))
    return grid
