"""Parity of the consistency schedulers (LCM, TCD) with diffusers 0.42.1.

Both libraries get the same config and schedule arguments (original_inference_steps, strength, custom timesteps),
the same toy model and generators with the same seed; their trajectories run side by side and every step's
``prev_sample`` and ``denoised`` / ``pred_noised_sample`` must agree to 1e-6 relative; timesteps must be equal.
Also diffusers' own expected full-loop sums (tests/schedulers/test_scheduler_lcm.py, test_scheduler_tcd.py).
"""

from __future__ import annotations

import logging

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.schedulers.lcm import LCMScheduler
from minidiff.schedulers.tcd import TCDScheduler
from parity.report import compare, compare_exact
from parity.test_schedulers_alpha import (
    config_keys_and_defaults,
    diffusers_test_model,
    diffusers_test_sample,
    start_sample,
    toy_model,
)

TOL = 1e-6
LCM, TCD = "LCMScheduler", "TCDScheduler"
MINE = {LCM: LCMScheduler, TCD: TCDScheduler}
DENOISED = {LCM: "denoised", TCD: "pred_noised_sample"}
pytestmark = pytest.mark.filterwarnings("ignore:.*custom timestep")
HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True)
logging.getLogger("diffusers").setLevel(logging.ERROR)  # custom-timestep warnings


def build_pair(name: str, config: dict, **schedule):
    mine, ref = MINE[name](**config), getattr(diffusers, name)(**config)
    mine.set_timesteps(**schedule)
    ref.set_timesteps(**schedule)
    compare_exact(name, "timesteps", mine.timesteps, ref.timesteps)
    return mine, ref


def run_side_by_side(name: str, case: str, mine, ref, step_kwargs=None, seed=0, begin_index=None):
    """Both schedulers over their timesteps (from ``begin_index`` when set, as img2img pipelines do), each on its
    own trajectory with its own same-seed generator; every step compared."""
    timesteps = ref.timesteps
    if begin_index is not None:
        mine.set_begin_index(begin_index)
        ref.set_begin_index(begin_index)
        timesteps = timesteps[begin_index:]
    x_mine = x_ref = start_sample(seed)
    g_mine, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for t in timesteps:
        out_mine = mine.step(toy_model(mine.scale_model_input(x_mine, t), t), t, x_mine, generator=g_mine,
                             **(step_kwargs or {}))
        out_ref = ref.step(toy_model(ref.scale_model_input(x_ref, t), t), t, x_ref, generator=g_ref,
                           **(step_kwargs or {}))
        compare(name, f"{case}: prev_sample", out_mine.prev_sample, out_ref.prev_sample, TOL)
        key = DENOISED[name]
        compare(name, f"{case}: {key}", getattr(out_mine, key), getattr(out_ref, key), TOL)
        x_mine, x_ref = out_mine.prev_sample, out_ref.prev_sample
    assert mine.step_index == ref.step_index
    # both generators consumed the same draws
    assert torch.equal(torch.randn(3, generator=g_mine), torch.randn(3, generator=g_ref))


@pytest.mark.parametrize("name", [LCM, TCD])
def test_config_fields_are_diffusers_keys_with_diffusers_defaults(name):
    assert config_keys_and_defaults(getattr(diffusers, name)) == dict(MINE[name].config_class())
    mine, ref = MINE[name](), getattr(diffusers, name)()
    compare(name, "default alphas_cumprod", mine.alphas_cumprod, ref.alphas_cumprod, TOL)


BETAS = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (0.0001, 0.02)}


@st.composite
def consistency_config(draw, clipping=True) -> dict:
    schedule = draw(st.sampled_from(sorted(BETAS)))
    config = dict(
        num_train_timesteps=draw(st.sampled_from([1000, 500])),
        beta_schedule=schedule,
        beta_start=BETAS[schedule][0],
        beta_end=BETAS[schedule][1],
        prediction_type=draw(st.sampled_from(["epsilon", "v_prediction", "sample"])),
        timestep_spacing=draw(st.sampled_from(["leading", "linspace", "trailing"])),
        original_inference_steps=draw(st.sampled_from([50, 8, 25, 100])),
        timestep_scaling=draw(st.sampled_from([10.0, 1.0, 3.7])),
        set_alpha_to_one=draw(st.booleans()),
    )
    if draw(st.booleans()):
        config["rescale_betas_zero_snr"] = True
        if config["prediction_type"] == "epsilon":  # no x0 from eps at zero SNR
            config["prediction_type"] = "v_prediction"
    if clipping:
        config.update(clip_sample=draw(st.booleans()), thresholding=draw(st.booleans()),
                      clip_sample_range=draw(st.sampled_from([1.0, 0.5])))
    return config


@st.composite
def schedule_args(draw, config: dict) -> dict:
    """num_inference_steps 1..8 and strength, kept to schedules diffusers accepts."""
    original = draw(st.sampled_from([None, config["original_inference_steps"], 20]))
    steps = original if original is not None else config["original_inference_steps"]
    strength = draw(st.sampled_from([1.0, 1.0, 0.6, 0.3]))
    most = min(8, max(1, int(steps * strength)))
    args = dict(num_inference_steps=draw(st.integers(1, most)), strength=strength)
    if original is not None:
        args["original_inference_steps"] = original
    return args


@HYPOTHESIS
@given(data=st.data(), config=consistency_config(), seed=st.integers(0, 2**16))
def test_lcm_trajectories(data, config, seed):
    args = data.draw(schedule_args(config))
    mine, ref = build_pair(LCM, config, **args)
    run_side_by_side(LCM, "drawn configs", mine, ref, seed=seed)


@HYPOTHESIS
@given(data=st.data(), config=consistency_config(clipping=False), eta=st.sampled_from([0.3, 0.0, 1.0, 0.7, 0.55]),
       seed=st.integers(0, 2**16))
def test_tcd_trajectories(data, config, eta, seed):
    args = data.draw(schedule_args(config))
    mine, ref = build_pair(TCD, config, **args)
    run_side_by_side(TCD, "drawn configs", mine, ref, step_kwargs={"eta": eta}, seed=seed)


@pytest.mark.parametrize("name", [LCM, TCD])
@pytest.mark.parametrize("timesteps", [[999, 759, 499, 259], [100, 87, 50, 1, 0], [640]])
def test_custom_timesteps(name, timesteps):
    mine, ref = build_pair(name, {}, timesteps=timesteps)
    run_side_by_side(name, "custom timesteps", mine, ref)


@pytest.mark.parametrize("name", [LCM, TCD])
def test_img2img_begin_index(name):
    """A pipeline that runs the tail of the schedule after set_begin_index (the SD img2img pattern)."""
    mine, ref = build_pair(name, {}, num_inference_steps=6)
    run_side_by_side(name, "set_begin_index(2)", mine, ref, begin_index=2)


@pytest.mark.parametrize("name", [LCM, TCD])
def test_previous_timestep_and_add_noise(name):
    mine, ref = build_pair(name, {}, timesteps=[100, 87, 50, 1, 0])
    for t in ref.timesteps:
        assert int(mine.previous_timestep(t)) == int(ref.previous_timestep(t))
    x, noise = start_sample(1), start_sample(2)
    t = torch.tensor([999, 87])
    compare(name, "add_noise", mine.add_noise(x, noise, t), ref.add_noise(x, noise, t), TOL)


# ---- diffusers' own test numbers -------------------------------------------------------------------------------------
# (scheduler, num_inference_steps, expected sum of |x|): LCM with torch.manual_seed(0)'s stream, TCD with eta = 0.
# diffusers' LCM 10-step value 280.5618 (marked "TODO: get expected sum" there) is not what diffusers 0.42.1 itself
# gives on CPU with torch 2.13 (197.7616, mean 0.2575): that row is checked against the installed diffusers only.
REFERENCE_SUMS = [
    (LCM, 1, 18.7097),
    (LCM, 10, None),
    (TCD, 1, 29.8715),
    (TCD, 10, 181.2040),
]


@pytest.mark.parametrize("name, steps, expected", REFERENCE_SUMS)
def test_diffusers_reference_sums(name, steps, expected):
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    results = []
    for scheduler in (MINE[name](**config), getattr(diffusers, name)(**config)):
        scheduler.set_timesteps(steps)
        sample, generator = diffusers_test_sample(), torch.Generator().manual_seed(0)
        step_kwargs = {"eta": 0.0} if name == TCD else {}
        for t in scheduler.timesteps:
            sample = scheduler.step(diffusers_test_model(sample, t), t, sample, generator=generator,
                                    **step_kwargs).prev_sample
        results.append(sample)
    mine, ref = results
    if expected is not None:
        compare(name, f"diffusers test sum {expected} ({steps} steps)", mine.abs().sum(), expected, 1e-2, metric="abs")
    compare(name, f"diffusers test loop vs diffusers ({steps} steps)", mine, ref, TOL)
