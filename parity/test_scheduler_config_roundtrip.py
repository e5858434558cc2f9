"""Scheduler configs keep their keys across classes, as in diffusers 0.42.1.

``Y.from_config(x.config)`` keeps the options of X that Y does not use (diffusers' "hidden" config keys) and hands
them on, so ``X.from_config(y.config)`` gets them back: the README's sequence (swap in Euler ancestral, then rebuild
DDIM for inversion) must not lose ``clip_sample=False``. For every ordered pair (X, Y) of the schedulers, X is
built with non-default options, taken X -> Y -> X through ``from_config`` in both libraries, and the two libraries'
Y and final X compared: the settings each uses, the timesteps of ``set_timesteps(10)`` and one step on a fixed input.
"""

from __future__ import annotations

import inspect
import logging

import diffusers
import pytest
import torch

import minidiff.schedulers as md
from parity.configs import public
from parity.report import compare, compare_exact

COMPONENT = "scheduler config round trip"
TOL = 1e-6
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
COMMON = dict(SD_BETAS, steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing")
SOURCE_OPTIONS = {  # non-default options of each class, a few of them ones most other classes lack
    "DDPMScheduler": dict(COMMON, clip_sample=False, variance_type="fixed_large", clip_sample_range=2.0),
    "DDIMScheduler": dict(COMMON, clip_sample=False, set_alpha_to_one=False),
    "DDIMInverseScheduler": dict(COMMON, clip_sample=False, set_alpha_to_one=False),
    "PNDMScheduler": dict(COMMON, skip_prk_steps=True, set_alpha_to_one=True),
    "LMSDiscreteScheduler": dict(COMMON, use_karras_sigmas=True),
    "EulerDiscreteScheduler": dict(COMMON, interpolation_type="log_linear", final_sigmas_type="sigma_min"),
    "EulerAncestralDiscreteScheduler": dict(COMMON, rescale_betas_zero_snr=True),
    "DPMSolverMultistepScheduler": dict(COMMON, solver_order=3, thresholding=True, sample_max_value=2.0,
                                        lower_order_final=False, timestep_spacing="leading"),
    "HeunDiscreteScheduler": dict(COMMON, use_exponential_sigmas=True, clip_sample=True),
    "KDPM2DiscreteScheduler": dict(COMMON, use_karras_sigmas=True),
    "KDPM2AncestralDiscreteScheduler": dict(COMMON, use_exponential_sigmas=True),
    "LCMScheduler": dict(COMMON, original_inference_steps=40, timestep_scaling=5.0),
    "TCDScheduler": dict(COMMON, original_inference_steps=40),
}
NAMES = tuple(SOURCE_OPTIONS)
logging.getLogger("diffusers").setLevel(logging.ERROR)  # "config attributes ... will be ignored"


def through(library, names: tuple[str, ...]):
    """Build names[0] with its options, then each following class from the previous one's config."""
    scheduler = getattr(library, names[0])(**SOURCE_OPTIONS[names[0]])
    for name in names[1:]:
        scheduler = getattr(library, name).from_config(scheduler.config)
    return scheduler


def one_step(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """set_timesteps(10), then one step of a toy model on a fixed sample: (timesteps, prev_sample)."""
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    sample = torch.linspace(-1, 1, 2 * 2 * 4 * 4).reshape(2, 2, 4, 4) * scheduler.init_noise_sigma  # (B, C, H, W)
    model_input = scheduler.scale_model_input(sample, t)
    model_output = 0.5 * model_input + 0.1 * torch.sin(3 * model_input)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(
        scheduler.step).parameters else {}
    return scheduler.timesteps, scheduler.step(model_output, t, sample, **kwargs).prev_sample


def check_same(case: str, mine, ref) -> None:
    """Same settings (every option either library keeps), same timesteps, same first step."""
    mine_config, ref_config = public(mine.config), public(ref.config)
    differing = {key: (mine_config.get(key), ref_config.get(key))
                 for key in set(mine_config) | set(ref_config) if mine_config.get(key) != ref_config.get(key)}
    assert not differing, f"{case}: settings differ (minidiff, diffusers): {differing}"
    (timesteps_mine, step_mine), (timesteps_ref, step_ref) = one_step(mine), one_step(ref)
    compare_exact(COMPONENT, f"{case}: timesteps", timesteps_mine, timesteps_ref)
    compare(COMPONENT, f"{case}: first step", step_mine, step_ref, TOL)


@pytest.mark.parametrize("target", NAMES)
@pytest.mark.parametrize("source", NAMES)
def test_config_keys_survive_a_round_trip_through_another_class(source, target):
    check_same(f"{source} -> {target}", through(md, (source, target)), through(diffusers, (source, target)))
    back_mine = through(md, (source, target, source))
    check_same(f"{source} -> {target} -> {source}", back_mine, through(diffusers, (source, target, source)))
    direct = getattr(md, source)(**SOURCE_OPTIONS[source])
    assert {key: back_mine.config[key] for key in SOURCE_OPTIONS[source]} == {
        key: direct.config[key] for key in SOURCE_OPTIONS[source]}, "the source's own options came back changed"


def test_readme_sequence_keeps_clip_sample():
    """Euler ancestral swapped in from a DDIM config, then DDIM rebuilt from it (as the inversion pipeline does)."""
    for library in (md, diffusers):
        ddim = library.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        euler_a = library.EulerAncestralDiscreteScheduler.from_config(ddim.config)
        rebuilt = library.DDIMScheduler.from_config(euler_a.config)
        assert euler_a.config["clip_sample"] is False and rebuilt.config.clip_sample is False
        assert rebuilt.config.set_alpha_to_one is False and rebuilt.config.steps_offset == 1
