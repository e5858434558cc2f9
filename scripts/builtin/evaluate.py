"""Measure the built-in model: does each image show what its prompt names, and does DDIM inversion + edit change
the named colour while keeping the shape where it was? The measures are pixel statistics
(``minidiff.training.shapes.read_scene``), independent of the model.

    python -m scripts.builtin.evaluate [--model FOLDER] [--prompts 64] [--edits 32]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import minidiff
from minidiff.training.shapes import COLOURS, SHAPES, chance_of_match, held_out_prompts, matches, read_scene

STEPS, GUIDANCE = 20, 5.0  # what the tests and the README use too
# DDIM edits resample from 40% of the way (the layout is mostly settled by then; later restarts often keep the old
# colour, earlier ones move the shape more often)
EDIT_START_STEP, EDIT_GUIDANCE = 8, GUIDANCE


def prompt_match(pipe, prompts: list[str], seed: int = 1000, steps: int = STEPS, guidance: float = GUIDANCE,
                 shapes: tuple[str, ...] = SHAPES) -> dict:
    """Generate one image per prompt (seed ``seed + i``) and check every attribute each prompt names, reading the
    shape among ``shapes`` (add a concept's to count drawing it where an old shape was asked for as a miss).

    Returns ``fraction`` (images matching their whole prompt), ``chance`` (the same for uniformly random scenes),
    ``per_attribute`` accuracies, the ``images`` (uint8) and ``failures`` (prompt, attributes missed)."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                  output_type="np").images
    images = (images * 255).round().astype(np.uint8)
    results = [matches(prompt, image, shapes) for prompt, image in zip(prompts, images)]
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
                    start_step: int = EDIT_START_STEP, guidance: float = EDIT_GUIDANCE) -> dict:
    """Generate ``source_prompt`` (DDIM, seed), invert the image under it, resample under ``target_prompt`` from
    ``start_step``; measure both images with ``read_scene``: the colours found and the shape masks' IoU."""
    inversion = minidiff.StableDiffusionDDIMInversionPipeline(**pipe.components)
    inversion.set_progress_bar_config(disable=True)
    source = pipe(source_prompt, num_inference_steps=steps, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(seed)).images[0]
    edited = inversion.edit(source, source_prompt, target_prompt, num_inference_steps=steps, start_step=start_step,
                            guidance_scale=guidance).images[0]
    before, after = read_scene(source), read_scene(edited)
    return {"source": source, "edited": edited, "before": before, "after": after,
            "iou": mask_iou(before["mask"], after["mask"])}


def colour_edits(count: int, seed: int = 3) -> list[tuple[str, str, str, str]]:
    """``count`` random (colour, new colour, shape, background) edits, the three colours distinct."""
    rng = np.random.default_rng(seed)
    edits = []
    while len(edits) < count:
        colour, new_colour, background = rng.choice(list(COLOURS), size=3, replace=False)
        edits.append((str(colour), str(new_colour), str(rng.choice(SHAPES)), str(background)))
    return edits


def colour_edit(pipe, colour: str, new_colour: str, shape: str, background: str, seed: int) -> dict:
    """Draw a big ``colour`` ``shape`` and edit its colour; ``ok``: the source showed it, the edit shows
    ``new_colour`` on the same background, and the shape's mask overlaps the source's with IoU >= 0.7."""
    source = f"a big {colour} {shape} on a {background} background"
    result = invert_and_edit(pipe, source, source.replace(colour, new_colour, 1), seed=seed)
    before, after = result["before"], result["after"]
    ok = (before["colour"] == colour and after["colour"] == new_colour and after["background"] == background
          and result["iou"] >= 0.7)
    return {"edit": f"{colour} -> {new_colour} {shape} on {background}", "ok": ok, "found_before": before["colour"],
            "found_after": after["colour"], "background_after": after["background"], "iou": round(result["iou"], 3)}


def main() -> None:
    from minidiff.builtin import builtin_model_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to generate")
    parser.add_argument("--edits", type=int, default=32, help="colour edits to make")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(args.model or builtin_model_folder())
    pipe.set_progress_bar_config(disable=True)
    held_out = prompt_match(pipe, held_out_prompts(args.prompts))
    report = {k: held_out[k] for k in ("fraction", "chance", "per_attribute", "failures")}
    edits = [colour_edit(pipe, *edit, seed=2000 + i) for i, edit in enumerate(colour_edits(args.edits))]
    report["edits"] = {"fraction": float(np.mean([e["ok"] for e in edits])), "cases": edits}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
