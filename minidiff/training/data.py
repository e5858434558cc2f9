"""Training data: an image folder or the built-in synthetic shapes, and the seeded order in which batches visit them.

Every example is a dict ``{"pixel_values": (C, H, W) float in [-1, 1], "class_label": int, "caption": str}``.

Determinism without hidden state: the global batch of optimizer step ``s`` is a slice of a permutation seeded by
(seed, epoch), and each sample of it draws its randomness (flip, timestep, noise, ...) from its own generator seeded
by (seed, step, position in the global batch). So a run resumed at any step, or split over any number of processes,
sees the same images with the same noise.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def seed_from(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(values)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def sample_generators(seed: int, step: int, positions: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, step, position in the global batch)."""
    return [torch.Generator().manual_seed(seed_from(seed, step, p)) for p in positions]


def global_batch_indices(num_examples: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step ``step``: consecutive slices of a fresh permutation each epoch (seeded by
    (seed, epoch)); the tail of an epoch that does not fill a batch is skipped."""
    if global_batch_size > num_examples:
        raise ValueError(f"the global batch ({global_batch_size} = train_batch_size x gradient_accumulation_steps x "
                         f"processes) is larger than the dataset ({num_examples} images)")
    batches_per_epoch = num_examples // global_batch_size
    epoch, position = divmod(step, batches_per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed_from(seed, epoch)))
    return order[position * global_batch_size:(position + 1) * global_batch_size].tolist()


def micro_batch_positions(micro_batch_size: int, accumulation_steps: int, rank: int, micro_step: int) -> range:
    """Positions in the global batch of one process's micro-batch: process ``rank`` owns the contiguous block
    ``[rank * A * b, (rank + 1) * A * b)`` and takes its ``micro_step``-th slice of ``b``."""
    start = (rank * accumulation_steps + micro_step) * micro_batch_size
    return range(start, start + micro_batch_size)


def load_batch(dataset, indices: Sequence[int], generators: list[torch.Generator], random_flip: bool) -> dict:
    """Stack examples into ``pixel_values`` (B, C, H, W), ``class_labels`` (B,) and ``captions``; a horizontal flip
    with probability 1/2 per image (each decided by that sample's generator, drawn first). Examples paired with a
    class example (:class:`PriorPreservationDataset`) give ``class_batch``, the same for those (flips drawn next)."""
    examples = [dataset[i] for i in indices]
    batch = _stack(examples, generators, random_flip)
    if "class_example" in examples[0]:
        batch["class_batch"] = _stack([e["class_example"] for e in examples], generators, random_flip)
    return batch


def _stack(examples: list[dict], generators: list[torch.Generator], random_flip: bool) -> dict:
    """The examples' tensors stacked (a condition image, ``conditioning_pixel_values``, flipped with its image)."""
    keys = [key for key in ("pixel_values", "conditioning_pixel_values") if key in examples[0]]
    stacked = {key: [] for key in keys}
    for example, generator in zip(examples, generators):
        flip = random_flip and torch.rand(1, generator=generator).item() < 0.5
        for key in keys:
            stacked[key].append(example[key].flip(-1) if flip else example[key])
    return {**{key: torch.stack(images) for key, images in stacked.items()},
            "class_labels": torch.tensor([e["class_label"] for e in examples]),
            "captions": [e["caption"] for e in examples]}


# ---- image files ------------------------------------------------------------------------------------------------
def fit_image(image: PIL.Image.Image, resolution: int, channels: int,
              resample: int = PIL.Image.BICUBIC) -> PIL.Image.Image:
    """Any PIL image -> a ``resolution``-square RGB (or L) image: transparent pixels composited on white, the
    shorter side resized to ``resolution`` (``resample``), then centre-cropped."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB" if channels == 3 else "L")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=resample)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_model_image(image: PIL.Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """Any PIL image -> (channels, resolution, resolution) in [-1, 1] (:func:`fit_image`, bicubic)."""
    array = np.asarray(fit_image(image, resolution, channels), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.reshape(resolution, resolution, channels)).permute(2, 0, 1).contiguous()


def to_condition_image(image: PIL.Image.Image, resolution: int) -> torch.Tensor:
    """A ControlNet's condition image -> (3, resolution, resolution) in [0, 1], not normalised (train_controlnet.py:
    bilinear resize, centre crop, ToTensor)."""
    array = np.asarray(fit_image(image, resolution, 3, PIL.Image.BILINEAR), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolderDataset:
    """Every image under ``root`` (recursively, sorted). Images of any size and mode are accepted and made uniform
    by :func:`to_model_image`; a file PIL cannot read is an error naming it.

    ``with_labels``: the class is the first-level subfolder (``root/<class>/.../img.png``), classes sorted by name.
    ``with_captions``: from ``root/metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``, the Hugging Face
    imagefolder convention) or else a ``.txt`` file beside each image with the same stem, or else
    ``default_caption`` (DreamBooth's instance prompt).
    ``with_conditioning`` (ControlNet training): each metadata.jsonl line also names the image's condition image,
    ``"conditioning_image": "conditions/0.png"`` (train_controlnet.py's column), a path under ``root``; those files
    are not training images themselves, and each example adds ``conditioning_pixel_values`` (3, H, W) in [0, 1].
    An image smaller than ``resolution`` on its shorter side is an error unless ``upscale_small`` (then it is
    resized up like any other): upscaling a 64px photo to 512 is rarely what one wants to train on.
    """

    def __init__(self, root: str, resolution: int, channels: int = 3, with_labels: bool = False,
                 with_captions: bool = False, default_caption: str | None = None, upscale_small: bool = True,
                 with_conditioning: bool = False):
        if not os.path.exists(root):
            raise FileNotFoundError(f"train_data_dir {root} does not exist")
        if not os.path.isdir(root):
            raise ValueError(f"train_data_dir {root} is a file; pass a folder of images")
        self.root, self.resolution, self.channels = root, resolution, channels
        self.files = sorted(
            os.path.relpath(os.path.join(folder, name), root)
            for folder, _, names in os.walk(root) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        self.metadata = self._read_metadata() if with_captions or with_conditioning else {}
        self.conditioning = self._find_conditioning() if with_conditioning else {}
        conditions = set(self.conditioning.values())
        self.files = [f for f in self.files if f not in conditions]
        if not self.files:
            raise ValueError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)")
        for relative in self.files + sorted(conditions):  # each decoded once: a corrupt file is named before a run
            with self._decoded(relative) as image:        # writes anything
                if not upscale_small and min(image.size) < resolution:
                    raise ValueError(f"image {os.path.join(root, relative)} is {image.width}x{image.height}, smaller "
                                     f"than the training resolution {resolution}: use larger images, a smaller "
                                     "--resolution, or --upscale-small-images to resize it up")
        self.classes = self._find_classes() if with_labels else []
        self.captions = self._find_captions(default_caption) if with_captions else {}

    def _decoded(self, relative: str) -> PIL.Image.Image:
        """The image file, its pixels read (a truncated or corrupt file is a ValueError naming it)."""
        path = os.path.join(self.root, relative)
        try:
            image = PIL.Image.open(path)
            image.load()
            return image
        except (OSError, PIL.UnidentifiedImageError) as error:  # UnidentifiedImageError: not an image at all
            raise ValueError(f"cannot read image file {path} ({error}): remove it from the folder or replace it "
                             "with a readable PNG/JPEG") from None

    def _find_classes(self) -> list[str]:
        loose = [f for f in self.files if os.sep not in f]
        if loose:
            raise ValueError(f"class-conditional training needs one subfolder per class in {self.root}, but "
                             f"{len(loose)} image(s) lie directly in it, e.g. {loose[0]}")
        return sorted({f.split(os.sep)[0] for f in self.files})

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.root, "metadata.jsonl")

    def _read_metadata(self) -> dict[str, dict]:
        """metadata.jsonl's lines by their (normalised) file_name; {} without the file."""
        entries = {}
        if os.path.isfile(self.metadata_path):
            with open(self.metadata_path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        try:
                            entry = json.loads(line)
                            entries[os.path.normpath(entry["file_name"])] = {**entry, "text": str(entry["text"])}
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise ValueError(f"{self.metadata_path} line {number} is not a JSON object with "
                                             "'file_name' and 'text'") from None
        return entries

    def _find_captions(self, default_caption: str | None) -> dict[str, str]:
        captions = {relative: entry["text"] for relative, entry in self.metadata.items()}
        for relative in self.files:
            sidecar = os.path.join(self.root, os.path.splitext(relative)[0] + ".txt")
            if relative not in captions and os.path.isfile(sidecar):
                with open(sidecar, encoding="utf-8") as handle:
                    captions[relative] = handle.read().strip()
        missing = [f for f in self.files if f not in captions]
        if default_caption is not None:
            captions.update(dict.fromkeys(missing, default_caption))
        elif missing:
            raise ValueError(f"{len(missing)} image(s) in {self.root} have no caption (e.g. {missing[0]}); add them "
                             "to metadata.jsonl, write a .txt file beside each image, or give one caption for all "
                             "with --prompt (instance_prompt)")
        return captions

    def _find_conditioning(self) -> dict[str, str]:
        """image -> its condition image (paths relative to ``root``), from metadata.jsonl's conditioning_image."""
        example = '{"file_name": "0.png", "text": "a caption", "conditioning_image": "conditions/0.png"}'
        if not self.metadata:
            missing = not os.path.isfile(self.metadata_path)
            state = "does not exist" if missing else "is empty"
            raise (FileNotFoundError if missing else ValueError)(f"ControlNet training pairs each image with a condition image, read from "
                             f"{self.metadata_path}, which {state}; write one line per image such as {example}")
        pairs = {}
        for relative, entry in self.metadata.items():
            if "conditioning_image" in entry:
                condition = os.path.normpath(str(entry["conditioning_image"]))
                if not os.path.isfile(os.path.join(self.root, condition)):
                    raise FileNotFoundError(f"{self.metadata_path}: the conditioning_image {condition} of {relative} "
                                            f"is not a file in {self.root}")
                pairs[relative] = condition
        conditions = set(pairs.values())
        unpaired = [f for f in self.files if f not in pairs and f not in conditions]
        if unpaired:
            raise ValueError(f"{len(unpaired)} image(s) in {self.root} have no conditioning_image in metadata.jsonl "
                             f"(e.g. {unpaired[0]}); ControlNet training needs one per image, as in {example}, or "
                             "move the image out of the folder")
        return pairs

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        relative = self.files[index]
        with self._decoded(relative) as image:
            pixels = to_model_image(image, self.resolution, self.channels)
        label = self.classes.index(relative.split(os.sep)[0]) if self.classes else 0
        example = {"pixel_values": pixels, "class_label": label, "caption": self.captions.get(relative, "")}
        if self.conditioning:
            with self._decoded(self.conditioning[relative]) as condition:
                example["conditioning_pixel_values"] = to_condition_image(condition, self.resolution)
        return example


class PriorPreservationDataset:
    """DreamBooth's pairing (``train_dreambooth.py``): example ``i`` is instance image ``i mod n`` carrying class
    image ``i mod m`` as ``class_example``; ``max(n, m)`` examples, so every image of the larger set is seen per
    epoch."""

    def __init__(self, instances, classes):
        self.instances, self.classes = instances, classes

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.instances[index % len(self.instances)],
                "class_example": self.classes[index % len(self.classes)]}


# ---- the built-in synthetic dataset -----------------------------------------------------------------------------
SHAPES = (("disc", (230, 40, 40), "red"), ("square", (40, 210, 60), "green"), ("triangle", (50, 90, 240), "blue"))


class SyntheticShapes:
    """The built-in dataset: one coloured shape on a dark background per image. Class k is ``SHAPES[k]``: a red
    disc, a green square or a blue triangle, at a random position and size; the caption says which
    ("a red disc"). Drawn at 4x and downsampled (anti-aliased); the same ``seed`` gives the same images."""

    num_classes = len(SHAPES)

    def __init__(self, num_images: int = 1024, resolution: int = 32, channels: int = 3, seed: int = 0):
        if channels not in (1, 3):
            raise ValueError(f"SyntheticShapes draws 1- or 3-channel images, not {channels}")
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, len(SHAPES), num_images).tolist()
        images = [self._draw(rng, label, resolution, channels) for label in self.labels]
        self.images = torch.stack(images)  # (N, C, H, W) in [-1, 1]

    @staticmethod
    def _draw(rng: np.random.Generator, label: int, resolution: int, channels: int) -> torch.Tensor:
        big = resolution * 4
        canvas = PIL.Image.new("RGB", (big, big), tuple(int(v) for v in rng.integers(10, 50, 3)))
        radius = big * rng.uniform(0.18, 0.32)
        cx, cy = rng.uniform(radius, big - radius, 2)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw, colour = PIL.ImageDraw.Draw(canvas), SHAPES[label][1]
        if SHAPES[label][0] == "disc":
            draw.ellipse(box, fill=colour)
        elif SHAPES[label][0] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
        return to_model_image(canvas, resolution, channels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = self.labels[index]
        shape, _, colour = SHAPES[label]
        return {"pixel_values": self.images[index], "class_label": label, "caption": f"a {colour} {shape}"}
