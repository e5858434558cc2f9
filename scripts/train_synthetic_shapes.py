"""The butterflies tutorial, offline and CPU-sized: train an unconditional UNet2DModel (the tutorial's layout,
narrowed: DownBlock2D levels, attention at the deepest) with v-prediction on the built-in synthetic shapes at 32x32,
then measure how data-like its samples are. Prints a markdown summary and writes it to <output-dir>/results.json.

    python scripts/train_synthetic_shapes.py --output-dir runs/shapes          # ~15 min on one busy CPU core
    python scripts/train_synthetic_shapes.py --output-dir runs/shapes --resume # continue after an interruption

Statistics (minidiff.training.metrics): the loss reduction (mean of the first 50 steps / the last 100); the mean RMS
distance from each sample to its nearest training image, for the trained model, the untrained model and held-out
real shapes (the level a perfect model reaches); the share of samples whose dominant colour is red / green / blue
(the data has a third of each).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from minidiff.training import TrainConfig, Trainer
from minidiff.training.data import SyntheticShapes
from minidiff.training.distributed import Distributed
from minidiff.training.metrics import dominant_colour, nearest_neighbour_rms
from minidiff.training.tasks import new_unet

SAMPLES, SAMPLE_STEPS = 64, 50


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--prediction-type", default="v_prediction", choices=("epsilon", "v_prediction"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--resume", action="store_true")
    return parser.parse_args()


def statistics(trainer: Trainer, samples, untrained) -> dict:
    data = trainer.dataset.images
    held_out = SyntheticShapes(SAMPLES, trainer.task.resolution, seed=12345).images
    losses = torch.tensor(trainer.losses)
    colours = torch.bincount(dominant_colour(samples), minlength=3).float() / len(samples)
    return {
        "steps": len(losses),
        "loss_first_50": losses[:50].mean().item(),
        "loss_last_100": losses[-100:].mean().item(),
        "loss_reduction": (losses[:50].mean() / losses[-100:].mean()).item(),
        "nn_rms_trained": nearest_neighbour_rms(samples, data).mean().item(),
        "nn_rms_untrained": nearest_neighbour_rms(untrained, data).mean().item(),
        "nn_rms_held_out_data": nearest_neighbour_rms(held_out, data).mean().item(),
        "sample_colour_shares_rgb": [round(v, 3) for v in colours.tolist()],
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        output_dir=args.output_dir, resolution=32, synthetic_images=2048, block_out_channels=(16, 32, 32),
        layers_per_block=1, attention_levels=1, train_batch_size=16, max_train_steps=args.steps,
        learning_rate=2e-3, lr_warmup_steps=100, lr_scheduler="cosine", prediction_type=args.prediction_type,
        checkpointing_steps=250, checkpoints_total_limit=2, num_sample_images=16, sample_steps=SAMPLE_STEPS,
        resume="latest" if args.resume else None,
    )
    trainer = Trainer(config, Distributed())
    untrained = new_unet(config, 32, 3, None).eval()  # the same seeded initial weights, never trained
    untrained_samples = trainer.task.sample(untrained, SAMPLES, SAMPLE_STEPS, seed=1)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    samples = trainer.task.sample(trainer.sampling_unet, SAMPLES, SAMPLE_STEPS, seed=1)
    results = statistics(trainer, samples, untrained_samples)
    results.update(train_seconds=round(seconds, 1), parameters=trainer.unet.num_parameters(), config=config.to_dict())
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print("| statistic | value |\n|---|---|")
    for key, value in results.items():
        if key != "config":
            print(f"| {key} | {value if not isinstance(value, float) else f'{value:.4f}'} |")


if __name__ == "__main__":
    main()
