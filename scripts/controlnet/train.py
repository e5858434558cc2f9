"""Train the outline ControlNet with minidiff's training API on the images ``draw.py`` wrote; the wall time and
the losses go to ``runs/controlnet/train/timing.json``.

    python -m scripts.controlnet.train              # TRAIN of settings.py
    python -m scripts.controlnet.train --steps 200  # a trial run
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from minidiff.training import TrainConfig, train
from scripts.controlnet.settings import DATA, RUN, THREADS, TRAIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (trial runs)")
    parser.add_argument("--output-dir", default=RUN)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    options = {**TRAIN, **({"max_train_steps": args.steps} if args.steps else {})}
    config = TrainConfig(output_dir=args.output_dir, train_data_dir=DATA, overwrite=True, **options)
    started = time.perf_counter()
    losses = train(config, announce=lambda line: print(line, flush=True))
    timing = {"minutes": round((time.perf_counter() - started) / 60, 2), "steps": len(losses),
              "threads": torch.get_num_threads(), "first_losses": losses[:10], "last_losses": losses[-10:]}
    with open(os.path.join(args.output_dir, "timing.json"), "w", encoding="utf-8") as handle:
        json.dump(timing, handle, indent=1)
    print(f"{timing['minutes']} min", flush=True)


if __name__ == "__main__":
    main()
