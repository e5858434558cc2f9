"""Measure the outline ControlNet from pixels (``minidiff.training.shapes.read_scene``, no model): on held-out
outlines in held-out colour pairs, does the drawn shape fill the outline (mask IoU), and are its colours the
prompt's? The built-in model without the ControlNet, on the same prompts, is the baseline. Writes
``runs/controlnet/results.json``.

    python -m scripts.controlnet.evaluate                        # the trained run
    python -m scripts.controlnet.evaluate --controlnet FOLDER    # another ControlNet folder (a checkpoint's)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

import minidiff
from minidiff.builtin import load_builtin_pipeline
from minidiff.training.shapes import read_scene
from scripts.builtin.evaluate import mask_iou
from scripts.controlnet.draw import Placed, condition_image, held_out_shapes
from scripts.controlnet.settings import GUIDANCE, IOU, REPO, RESULTS, RUN, SEED, STEPS, THREADS


def generate(pipe, shapes: list[Placed]) -> np.ndarray:
    """One image per shape, its caption (background named) as the prompt and, for a ControlNet pipeline, its
    outline as the condition image; seed ``SEED + i``, DDIM, as the built-in model's evaluation. (N, H, W, 3)."""
    options = {}
    if isinstance(pipe, minidiff.StableDiffusionControlNetPipeline):
        options["image"] = [condition_image(placed) for placed in shapes]
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(shapes))]
    images = pipe([placed.caption() for placed in shapes], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=generators, output_type="np", **options).images
    return (images * 255).round().astype(np.uint8)


def measure(pipe, shapes: list[Placed]) -> dict:
    """The IoU of each image's read mask with its outline's filled shape, and whether its colours are the prompt's:
    ``follows``, the fraction with IoU >= IOU; ``colours``, with the shape's and the background's colour right;
    ``both``; ``shape``, read as the outline's shape; the median IoU."""
    rows = []
    for placed, image in zip(shapes, generate(pipe, shapes)):
        seen = read_scene(image)
        rows.append({"iou": mask_iou(seen["mask"], placed.mask()),
                     "colours": seen["colour"] == placed.colour and seen["background"] == placed.background,
                     "shape": seen.get("shape") == placed.shape})
    ious = np.array([row["iou"] for row in rows])
    return {"follows": float(np.mean(ious >= IOU)), "median_iou": float(np.median(ious)),
            "colours": float(np.mean([row["colours"] for row in rows])),
            "both": float(np.mean([row["iou"] >= IOU and row["colours"] for row in rows])),
            "shape": float(np.mean([row["shape"] for row in rows]))}


def controlnet_pipeline(folder: str):
    pipe = load_builtin_pipeline(minidiff.StableDiffusionControlNetPipeline,
                                 controlnet=minidiff.ControlNetModel.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlnet", default=RUN, help="ControlNet folder (default: the trained run)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    shapes = held_out_shapes()
    base = load_builtin_pipeline()
    base.set_progress_bar_config(disable=True)
    results = {"prompts": len(shapes), "iou_bar": IOU, "without_controlnet": measure(base, shapes),
               "controlnet": measure(controlnet_pipeline(args.controlnet), shapes),
               "controlnet_folder": os.path.relpath(args.controlnet, REPO)}
    timing = os.path.join(args.controlnet, "timing.json")
    if os.path.isfile(timing):
        with open(timing, encoding="utf-8") as handle:
            results["training"] = json.load(handle)
    print(json.dumps(results, indent=1))
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
