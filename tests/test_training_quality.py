"""A small class-conditional model trained on the built-in synthetic shapes learns them, within a CI budget.

Measured on this configuration (150 steps, ~25 s on one busy core): the loss falls ~3.2x (first 10 steps vs last
20), samples lie at RMS distance ~0.32 from their nearest training image against ~0.85 for the untrained model's
samples (held-out real shapes: ~0.17), and every sample has the colour of its class. The longer run is
``scripts/train_synthetic_shapes.py``.
"""

from __future__ import annotations

import pytest
import torch

from minidiff.training import Trainer
from minidiff.training.data import SyntheticShapes
from minidiff.training.distributed import Distributed
from minidiff.training.metrics import dominant_colour, nearest_neighbour_rms
from tests.training_fixtures import one_thread, tiny_config  # noqa: F401

LOSS_FACTOR = 2.5  # mean loss of the first 10 steps / of the last 20
CLOSER_THAN_UNTRAINED = 0.5  # samples' nearest-neighbour distance / the untrained model's
COLOUR_ACCURACY = 0.8  # samples whose dominant colour is their class's


@pytest.mark.slow
def test_learns_the_synthetic_shapes(tmp_path):
    config = tiny_config(tmp_path / "run", resolution=16, block_out_channels=(16, 32), synthetic_images=256,
                         train_batch_size=16, max_train_steps=150, learning_rate=3e-3, lr_warmup_steps=20,
                         prediction_type="v_prediction", class_conditional=True, checkpointing_steps=150,
                         num_sample_images=0)
    trainer = Trainer(config, Distributed())
    untrained = trainer.task.sample(trainer.sampling_unet, 30, 20, seed=1)
    losses = torch.tensor(trainer.run())
    samples = trainer.task.sample(trainer.sampling_unet, 30, 20, seed=1)  # classes 0, 1, 2, 0, ...

    factor = (losses[:10].mean() / losses[-20:].mean()).item()
    assert factor > LOSS_FACTOR, f"loss fell only {factor:.2f}x"
    data = trainer.dataset.images
    distance = nearest_neighbour_rms(samples, data).mean().item()
    baseline = nearest_neighbour_rms(untrained, data).mean().item()
    held_out = nearest_neighbour_rms(SyntheticShapes(30, 16, seed=99).images, data).mean().item()
    assert distance < CLOSER_THAN_UNTRAINED * baseline, (distance, baseline, held_out)
    accuracy = (dominant_colour(samples) == torch.arange(30) % 3).float().mean().item()
    assert accuracy >= COLOUR_ACCURACY, accuracy
