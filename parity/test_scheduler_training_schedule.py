"""Scheduler API that diffusers' tests rely on. step() before set_timesteps(): the schedulers whose constructor
builds the training schedule walk it exactly as diffusers' do; the others refuse, where diffusers raises too. And
``compatibles``: the classes one config builds."""

from __future__ import annotations

from inspect import signature

import diffusers
import pytest
import torch

import minidiff
from parity.report import compare

COMPONENT = "Schedulers"
STEPS = 4
WALKERS = ["DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
           "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
           "DPMSolverSDEScheduler"]
REFUSERS = ["DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler",
            "TCDScheduler"]
OPTIONS = {"DPMSolverSDEScheduler": dict(noise_sampler_seed=0)}


def walk(scheduler) -> list[torch.Tensor]:
    """``STEPS`` steps from the first of the constructor's timesteps, with a fixed toy model."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    noise = {"generator": torch.Generator().manual_seed(1)} if "generator" in signature(scheduler.step).parameters \
        else {}
    samples = []
    for t in scheduler.timesteps[:STEPS]:
        model_input = scheduler.scale_model_input(x, t)
        output = 0.3 * model_input + 0.01 * float(t) / 1000  # (2, 3, 4, 4)
        x = scheduler.step(output, t, x, **noise).prev_sample
        samples.append(x)
    return samples


@pytest.mark.parametrize("name", WALKERS)
def test_walks_the_training_schedule_as_diffusers(name):
    options = OPTIONS.get(name, {})
    ours, theirs = getattr(minidiff, name)(**options), getattr(diffusers, name)(**options)
    assert ours.num_inference_steps == theirs.num_inference_steps
    compare(COMPONENT, f"{name} before set_timesteps: timesteps", ours.timesteps.double(), theirs.timesteps.double(),
            0.0)
    for step, (a, b) in enumerate(zip(walk(ours), walk(theirs))):
        compare(COMPONENT, f"{name} before set_timesteps: sample after step {step + 1}", a, b, 1e-6)


@pytest.mark.parametrize("name", REFUSERS)
def test_refuses_where_diffusers_cannot_step(name):
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(Exception):  # diffusers: a ValueError or TypeError somewhere in its step
        getattr(diffusers, name)().step(x, 999 if name != "DDIMInverseScheduler" else 0, x)
    with pytest.raises(RuntimeError, match=rf"{name}.step\(\) called before set_timesteps"):
        getattr(minidiff, name)().step(x, 999 if name != "DDIMInverseScheduler" else 0, x)


SCHEDULERS = [name for name in minidiff.__all__ if name.endswith("Scheduler")]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_compatibles_as_diffusers(name):
    """``scheduler.compatibles`` lists diffusers' classes (those minidiff has), and each builds from this config and
    gives it back unchanged (diffusers' test_compatibles)."""
    ours, theirs = getattr(minidiff, name)(), getattr(diffusers, name)()
    assert {c.__name__ for c in ours.compatibles} == {c.__name__ for c in theirs.compatibles} & set(SCHEDULERS)
    assert type(ours) in ours.compatibles
    for other in ours.compatibles:
        back = type(ours).from_config(other.from_config(ours.config).config)
        assert dict(back.config) == dict(ours.config), f"{name} -> {other.__name__} -> {name} changed the config"
