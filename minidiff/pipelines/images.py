"""Images in and out of the pipelines: PIL / numpy / torch <-> the VAE's (B, 3, H, W) tensors in [-1, 1].

The conversions follow diffusers' VaeImageProcessor for the inputs users pass: PIL images are resized with Lanczos to
a multiple of the VAE's scale factor (floor), float arrays and tensors are taken as values in [0, 1] (float inputs
whose minimum is below 0 as values in [-1, 1], used as they are), masks are made grayscale and binarized at 0.5.

Where diffusers reads a value wrongly, minidiff converts by dtype or PIL mode instead, and refuses what it cannot
read (each rule names the argument, the dtype or mode, and what is accepted):
- a path (str / PathLike) is opened with PIL;
- uint8 arrays/tensors are divided by 255, uint16 by 65535, bool arrays are 0 / 1;
- float arrays/tensors must lie in [-1, 1] (no silent clamping: a float image in 0..255 is refused);
- 16-bit PIL images (modes I;16*, and I holding 16-bit values) are divided by 65535; F-mode images are kept as floats
  and must lie in [0, 1]; the other PIL modes (RGBA, LA, P, CMYK, 1, ...) go through PIL's ``convert``;
- numpy images are (H, W), (H, W, C) or (B, H, W, C); tensors (H, W), (C, H, W) or (B, C, H, W), with C = 1 or 3;
- NaN / Inf pixels are refused.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # integer PIL modes read as 16-bit values
UINT16_MAX = 65535.0


def open_image(path: str | os.PathLike, label: str | None = None) -> PIL.Image.Image:
    """A fully read PIL image from a file path, or FileNotFoundError / ValueError starting with ``label`` (how the
    caller names the path: ``image='in.png'`` by default, ``--image in.png`` in the CLI) and saying what is wrong."""
    path = os.fspath(path)
    label = label or f"image={path!r}"
    if os.path.isdir(path):
        raise ValueError(f"{label} is a folder; pass an image file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label}: no such file")
    try:
        image = PIL.Image.open(path)
        image.load()
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{label} is not an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, PIL.Image.DecompressionBombError) as error:  # unreadable (permissions), truncated, huge
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(f"{label} cannot be read: {reason.lower()}") from None
    return image


def as_image_list(image: Any, name: str = "image") -> list:
    """The images of ``image`` (one image, a list/tuple of them, or paths) as a non-empty list; paths are opened."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError(f"{name} is an empty list; pass at least one image")
    is_path = (str, os.PathLike)
    images = [open_image(im, f"{name}={os.fspath(im)!r}") if isinstance(im, is_path) else im for im in images]
    accepted = (PIL.Image.Image, np.ndarray, torch.Tensor)
    for im in images:
        if not isinstance(im, accepted):
            raise TypeError(f"{name} must be a PIL image, numpy array, torch tensor or file path (or a list of "
                            f"them), got {type(im).__name__}")
    kinds = {next(k.__name__ for k in accepted if isinstance(im, k)) for im in images}
    if len(kinds) > 1:
        raise TypeError(f"{name} mixes {sorted(kinds)}; pass one kind of image per call")
    return images


def _hw(image: Any, name: str) -> tuple[int, int]:
    """(height, width) of one PIL image, numpy array ((H, W), (H, W, C), (B, H, W, C)) or tensor (..., H, W)."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        _check_tensor_layout(image, name)
        return tuple(image.shape[-2:])
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"{name} array has shape {image.shape}; expected (H, W), (H, W, C) or (B, H, W, C)")
    return tuple(image.shape[:2]) if image.ndim in (2, 3) else tuple(image.shape[1:3])


def default_size(image: Any, height: int | None, width: int | None, scale: int, name: str = "image"):
    """(height, width) of ``image`` unless given, floored to a multiple of ``scale``."""
    h, w = _hw(as_image_list(image, name)[0], name)
    height = h if height is None else height
    width = w if width is None else width
    return height - height % scale, width - width % scale


def _check_tensor_layout(tensor: torch.Tensor, name: str) -> None:
    if tensor.ndim not in (2, 3, 4):
        raise ValueError(f"{name} tensor has shape {tuple(tensor.shape)}; expected (H, W), (C, H, W) or (B, C, H, W)")
    if tensor.ndim >= 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[-3] not in (1, 3, 4):
        raise ValueError(f"{name} tensor has shape {tuple(tensor.shape)}, which looks channel-last (H, W, C); "
                         "tensors are channel-first: pass tensor.permute(2, 0, 1) (or (0, 3, 1, 2) for a batch)")


def _pil_to_array(image: PIL.Image.Image, mode: str, height: int, width: int, name: str) -> np.ndarray:
    """One PIL image, resized (Lanczos), as float32 (H, W, C) in [0, 1]; C = 3 for mode "RGB", 1 for "L"."""
    if image.mode in HIGH_BIT_MODES or image.mode == "F":
        floats, scale = image.convert("F"), (1.0 if image.mode == "F" else UINT16_MAX)
        _check_range(np.array(floats, dtype=np.float32) / scale, 0.0, f"{name} (PIL mode {image.mode})")
        values = np.array(floats.resize((width, height), resample=PIL.Image.LANCZOS), dtype=np.float32) / scale
        values = np.clip(values, 0.0, 1.0)[..., None]  # Lanczos overshoots a little at edges
        return np.repeat(values, 3, axis=-1) if mode == "RGB" else values
    pixels = np.array(image.convert(mode).resize((width, height), resample=PIL.Image.LANCZOS))
    pixels = pixels.astype(np.float32) / 255.0
    return pixels if pixels.ndim == 3 else pixels[..., None]  # (H, W, C)


def _check_range(values, low: float, what: str) -> None:
    """Refuse NaN/Inf and values outside [low, 1] (no silent clamping)."""
    values = torch.as_tensor(values)
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} has {int((~torch.isfinite(values)).sum())} NaN/Inf values")
    lo, hi = float(values.min()), float(values.max())
    if lo < low or hi > 1.0:
        raise ValueError(f"{what} has values in [{lo:g}, {hi:g}]; float images must lie in [0, 1] (or [-1, 1]); "
                         "pass uint8 arrays for 0..255 data or divide by 255")


def _to_unit_float(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """A numeric tensor converted by dtype: uint8 /255, uint16 /65535, bool 0/1, float kept (range-checked)."""
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if tensor.dtype == torch.uint16:
        return tensor.float() / UINT16_MAX
    if tensor.dtype == torch.bool:
        return tensor.float()
    if not tensor.is_floating_point():
        raise TypeError(f"{what} has dtype {tensor.dtype}; accepted: uint8 (0..255), uint16 (0..65535), bool, "
                        "or floats in [0, 1] / [-1, 1]")
    _check_range(tensor, -1.0, what)
    return tensor.float()


def to_float_batch(images: list, height: int, width: int, mode: str, name: str) -> torch.Tensor:
    """Stack PIL images / numpy arrays / tensors into a float (B, C, H, W) tensor in [0, 1] (or [-1, 1])."""
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        batch = np.stack([_pil_to_array(im, mode, height, width, name) for im in images])  # (B, H, W, C)
        return torch.from_numpy(batch).permute(0, 3, 1, 2)
    if isinstance(first, np.ndarray):
        arrays = [a[..., None] if a.ndim == 2 else a for a in images]  # (H, W) -> (H, W, 1)
        batch = np.concatenate(arrays) if arrays[0].ndim == 4 else np.stack(arrays)  # (B, H, W, C)
        if batch.shape[-1] not in (1, 3):
            raise ValueError(f"{name} array has shape {first.shape}: the last axis must be 1 or 3 channels "
                             "((H, W, C) layout)")
        tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (B, C, H, W)
    else:
        tensors = [t[None] if t.ndim == 2 else t for t in images]  # (H, W) -> (1, H, W)
        tensor = torch.cat(tensors) if tensors[0].ndim == 4 else torch.stack(tensors)  # (B, C, H, W)
    tensor = _to_unit_float(tensor, f"{name} ({type(first).__name__} of dtype {first.dtype})")
    if tensor.shape[-2:] != (height, width):
        tensor = F.interpolate(tensor, size=(height, width))
    return tensor


def preprocess_image(image: Any, height: int | None = None, width: int | None = None, scale: int = 8,
                     name: str = "image") -> torch.Tensor:
    """A batch of RGB images as a float (B, 3, H, W) tensor in [-1, 1], H and W multiples of ``scale``."""
    images = as_image_list(image, name)
    height, width = default_size(images, height, width, scale, name)
    if height < scale or width < scale:
        raise ValueError(f"{name} of size {height}x{width} is smaller than one latent pixel ({scale}x{scale})")
    tensor = to_float_batch(images, height, width, "RGB", name)
    if tensor.shape[1] != 3:
        raise ValueError(f"{name}: expected RGB images with 3 channels, got {tensor.shape[1]} channels")
    if tensor.min() < 0:  # already in [-1, 1] (diffusers warns and keeps such inputs as they are)
        return tensor
    return tensor * 2.0 - 1.0


def preprocess_mask(mask: Any, height: int, width: int, name: str = "mask_image") -> torch.Tensor:
    """Masks as a (B, 1, H, W) float tensor of 0s and 1s (1 = repaint), binarized at 0.5."""
    tensor = to_float_batch(as_image_list(mask, name), height, width, "L", name)
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
