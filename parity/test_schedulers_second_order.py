"""Parity of the two-call samplers (Heun, DPM2, DPM2 ancestral) with diffusers 0.42.1: drawn configs and step
counts, every model call's sample and x0 estimate to 1e-6 relative, schedules (doubled timesteps, midpoint
sigmas) exactly equal; an img2img start mid-schedule; diffusers' own full-loop expected sums."""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff.schedulers as md
from parity.report import compare, compare_exact
from parity.test_schedulers_sigma import (
    SIGMA_SPACING,
    build_pair,
    common_options,
    run_custom_schedule,
    run_side_by_side,
)

NAMES = ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
PREDICTIONS = {"HeunDiscreteScheduler": ("epsilon", "v_prediction", "sample")}


@st.composite
def second_order_options(draw, name: str) -> dict:
    options = dict(draw(common_options(PREDICTIONS.get(name, ("epsilon", "v_prediction")))), **draw(SIGMA_SPACING))
    if name == "HeunDiscreteScheduler" and draw(st.booleans()):
        options.update(clip_sample=True, clip_sample_range=draw(st.sampled_from([1.0, 2.5])))
    if name == "HeunDiscreteScheduler" and draw(st.integers(0, 3)) == 0:
        options["beta_schedule"] = "exp"  # Heun's own schedule, abar(t) = exp(-12 t)
    return options


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=st.data(), num_inference_steps=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_trajectories(name, data, num_inference_steps, seed):
    config = data.draw(second_order_options(name))
    if name == "KDPM2AncestralDiscreteScheduler" and reference_schedule_has_nan(config, num_inference_steps):
        return  # checked by test_ancestral_split_stays_finite_where_diffusers_is_nan
    mine, ref = build_pair(name, config, num_inference_steps)
    if name != "HeunDiscreteScheduler":
        compare_exact(name, "sigmas_interpol", mine.sigmas_interpol, ref.sigmas_interpol)
    run_side_by_side(name, "trajectories", mine, ref, seed=seed)


def reference_schedule_has_nan(config: dict, num_inference_steps: int) -> bool:
    """diffusers 0.42.1's DPM2 ancestral takes sqrt of a sigma_down^2 that float32 rounds below 0 when the noise
    levels span many decades (the cosine schedule, few steps: diffusers issue #14213), and its whole trajectory is
    NaN; minidiff computes sigma_down without the cancellation there."""
    reference = diffusers.KDPM2AncestralDiscreteScheduler(**config)
    reference.set_timesteps(num_inference_steps)
    return not bool(torch.isfinite(reference.sigmas_interpol[:-1]).all())


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_ancestral_split_stays_finite_where_diffusers_is_nan(steps):
    """Where diffusers 0.42.1 gives a NaN schedule (issue #14213), minidiff's sigma_down = sigma_next^2 / sigma
    (the same value, without the cancelling difference) keeps the schedule and the samples finite."""
    config = dict(num_train_timesteps=1100, beta_schedule="squaredcos_cap_v2")
    assert reference_schedule_has_nan(config, 4)
    scheduler = md.KDPM2AncestralDiscreteScheduler(**config)
    scheduler.set_timesteps(steps)
    assert torch.isfinite(scheduler.timesteps).all() and torch.isfinite(scheduler.sigmas_interpol[:-1]).all()
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x, generator=torch.manual_seed(1)).prev_sample
    assert torch.isfinite(x).all()


def deterministic_sample(flip: bool = False) -> torch.Tensor:
    """diffusers' scheduler-test tensors: arange(768)/768 (reversed for ``dummy_noise_deter``) as (3, 8, 8, 4)
    moved to (4, 3, 8, 8)."""
    values = torch.arange(4 * 3 * 8 * 8)
    values = values.flip(-1) if flip else values
    return (values.reshape(3, 8, 8, 4) / (4 * 3 * 8 * 8)).permute(3, 0, 1, 2)


# diffusers' tests/schedulers/test_scheduler_{heun,kdpm2_discrete,kdpm2_ancestral}.py: config options, whether noise
# is added at step 8 of 10 first, expected |sum|, |mean| and the mean's tolerance (T = 1100, linear 1e-4..0.02)
EXPECTED = [
    ("HeunDiscreteScheduler", {}, False, 0.1233, 0.0002, 1e-3),
    ("HeunDiscreteScheduler", dict(prediction_type="v_prediction"), False, 4.6934e-07, 6.1112e-10, 1e-3),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True), False, 0.00015, 1.9869554535034695e-07, 1e-2),
    ("KDPM2DiscreteScheduler", {}, False, 20.4125, 0.0266, 1e-3),
    ("KDPM2DiscreteScheduler", dict(prediction_type="v_prediction"), False, 4.6934e-07, 6.1112e-10, 1e-3),
    ("KDPM2DiscreteScheduler", {}, True, 70408.4062, 91.6776, 1e-3),
    ("KDPM2AncestralDiscreteScheduler", {}, False, 13979.9433, 18.2030, 5e-3),
    ("KDPM2AncestralDiscreteScheduler", dict(prediction_type="v_prediction"), False, 331.8133, 0.4320, 1e-3),
    ("KDPM2AncestralDiscreteScheduler", {}, True, 93087.3437, 121.2074, 5e-3),
]


@pytest.mark.parametrize("name, options, with_noise, expected_sum, expected_mean, mean_tol", EXPECTED)
def test_diffusers_full_loop_sums(name, options, with_noise, expected_sum, expected_mean, mean_tol):
    """diffusers' loop as its tests write it: the scaled input replaces the sample, model(x, t) = x * t / (t + 1),
    ``torch.manual_seed(0)`` as the generator of the ancestral sampler."""
    scheduler = getattr(md, name)(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, **options)
    scheduler.set_timesteps(10)
    generator = torch.manual_seed(0)
    sample = deterministic_sample() * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if with_noise:
        timesteps = timesteps[8 * scheduler.order:]
        sample = scheduler.add_noise(sample, deterministic_sample(flip=True), timesteps[:1])
    kwargs = {"generator": generator} if name == "KDPM2AncestralDiscreteScheduler" else {}
    for t in timesteps:
        sample = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(sample * t / (t + 1), t, sample, **kwargs).prev_sample
    result_sum, result_mean = sample.abs().sum().item(), sample.abs().mean().item()
    compare(name, "diffusers' expected full-loop sums", torch.tensor(result_sum), torch.tensor(expected_sum), 1e-2,
            "abs")
    assert abs(result_mean - expected_mean) < mean_tol


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_heun_custom_timesteps(prediction_type):
    """``set_timesteps(timesteps=[...])``: an uneven custom schedule, doubled as Heun's own (diffusers' test)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    mine, ref = md.HeunDiscreteScheduler(**config), diffusers.HeunDiscreteScheduler(**config)
    run_custom_schedule(mine, ref, f"custom timesteps ({prediction_type})", timesteps=[999, 850.5, 600, 301, 120, 15])
