"""The personalisation methods on the one training loop's machinery: a LoRA run SIGKILLed at a random step resumes
to the uninterrupted losses and adapter; a 2-process torchrun LoRA run (text encoder too) equals one process with
the same global batch; only adapter parameters (or the token table) require grad, which is all DDP synchronises."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

import minidiff
from minidiff.adapters import lora
from minidiff.loading.safetensors_io import load_safetensors
from minidiff.training import TrainConfig, Trainer, train
from minidiff.training.checkpoint import list_checkpoints
from minidiff.training.distributed import Distributed
from tests.test_training_processes import TORCHRUN, wait_for_steps
from tests.tiny_components import tiny_pipeline
from tests.training_fixtures import logged_losses, one_thread, start_training, write_image  # noqa: F401

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny Stable Diffusion folder (16x16 images) and six captionless 16x16 images."""
    root = tmp_path_factory.mktemp("personalise")
    tiny_pipeline(minidiff.StableDiffusionPipeline).save_pretrained(root / "sd")
    for i in range(6):
        write_image(str(root / "images" / f"{i}.png"), size=(16, 16), seed=i)
    return root


def config(base, output_dir, **overrides) -> TrainConfig:
    options = dict(method="lora", pretrained_model=str(base / "sd"), train_data_dir=str(base / "images"),
                   instance_prompt="a photo of sks", resolution=16, train_batch_size=2, max_train_steps=6,
                   checkpointing_steps=2, num_sample_images=0, lr_warmup_steps=0, learning_rate=1e-2,
                   lr_scheduler="constant", progress=False)
    return TrainConfig(output_dir=str(output_dir), **{**options, **overrides})


@pytest.mark.parametrize("overrides, trained", [
    (dict(), "unet"),
    (dict(train_text_encoder=True), "unet+text_encoder"),
    (dict(method="textual-inversion", instance_prompt="a photo of <sks>", placeholder_token="<sks>",
          initializer_token="dog", num_vectors=2), "token table"),
])
def test_only_the_methods_weights_require_grad(base_folder, tmp_path, overrides, trained):
    trainer = Trainer(config(base_folder, tmp_path / "run", **overrides), Distributed())
    grads = {name for name, p in trainer.task.denoiser.named_parameters() if p.requires_grad}
    assert len(grads) == len(trainer.trainable) and grads  # DDP all-reduces exactly these
    if trained == "token table":
        assert grads == {"text_encoder.embeddings.token_embedding.weight"}
        return
    expected = {f"unet.{n}" for n in lora.lora_parameters(trainer.task.unet)}
    if trained == "unet+text_encoder":
        expected |= {f"text_encoder.{n}" for n in lora.lora_parameters(trainer.task.pipe.text_encoder)}
        assert any(n.startswith("text_encoder.") for n in expected)
    assert grads == expected


@pytest.mark.slow
def test_lora_run_sigkilled_at_a_random_step_resumes_to_the_same_adapter(base_folder, tmp_path):
    steps = dict(max_train_steps=24, checkpointing_steps=3)
    kill_after = random.Random().randint(4, 20)
    process = start_training(config(base_folder, tmp_path / "killed", **steps))
    wait_for_steps(process, tmp_path / "killed", kill_after)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list_checkpoints(str(tmp_path / "killed")), f"killed after step {kill_after} before the first checkpoint"
    resumed = train(config(base_folder, tmp_path / "killed", resume="latest", **steps))
    whole = train(config(base_folder, tmp_path / "whole", **steps))
    assert resumed == whole and logged_losses(tmp_path / "killed") == whole, f"killed after step >= {kill_after}"
    ours, reference = (load_safetensors(str(tmp_path / run / LORA_FILE)) for run in ("killed", "whole"))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_lora_as_one(base_folder, tmp_path):
    options = dict(max_train_steps=4, train_text_encoder=True, num_sample_images=2, sample_steps=2, train_batch_size=1)
    process = start_training(config(base_folder, tmp_path / "ddp", **options), TORCHRUN, "--standalone",
                             "--nproc_per_node", "2")
    single = train(config(base_folder, tmp_path / "single", gradient_accumulation_steps=2, **options))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("trained 4 steps") == 1 and LORA_FILE in stdout  # rank 0 alone reports and writes
    assert np.allclose(logged_losses(tmp_path / "ddp"), single, rtol=1e-5, atol=0)
    ours, reference = (load_safetensors(str(tmp_path / run / LORA_FILE)) for run in ("ddp", "single"))
    assert ours.keys() == reference.keys() and any(k.startswith("text_encoder.") for k in ours)
    worst = max(((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp(min=1e-12)).item()
                for k in reference)
    assert worst < 1e-4, worst
