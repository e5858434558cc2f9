"""Train each run of ``RUNS_CONFIG`` with minidiff's training API (``minidiff.training.train``) on the images
``draw.py`` wrote; the wall time and the losses go to ``runs/personalise/<run>/timing.json``.

    python -m scripts.personalise.train                 # every run
    python -m scripts.personalise.train lora dreambooth # some of them
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from minidiff.training import TrainConfig, train
from scripts.personalise.settings import CLASS_IMAGES, COMMON, DATA, RUNS, RUNS_CONFIG, THREADS


def run_config(name: str, **overrides) -> TrainConfig:
    """The TrainConfig of run ``name``: its concept's image folder, the shared options, the run's own."""
    options = {**COMMON, **RUNS_CONFIG[name], **overrides}
    concept = options.pop("concept")
    if options.get("with_prior_preservation"):
        options["class_data_dir"] = CLASS_IMAGES
    return TrainConfig(output_dir=os.path.join(RUNS, name), train_data_dir=os.path.join(DATA, concept),
                       overwrite=True, **options)


def train_run(name: str, **overrides) -> dict:
    started = time.perf_counter()
    losses = train(run_config(name, **overrides), announce=lambda line: print(f"{name}: {line}", flush=True))
    timing = {"run": name, "minutes": round((time.perf_counter() - started) / 60, 2), "steps": len(losses),
              "threads": torch.get_num_threads(), "first_losses": losses[:10], "last_losses": losses[-10:]}
    with open(os.path.join(RUNS, name, "timing.json"), "w", encoding="utf-8") as handle:
        json.dump(timing, handle, indent=1)
    print(f"{name}: {timing['minutes']} min", flush=True)
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help=f"runs to train (default: all of {', '.join(RUNS_CONFIG)})")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (trial runs)")
    args = parser.parse_args()
    unknown = [name for name in args.runs if name not in RUNS_CONFIG]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS_CONFIG)}")
    torch.set_num_threads(THREADS)
    overrides = {"max_train_steps": args.steps} if args.steps else {}
    for name in args.runs or list(RUNS_CONFIG):
        train_run(name, **overrides)


if __name__ == "__main__":
    main()
