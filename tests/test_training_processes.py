"""Training across processes: a run SIGKILLed at a random step resumes to the uninterrupted losses; a 2-process
torchrun (gloo, CPU) run equals the single-process run with the same global batch; diffusers' DDPMPipeline loads
and runs what minidiff trained."""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import diffusers
import numpy as np
import pytest
import torch

import minidiff
from minidiff.training import train
from minidiff.training.checkpoint import list_checkpoints
from tests.training_fixtures import logged_losses, one_thread, start_training, tiny_config  # noqa: F401

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def wait_for_steps(process, output_dir, steps: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    log = os.path.join(output_dir, "train_log.jsonl")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-2000:]}")
        if os.path.isfile(log) and len(open(log).readlines()) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {steps} within {timeout} s")


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_reproduces_the_losses(tmp_path):
    config = dict(max_train_steps=30, checkpointing_steps=4, num_sample_images=0)
    kill_after = random.Random().randint(5, 25)
    process = start_training(tiny_config(tmp_path / "killed", **config))
    wait_for_steps(process, tmp_path / "killed", kill_after)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    survivors = list_checkpoints(str(tmp_path / "killed"))
    assert survivors, f"killed after step {kill_after} before the first checkpoint"
    resumed = train(tiny_config(tmp_path / "killed", resume="latest", **config))
    uninterrupted = train(tiny_config(tmp_path / "whole", **config))
    assert resumed == uninterrupted, f"killed after step >= {kill_after}, resumed from {survivors[-1]}"
    assert logged_losses(tmp_path / "killed") == uninterrupted


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    options = dict(max_train_steps=4, checkpointing_steps=2, num_sample_images=2, train_batch_size=2)
    process = start_training(tiny_config(tmp_path / "ddp", **options), TORCHRUN, "--standalone", "--nproc_per_node",
                             "2")
    single = train(tiny_config(tmp_path / "single", **dict(options, gradient_accumulation_steps=2)))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("trained 4 steps") == 1  # rank 0 alone reports (and writes)
    ddp = logged_losses(tmp_path / "ddp")
    assert np.allclose(ddp, single, rtol=1e-5, atol=0), (ddp, single)
    ours = minidiff.UNet2DModel.from_pretrained(tmp_path / "ddp", subfolder="unet").state_dict()
    reference = minidiff.UNet2DModel.from_pretrained(tmp_path / "single", subfolder="unet").state_dict()
    worst = max(((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp(min=1e-12)).item()
                for k in reference)
    assert worst < 1e-4, worst
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "ddp"))] == [
        "checkpoint-000002", "checkpoint-000004"]


def test_diffusers_ddpm_pipeline_loads_and_generates_what_minidiff_trained(tmp_path):
    train(tiny_config(tmp_path / "run", num_sample_images=0))
    theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path / "run")
    ours = minidiff.DDPMPipeline.from_pretrained(tmp_path / "run")
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    expected = theirs(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                      output_type="np").images
    actual = ours(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                  output_type="np").images
    assert expected.shape == (2, 8, 8, 3) and np.isfinite(expected).all()
    assert np.abs(actual - expected).max() < 1e-4
