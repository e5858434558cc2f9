"""Measure every trained run from pixels (``minidiff.training.shapes.read_scene``, no model): does the concept
appear on held-out prompts, and does the model still follow its old vocabulary (the built-in model's held-out
prompts, measured as ``scripts/builtin/evaluate.py`` does)? Writes ``runs/personalise/results.json``.

    python -m scripts.personalise.evaluate              # the base model and every trained run
    python -m scripts.personalise.evaluate lora         # some of them
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

import minidiff
from minidiff.builtin import load_builtin_pipeline
from minidiff.training.shapes import (ALL_COLOURS, CONCEPT_SHAPES, SHAPES, concept_scenes, held_out_concept_prompts,
                                      held_out_prompts, read_scene)
from scripts.builtin.evaluate import prompt_match
from scripts.personalise.draw import training_scenes
from scripts.personalise.settings import (CONCEPTS, GUIDANCE, HELD_OUT_PROMPTS, MORE_SEEDS, OLD_VOCABULARY_PROMPTS,
                                          RESULTS, RUNS, RUNS_CONFIG, SEED, STEPS, THREADS)

BASE = "base"  # the built-in model as shipped: the "before" of every run


def load_run(name: str, folder: str | None = None):
    """The built-in pipeline with run ``name``'s output (in ``folder``, default its run folder): its LoRA file, its
    embedding, or its whole folder (sampled with DDIM as the built-in model, whatever scheduler training used)."""
    pipe = load_builtin_pipeline()
    folder = folder or os.path.join(RUNS, name)
    method = RUNS_CONFIG[name]["method"] if name != BASE else None
    if method == "lora" or RUNS_CONFIG.get(name, {}).get("use_lora"):
        pipe.load_lora_weights(folder)
    elif method == "textual-inversion":
        pipe.load_textual_inversion(folder)
    elif method == "dreambooth":
        trained = minidiff.StableDiffusionPipeline.from_pretrained(folder)
        pipe = minidiff.StableDiffusionPipeline(**dict(trained.components, scheduler=pipe.scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def concept_prompts(concept: str) -> list[tuple[str, dict]]:
    """The held-out prompts of ``concept``: its held-out colours and backgrounds, never a (colour, background) pair
    one of its training images shows."""
    c = CONCEPTS[concept]
    shown = frozenset((s.colour, s.background) for s in training_scenes(concept, np.random.default_rng(c["seed"])))
    rng = np.random.default_rng(1)
    scenes = concept_scenes(rng, HELD_OUT_PROMPTS, c["shapes"], c["held_out_colours"], c["held_out_backgrounds"],
                            c["sizes"], exclude=shown)
    return held_out_concept_prompts(scenes, c["words"])


def concept_attribute(concept: str) -> str:
    return "shape" if concept in CONCEPT_SHAPES else "colour"


def generate(pipe, prompts: list[str], seed: int = SEED) -> np.ndarray:
    """One image per prompt (seed ``seed + i``, DDIM, as the built-in model's evaluation) as (N, H, W, 3) uint8."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators,
                  output_type="np").images
    return (images * 255).round().astype(np.uint8)


def concept_match(pipe, concept: str) -> dict:
    """``concept``: fraction of held-out images where read_scene (the concept among its candidates) finds it;
    ``all``: where it finds everything the prompt names; ``per_attribute``."""
    prompts = concept_prompts(concept)
    images = generate(pipe, [prompt for prompt, _ in prompts])
    attribute = concept_attribute(concept)
    results = []
    for (prompt, named), image in zip(prompts, images):
        seen = read_scene(image, shapes=SHAPES + CONCEPT_SHAPES, colours=ALL_COLOURS)
        results.append({name: seen.get(name) == value for name, value in named.items()})
    names = sorted({name for result in results for name in result})
    return {"concept": float(np.mean([r[attribute] for r in results])),
            "all": float(np.mean([all(r.values()) for r in results])),
            "per_attribute": {n: float(np.mean([r[n] for r in results if n in r])) for n in names}}


def evaluate(name: str, folder: str | None = None) -> dict:
    pipe = load_run(name, folder)
    concepts = list(CONCEPTS) if name == BASE else [RUNS_CONFIG[name]["concept"]]
    report = {}
    for concept in concepts:
        report[concept] = concept_match(pipe, concept)
    prompts = held_out_prompts(OLD_VOCABULARY_PROMPTS)
    old = prompt_match(pipe, prompts, seed=SEED, shapes=SHAPES + CONCEPT_SHAPES)
    more = [prompt_match(pipe, prompts, seed=seed, shapes=SHAPES + CONCEPT_SHAPES)["fraction"] for seed in MORE_SEEDS]
    report["old_vocabulary"] = {**{k: old[k] for k in ("fraction", "per_attribute")},
                                "fraction_over_seeds": float(np.mean([old["fraction"], *more]))}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help=f"runs to evaluate (default: {BASE} and {', '.join(RUNS_CONFIG)})")
    args = parser.parse_args()
    unknown = [name for name in args.runs if name != BASE and name not in RUNS_CONFIG]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {BASE}, {', '.join(RUNS_CONFIG)}")
    torch.set_num_threads(THREADS)
    results = {}
    if os.path.isfile(RESULTS):
        with open(RESULTS, encoding="utf-8") as handle:
            results = json.load(handle)
    for name in args.runs or [BASE, *RUNS_CONFIG]:
        results[name] = evaluate(name)
        timing = os.path.join(RUNS, name, "timing.json")
        if os.path.isfile(timing):
            with open(timing, encoding="utf-8") as handle:
                results[name]["minutes"] = json.load(handle)["minutes"]
        print(name, json.dumps(results[name]), flush=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
