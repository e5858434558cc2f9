"""Condition images that need no model: Canny edges for an edge ControlNet, a mask's outline (the condition of the
built-in outline ControlNet), and the flood fill they share with the shape reader of the built-in model.

``canny`` follows Canny (1986), "A Computational Approach to Edge Detection", as OpenCV's ``cv2.Canny`` (which the
ControlNet tutorials call) does it: 3x3 Sobel gradients of the grayscale image, non-maximum suppression along the
gradient direction quantised to 0, 45, 90 or 135 degrees, then hysteresis: a pixel whose gradient magnitude exceeds
``high_threshold`` is an edge, and so is one above ``low_threshold`` joined to an edge through such pixels
(8-connected). As in OpenCV the magnitude is ``|gx| + |gy|`` unless ``l2_gradient`` and no blur is applied first
(blur the image yourself for noisy photos). OpenCV itself is not a dependency: the tests check properties
(tests/test_conditions.py); against opencv-python-headless 5.1, checked once by hand, ``canny(rgb, low, high,
l2)`` equals ``cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high, L2gradient=l2)`` in every pixel of 66
cases (shape images, smooth and noise images, three threshold settings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image

from minidiff.pipelines.images import open_image

LUMA = np.array([9798, 19235, 3735])  # ITU-R 601 luma of R, G, B in 15-bit fixed point, as cv2.COLOR_RGB2GRAY
TAN_22_5 = np.tan(np.pi / 8)  # below this |gy| / |gx| the gradient is horizontal: the edge runs vertically


def reachable(seeds: np.ndarray, allowed: np.ndarray, diagonal: bool = False) -> np.ndarray:
    """The pixels of ``allowed`` (H, W) bool joined to a pixel of ``seeds & allowed`` by a path through ``allowed``,
    4-connected (8-connected when ``diagonal``)."""
    reached = seeds & allowed
    while True:  # grow by one pixel per step until nothing changes
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        if diagonal:
            grown[1:, 1:] |= reached[:-1, :-1]
            grown[1:, :-1] |= reached[:-1, 1:]
            grown[:-1, 1:] |= reached[1:, :-1]
            grown[:-1, :-1] |= reached[1:, 1:]
        grown &= allowed
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def outline(mask: Any) -> np.ndarray:
    """The 1-pixel inner boundary of ``mask`` (H, W) (bool, or any array: nonzero is inside) as an outline condition
    image (H, W, 3) uint8, white on black: the mask's pixels with a 4-neighbour outside it or on the image border."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"outline takes a 2-D mask (H, W), got shape {mask.shape}")
    inside = np.pad(mask, 1)  # (H + 2, W + 2), outside the image counts as outside
    interior = inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]  # all 4 neighbours in
    edge = mask & ~interior  # (H, W)
    return np.repeat(edge[..., None] * np.uint8(255), 3, axis=-1)


def sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 3x3 Sobel derivatives (gx, gy) of ``gray`` (H, W), the border replicated."""
    padded = np.pad(gray.astype(np.float64), 1, mode="edge")  # (H + 2, W + 2)
    h, w = gray.shape
    window = lambda dy, dx: padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731  (the neighbour at dy, dx)
    gx = (window(-1, 1) + 2 * window(0, 1) + window(1, 1)) - (window(-1, -1) + 2 * window(0, -1) + window(1, -1))
    gy = (window(1, -1) + 2 * window(1, 0) + window(1, 1)) - (window(-1, -1) + 2 * window(-1, 0) + window(-1, 1))
    return gx, gy


def thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: ``magnitude`` where it is a maximum across the edge (along the gradient direction,
    quantised to 45 degrees), else 0. Ties as OpenCV: along x or y a pixel must beat the one before and match the
    one after; along a diagonal it must beat both."""
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    neighbour = lambda dy, dx: padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay < ax * TAN_22_5  # gradient along x: compare left and right
    vertical = ay * TAN_22_5 > ax  # gradient along y: compare up and down
    rising = gx * gy > 0  # the diagonal gradients: down-right (image y points down) or down-left
    before = np.select([horizontal, vertical, rising], [neighbour(0, -1), neighbour(-1, 0), neighbour(-1, -1)],
                       neighbour(-1, 1))
    after = np.select([horizontal, vertical, rising], [neighbour(0, 1), neighbour(1, 0), neighbour(1, 1)],
                      neighbour(1, -1))
    beats_after = np.where(horizontal | vertical, magnitude >= after, magnitude > after)
    return np.where((magnitude > before) & beats_after, magnitude, 0.0)


def canny(image: Any, low_threshold: float = 100, high_threshold: float = 200, l2_gradient: bool = False
          ) -> PIL.Image.Image:
    """The Canny edges of ``image`` (PIL image, path, or (H, W) / (H, W, 3) uint8 array) as an RGB PIL image, edges
    white on black: the condition image an edge ControlNet takes. Thresholds are on the Sobel magnitude of the 0-255
    grayscale image, as ``cv2.Canny(image, low_threshold, high_threshold)``."""
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"canny needs 0 <= low_threshold <= high_threshold; got low_threshold={low_threshold}, "
                         f"high_threshold={high_threshold}")
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = open_image(image)
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image if image.mode == "L" else image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"canny takes a PIL image, a path or a uint8 array of shape (H, W) or (H, W, 3); got "
                         f"{array.dtype} of shape {array.shape}")
    gray = array if array.ndim == 2 else (array.astype(np.int64) @ LUMA + 2 ** 14) >> 15  # (H, W)
    gx, gy = sobel(gray)  # (H, W) each
    magnitude = np.hypot(gx, gy) if l2_gradient else np.abs(gx) + np.abs(gy)
    peaks = thin(magnitude, gx, gy)
    edges = reachable(peaks > high_threshold, peaks > low_threshold, diagonal=True)  # hysteresis
    return PIL.Image.fromarray(np.repeat(edges[..., None], 3, axis=2).astype(np.uint8) * 255)
