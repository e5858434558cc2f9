"""Measure the built-in model: does each image show what its prompt names, and does DDIM inversion + edit change
the named colour while keeping the shape where it was? The measures are pixel statistics
(``minidiff.training.shapes.read_scene``), independent of the model.

    python -m scripts.builtin.evaluate [--model FOLDER] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import minidiff
from minidiff.training.shapes import chance_of_match, held_out_prompts, matches, read_scene

STEPS, GUIDANCE = 20, 5.0  # what the tests and the README use too


def prompt_match(pipe, prompts: list[str], seed: int = 1000, steps: int = STEPS, guidance: float = GUIDANCE) -> dict:
    """Generate one image per prompt (seed ``seed + i``) and check every attribute each prompt names.

    Returns ``fraction`` (images matching their whole prompt), ``chance`` (the same for uniformly random scenes),
    ``per_attribute`` accuracies, the ``images`` (uint8) and ``failures`` (prompt, attributes missed)."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                  output_type="np").images
    images = (images * 255).round().astype(np.uint8)
    results = [matches(prompt, image) for prompt, image in zip(prompts, images)]
    per_attribute: dict[str, list[bool]] = {}
    for result in results:
        for name, ok in result.items():
            per_attribute.setdefault(name, []).append(ok)
    return {
        "fraction": float(np.mean([all(r.values()) for r in results])),
        "chance": float(np.mean([chance_of_match(p) for p in prompts])),
        "per_attribute": {name: float(np.mean(oks)) for name, oks in per_attribute.items()},
        "images": images,
        "failures": [(p, sorted(k for k, ok in r.items() if not ok)) for p, r in zip(prompts, results) if not all(r.values())],
    }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def invert_and_edit(pipe, source_prompt: str, target_prompt: str, seed: int, steps: int = STEPS,
                    start_step: int = 4, guidance: float = GUIDANCE) -> dict:
    """Generate ``source_prompt`` (DDIM, seed), invert the image under it, resample under ``target_prompt`` from
    ``start_step``; measure both images with ``read_scene``: the colours found and the shape masks' IoU."""
    inversion = minidiff.StableDiffusionDDIMInversionPipeline(**pipe.components)
    inversion.set_progress_bar_config(disable=True)
    source = pipe(source_prompt, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed)).images[0]
    edited = inversion.edit(source, source_prompt, target_prompt, num_inference_steps=steps, start_step=start_step,
                            guidance_scale=guidance).images[0]
    before, after = read_scene(source), read_scene(edited)
    return {"source": source, "edited": edited, "before": before, "after": after,
            "iou": mask_iou(before["mask"], after["mask"])}


def main() -> None:
    from minidiff.builtin import builtin_model_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to generate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(args.model or builtin_model_folder())
    pipe.set_progress_bar_config(disable=True)
    held_out = prompt_match(pipe, held_out_prompts(args.prompts))
    report = {k: held_out[k] for k in ("fraction", "chance", "per_attribute", "failures")}
    edits = []
    for i, (colour, new_colour, shape, background) in enumerate(EDITS):
        result = invert_and_edit(pipe, f"a big {colour} {shape} on a {background} background",
                                 f"a big {new_colour} {shape} on a {background} background", seed=2000 + i)
        edits.append({"from": colour, "to": new_colour, "found_before": result["before"]["colour"],
                      "found_after": result["after"]["colour"], "background_after": result["after"]["background"],
                      "iou": round(result["iou"], 3)})
    report["edits"] = edits
    print(json.dumps(report, indent=1))


EDITS = (("red", "yellow", "circle", "blue"), ("green", "purple", "square", "white"), ("blue", "orange", "triangle", "black"),
         ("yellow", "red", "square", "purple"), ("white", "green", "circle", "red"), ("purple", "blue", "triangle", "yellow"))

if __name__ == "__main__":
    main()
