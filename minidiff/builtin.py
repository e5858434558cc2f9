"""The built-in text-to-image model shipped inside the package (used when no --model is given).

``minidiff/weights/tiny-shapes`` is a Stable Diffusion folder in diffusers' layout - AutoencoderKL, CLIPTextModel
with the real CLIP tokenizer, UNet2DConditionModel, DDIMScheduler - small enough to ship (float16 safetensors,
loaded as float32) and trained with minidiff on the procedural shapes of :mod:`minidiff.training.shapes` by
``scripts/builtin`` (see the folder's README.md, its model card). It draws 32x32 images of one shape on a plain
background: ``load_builtin_pipeline()("a small yellow square in the top left").images[0]``.

``minidiff/weights/tiny-shapes-outline`` beside it is a ControlNetModel for it, trained with minidiff on shape
outlines by ``scripts/controlnet`` (its README.md is the model card): given a white-on-black outline, the shape is
drawn inside it, in the prompt's colours: ``load_builtin_pipeline(StableDiffusionControlNetPipeline)("a red
circle on a blue background", image=outline).images[0]``.
"""

from __future__ import annotations

import os

BUILTIN_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny-shapes")
BUILTIN_CONTROLNET_FOLDER = os.path.join(os.path.dirname(BUILTIN_FOLDER), "tiny-shapes-outline")


def builtin_model_folder() -> str:
    """The diffusers-layout folder of the built-in model, or a FileNotFoundError saying what to pass instead."""
    if not os.path.isfile(os.path.join(BUILTIN_FOLDER, "model_index.json")):
        raise FileNotFoundError(
            f"no built-in model is installed at {BUILTIN_FOLDER}; pass --model with a diffusers folder "
            "or a single-file .safetensors checkpoint"
        )
    return BUILTIN_FOLDER


def builtin_controlnet_folder() -> str:
    """The folder of the built-in outline ControlNet, or a FileNotFoundError saying what to pass instead."""
    if not os.path.isfile(os.path.join(BUILTIN_CONTROLNET_FOLDER, "config.json")):
        raise FileNotFoundError(f"no built-in outline ControlNet is installed at {BUILTIN_CONTROLNET_FOLDER}; pass "
                                "--controlnet with a ControlNet folder (config.json + weights)")
    return BUILTIN_CONTROLNET_FOLDER


def load_builtin_pipeline(pipeline_class: type | None = None, **components):
    """The built-in model as ``pipeline_class`` (default StableDiffusionPipeline; also the img2img, inpaint, DDIM
    inversion and ControlNet pipelines), float32 on the CPU; ``components`` replace its own (``controlnet=``: the
    ControlNet pipelines get the built-in outline ControlNet unless one is given)."""
    from minidiff.models.controlnet import ControlNetModel
    from minidiff.pipelines import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    if "controlnet" in pipeline_class.component_names and "controlnet" not in components:
        components["controlnet"] = ControlNetModel.from_pretrained(builtin_controlnet_folder())
    return pipeline_class.from_pretrained(builtin_model_folder(), **components)


def vocabulary() -> dict[str, list[str]]:
    """What the built-in model was taught: its prompts are ``a [size] <colour> <shape> [position]
    [on a <colour> background]``. Other words still generate an image, just not a controlled one."""
    from minidiff.training.shapes import COLOURS, POSITIONS, SHAPES, SIZES

    return {"colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES),
            "positions": [phrase for phrase, _ in POSITIONS.values()]}
