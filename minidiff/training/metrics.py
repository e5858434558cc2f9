"""Simple statistics that say whether samples look like the training data (used by tests and the example run).

- ``nearest_neighbour_rms``: for each sample, the root-mean-square pixel distance to the closest training image.
  Data-like samples sit near some training image; noise and blurry averages do not. Compare against a baseline
  (samples of the untrained model, or held-out real images for the attainable level).
- ``dominant_colour``: which of red/green/blue dominates the bright pixels of each image; on the synthetic shapes
  this is the class (red disc, green square, blue triangle), so it measures class conditioning.
"""

from __future__ import annotations

import torch


def as_float_images(images) -> torch.Tensor:
    """(N, H, W, C) uint8 or (N, C, H, W) float in [-1, 1] -> (N, C, H, W) float32 in [-1, 1]."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images.float()


def nearest_neighbour_rms(samples, reference) -> torch.Tensor:
    """(N,) RMS distance (in [-1, 1] units) from each sample to its nearest image in ``reference``."""
    a = as_float_images(samples).flatten(1)  # (N, D)
    b = as_float_images(reference).flatten(1)  # (M, D)
    return torch.cdist(a, b).min(dim=1).values / a.shape[1] ** 0.5  # (N, M) -> (N,)


def dominant_colour(images, threshold: float = 0.0) -> torch.Tensor:
    """(N,) index of the channel (0 red, 1 green, 2 blue) with the largest mean over pixels brighter than
    ``threshold`` in any channel (the shape; the synthetic background is dark)."""
    pixels = as_float_images(images)  # (N, 3, H, W)
    bright = (pixels.amax(dim=1, keepdim=True) > threshold).float()  # (N, 1, H, W)
    means = (pixels * bright).sum(dim=(2, 3)) / bright.sum(dim=(2, 3)).clamp(min=1)  # (N, 3)
    return means.argmax(dim=1)
