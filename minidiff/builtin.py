"""The built-in text-to-image model shipped inside the package (used when no --model is given).

``minidiff/weights/tiny-shapes`` is a Stable Diffusion folder in diffusers' layout - AutoencoderKL, CLIPTextModel
with the real CLIP tokenizer, UNet2DConditionModel, DDIMScheduler - small enough to ship (float16 safetensors,
loaded as float32) and trained with minidiff on the procedural shapes of :mod:`minidiff.training.shapes` by
``scripts/builtin`` (see the folder's README.md, its model card). It draws 32x32 images of one shape on a plain
background: ``load_builtin_pipeline()("a small yellow square in the top left").images[0]``.
"""

from __future__ import annotations

import os

BUILTIN_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny-shapes")


def builtin_model_folder() -> str:
    """The diffusers-layout folder of the built-in model, or a FileNotFoundError saying what to pass instead."""
    if not os.path.isfile(os.path.join(BUILTIN_FOLDER, "model_index.json")):
        raise FileNotFoundError(
            f"no built-in model is installed at {BUILTIN_FOLDER}; pass --model with a diffusers folder "
            "or a single-file .safetensors checkpoint"
        )
    return BUILTIN_FOLDER


def load_builtin_pipeline(pipeline_class: type | None = None):
    """The built-in model as ``pipeline_class`` (default StableDiffusionPipeline; also the img2img, inpaint and
    DDIM inversion pipelines), float32 on the CPU."""
    from minidiff.pipelines import StableDiffusionPipeline

    return (pipeline_class or StableDiffusionPipeline).from_pretrained(builtin_model_folder())


def vocabulary() -> dict[str, list[str]]:
    """What the built-in model was taught: its prompts are ``a [size] <colour> <shape> [position]
    [on a <colour> background]``. Other words still generate an image, just not a controlled one."""
    from minidiff.training.shapes import COLOURS, POSITIONS, SHAPES, SIZES

    return {"colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES),
            "positions": [phrase for phrase, _ in POSITIONS.values()]}
