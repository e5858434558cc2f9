"""Images in and out of the pipelines: PIL / numpy / torch <-> the VAE's (B, 3, H, W) tensors in [-1, 1].

The conversions follow diffusers' VaeImageProcessor for the inputs users pass: PIL images are resized with Lanczos to
a multiple of the VAE's scale factor (floor), numpy arrays and tensors are taken as values in [0, 1]
(tensors already in [-1, 1] are used as they are), masks are made grayscale and binarized at 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def _as_list(image: Any) -> list:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def default_size(image: Any, height: int | None, width: int | None, scale: int) -> tuple[int, int]:
    """(height, width) of ``image`` unless given, floored to a multiple of ``scale``."""
    first = _as_list(image)[0]
    if isinstance(first, PIL.Image.Image):
        h, w = first.height, first.width
    elif isinstance(first, torch.Tensor):
        h, w = first.shape[-2:]
    else:  # numpy (H, W, C) or (B, H, W, C)
        h, w = first.shape[-3], first.shape[-2]
    height = h if height is None else height
    width = w if width is None else width
    return height - height % scale, width - width % scale


def _to_float_batch(images: list, height: int, width: int, mode: str) -> torch.Tensor:
    """Stack PIL images / (H, W, C) arrays / (C, H, W) tensors into a float (B, C, H, W) tensor in [0, 1]."""
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        arrays = [np.array(im.convert(mode).resize((width, height), resample=PIL.Image.LANCZOS)) for im in images]
        batch = np.stack(arrays).astype(np.float32) / 255.0  # (B, H, W[, C])
        tensor = torch.from_numpy(batch if batch.ndim == 4 else batch[..., None]).permute(0, 3, 1, 2)
        return tensor
    if isinstance(first, np.ndarray):
        batch = np.concatenate(images) if first.ndim == 4 else np.stack(images)
        if batch.ndim == 3:  # (B, H, W) grayscale
            batch = batch[..., None]
        tensor = torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    elif isinstance(first, torch.Tensor):
        tensor = torch.cat(images) if first.ndim == 4 else torch.stack(images)
        if tensor.ndim == 3:  # (B, H, W) grayscale
            tensor = tensor[:, None]
    else:
        raise TypeError(f"images must be PIL images, numpy arrays or torch tensors, got {type(first).__name__}")
    if tensor.shape[-2:] != (height, width):
        tensor = F.interpolate(tensor.float(), size=(height, width))
    return tensor


def preprocess_image(image: Any, height: int | None = None, width: int | None = None, scale: int = 8) -> torch.Tensor:
    """A batch of RGB images as a float (B, 3, H, W) tensor in [-1, 1], H and W multiples of ``scale``."""
    height, width = default_size(image, height, width, scale)
    if height < scale or width < scale:
        raise ValueError(f"image of size {height}x{width} is smaller than one latent pixel ({scale}x{scale})")
    tensor = _to_float_batch(_as_list(image), height, width, "RGB")
    if tensor.shape[1] != 3:
        raise ValueError(f"expected RGB images with 3 channels, got {tensor.shape[1]} channels")
    if tensor.min() < 0:  # already in [-1, 1] (diffusers warns and keeps such tensors as they are)
        return tensor
    return tensor * 2.0 - 1.0


def preprocess_mask(mask: Any, height: int, width: int) -> torch.Tensor:
    """Masks as a (B, 1, H, W) float tensor of 0s and 1s (1 = repaint), binarized at 0.5."""
    tensor = _to_float_batch(_as_list(mask), height, width, "L")
    if tensor.shape[1] != 1:
        tensor = tensor.mean(dim=1, keepdim=True)
    return (tensor >= 0.5).to(torch.float32)


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> PIL images (x * 255 rounded, as diffusers)."""
    if images.ndim == 3:
        images = images[None]
    pixels = (images * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def postprocess(image: torch.Tensor, output_type: str = "pil"):
    """Decoded (B, 3, H, W) in [-1, 1] -> ``pt`` tensor / ``np`` (B, H, W, 3) array / ``pil`` list, all in [0, 1]."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, 3, H, W) -> (B, H, W, 3)
    return array if output_type == "np" else numpy_to_pil(array)
