"""Shared helpers of the training tests: tiny configs, image folders, single-threaded torch, subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.training import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A UNet of ~20k weights on 8x8 images: a step takes milliseconds, which is what the loop tests need.
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, resolution=8, synthetic_images=32, train_batch_size=4,
            max_train_steps=6, checkpointing_steps=3, num_sample_images=4, sample_steps=3, lr_warmup_steps=1,
            learning_rate=1e-3, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster single-threaded, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(output_dir, **overrides) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), **{**TINY, **overrides})


def cli_args(config: TrainConfig) -> list[str]:
    """The ``minidiff train`` flags that reproduce ``config``."""
    args = []
    for name, value in config.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, ",".join(map(str, value))]
        elif value is not None:
            args += [flag, str(value)]
    return args


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def start_training(config: TrainConfig, *launcher: str) -> subprocess.Popen:
    """``minidiff train`` in a child process (optionally under a launcher such as torchrun)."""
    command = [*launcher] if launcher else [sys.executable]
    return subprocess.Popen([*command, "-m", "minidiff.cli", "train", *cli_args(config)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_losses(output_dir) -> list[float]:
    with open(os.path.join(output_dir, "train_log.jsonl"), encoding="utf-8") as log:
        return [json.loads(line)["loss"] for line in log if line.strip()]


def write_image(path, size=(10, 12), mode="RGB", seed=0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    PIL.Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


# ---- personalisation (LoRA, DreamBooth, textual inversion) on a tiny Stable Diffusion folder ------------------------
PERSONALISE = dict(method="lora", instance_prompt="a photo of sks", resolution=16, train_batch_size=2,
                   max_train_steps=2, checkpointing_steps=2, num_sample_images=0, lr_warmup_steps=0,
                   learning_rate=1e-2, lr_scheduler="constant", progress=False)


def write_personalise_folders(root, seed: int = 0) -> None:
    """``root/sd``: a tiny seeded Stable Diffusion pipeline folder (16x16 images, tests/tiny_components.py);
    ``root/images``: four captionless 16x16 images."""
    import minidiff
    from tests.tiny_components import tiny_pipeline

    tiny_pipeline(minidiff.StableDiffusionPipeline, seed=seed).save_pretrained(os.path.join(root, "sd"))
    for i in range(4):
        write_image(os.path.join(root, "images", f"{i}.png"), size=(16, 16), seed=i)


def personalise_config(root, output_dir, **overrides) -> TrainConfig:
    """A 2-step LoRA run on :func:`write_personalise_folders`' model and images, unless ``overrides`` say otherwise."""
    options = dict(pretrained_model=os.path.join(root, "sd"), train_data_dir=os.path.join(root, "images"),
                   **PERSONALISE)
    return TrainConfig(output_dir=str(output_dir), **{**options, **overrides})
