"""Samplers by name against diffusers configured the way diffusers' scheduler overview maps the A1111 names.

Each name's minidiff scheduler (``by_name(name, sd_config)``) and the diffusers class built from the same SD config
with the options the overview lists walk a whole trajectory side by side, one toy model, same-seed generators:
every step's sample agrees to 1e-6 relative. This checks the name table itself; each class's own parity files
sweep its options.
"""

from __future__ import annotations

import inspect
import logging

import diffusers
import pytest
import torch

from minidiff.schedulers import by_name
from parity.report import compare
from parity.test_schedulers_sigma import start_sample, toy_model

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# diffusers' "A1111 / k-diffusion -> diffusers" table (docs: api/schedulers/overview)
DIFFUSERS_FOR = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True)),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++",
                                                                use_karras_sigmas=True)),
    "DPM++ 2S Karras": ("DPMSolverSinglestepScheduler", dict(use_karras_sigmas=True)),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", dict(use_karras_sigmas=True)),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
}
logging.getLogger("diffusers").setLevel(logging.ERROR)


def step_kwargs(scheduler, seed: int) -> dict:
    """A generator for schedulers whose step takes one (the same seed on both sides)."""
    return {"generator": torch.Generator().manual_seed(seed)} if "generator" in inspect.signature(
        scheduler.step).parameters else {}


@pytest.mark.parametrize("name", list(DIFFUSERS_FOR))
def test_sampler_name_matches_diffusers(name):
    class_name, options = DIFFUSERS_FOR[name]
    seeded = {"noise_sampler_seed": 5} if class_name == "DPMSolverSDEScheduler" else {}  # its Brownian tree's seed
    ref = getattr(diffusers, class_name).from_config(SD, **options, **seeded)
    mine = by_name(name, SD, **seeded)
    assert type(mine).__name__ == class_name
    steps = 8
    mine.set_timesteps(steps)
    ref.set_timesteps(steps)
    compare("sampler names", f"{name}: timesteps", mine.timesteps.double(), ref.timesteps.double(), 0.0)
    x_mine = x_ref = start_sample() * ref.init_noise_sigma
    kwargs_mine, kwargs_ref = step_kwargs(mine, 7), step_kwargs(ref, 7)
    for t in ref.timesteps:
        out_mine = mine.step(toy_model(mine.scale_model_input(x_mine, t), t), t, x_mine, **kwargs_mine)
        out_ref = ref.step(toy_model(ref.scale_model_input(x_ref, t), t), t, x_ref, **kwargs_ref)
        x_mine, x_ref = out_mine.prev_sample, out_ref.prev_sample
        compare("sampler names", f"{name}: trajectory", x_mine, x_ref, 1e-6)
