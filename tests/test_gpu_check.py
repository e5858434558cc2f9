"""scripts/gpu_check.py: on a machine without CUDA it says so and checks nothing; its cases run (on the CPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.builtin import load_builtin_pipeline
from scripts import gpu_check


def test_without_cuda_it_says_so_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 2
    assert "CUDA is absent on this machine: nothing was checked" in capsys.readouterr().out


def test_every_case_runs_and_each_changes_the_image():
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images = gpu_check.run_cases(pipe)
    assert len(images) == 6
    plain = images.pop("plain")
    for case, image in images.items():
        assert image.shape == plain.shape and np.isfinite(image).all(), case
        assert np.abs(image - plain).max() > 1e-3, case  # each case really changes the drawing
    after = pipe.unet.state_dict()  # adapters removed; fuse + unfuse restores the weights to rounding
    assert list(after) == list(base_state)
    assert all(torch.allclose(base_state[k], v, rtol=0, atol=1e-6) for k, v in after.items())
    assert len(pipe.tokenizer) == pipe.tokenizer.vocab_size


@pytest.mark.slow
def test_every_training_run_changes_its_weights(tmp_path):
    """The runs the script compares across devices, here on the CPU for one step each: each trains."""
    images = gpu_check.draw_training_images(str(tmp_path / "images"))
    runs = gpu_check.train_cases("cpu", images, str(tmp_path / "runs"), steps=1)
    assert list(runs) == list(gpu_check.TRAINING_RUNS)
    for case, (initial, trained) in runs.items():
        assert torch.isfinite(trained).all() and not torch.equal(initial, trained), case
