"""Training and fine-tuning: pixel-space UNet2DModel (unconditional or class-conditional, new or pretrained),
text-conditioned Stable Diffusion UNets in latent space, and personalisation (LoRA, DreamBooth, textual inversion).
``minidiff train --help`` lists the options."""

from __future__ import annotations

import argparse
import sys

from minidiff.training.config import TrainConfig, add_arguments, config_from_args
from minidiff.training.data import ImageFolderDataset, SyntheticShapes
from minidiff.training.ema import EMAModel
from minidiff.training.loop import Trainer, lr_factor, make_optimizer, train, training_step

__all__ = ["TrainConfig", "Trainer", "train", "training_step", "lr_factor", "make_optimizer", "EMAModel",
           "ImageFolderDataset", "SyntheticShapes", "add_arguments", "config_from_args", "main"]


def main(args: argparse.Namespace) -> int:
    """``minidiff train``: bad options, data or folders, or a failed write (a full disk, ...) end with a one-line
    error and exit status 2."""
    try:
        train(config_from_args(args), announce=lambda line: print(line, flush=True))
    except (ValueError, TypeError, OSError) as error:  # OSError includes FileNotFoundError
        print(f"minidiff: error: {error}", file=sys.stderr)
        return 2
    return 0
