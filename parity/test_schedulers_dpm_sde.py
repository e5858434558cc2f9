"""Parity of DPMSolverSDEScheduler (DPM++ SDE) with diffusers 0.42.1 and of minidiff's Brownian interval with
torchsde's (a test dependency only): drawn configs, step counts and noise seeds with every model call's sample and
x0 estimate to 1e-6 relative, schedules exactly equal; the Brownian increments equal torchsde's bit for bit for
drawn intervals, seeds, shapes and query orders; an img2img start mid-schedule; diffusers' own expected sums."""

from __future__ import annotations

import random
import warnings

import diffusers
import pytest
import torch
import torchsde
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.schedulers.brownian import BrownianInterval, BrownianTreeNoiseSampler
from minidiff.schedulers.dpm_solver_sde import DPMSolverSDEScheduler
from parity.report import compare, compare_exact
from parity.test_schedulers_sigma import SIGMA_SPACING, common_options, run_side_by_side
from parity.test_schedulers_second_order import deterministic_sample

NAME = "DPMSolverSDEScheduler"
BETA_TIMESTEP_TOL = 1e-12


def build_pair(config: dict, num_inference_steps: int):
    """minidiff's and diffusers' scheduler from one config, with their schedules compared exactly."""
    mine, ref = DPMSolverSDEScheduler(**config), diffusers.DPMSolverSDEScheduler(**config)
    mine.set_timesteps(num_inference_steps)
    ref.set_timesteps(num_inference_steps)
    assert mine.timesteps.dtype == ref.timesteps.dtype == torch.float64
    if config.get("use_beta_sigmas"):
        # float64 timesteps from minidiff's own Beta quantiles (sigmas.beta_ppf) and scipy's: equal to ~1 ulp
        compare(NAME, "timesteps (beta sigmas, float64)", mine.timesteps, ref.timesteps, BETA_TIMESTEP_TOL)
    else:
        compare_exact(NAME, "timesteps", mine.timesteps, ref.timesteps)
    compare_exact(NAME, "sigmas", mine.sigmas, ref.sigmas)
    compare_exact(NAME, "init_noise_sigma", torch.as_tensor(mine.init_noise_sigma),
                  torch.as_tensor(ref.init_noise_sigma))
    return mine, ref


@st.composite
def sde_options(draw) -> dict:
    return dict(draw(common_options(("epsilon", "v_prediction"))), **draw(SIGMA_SPACING),
                noise_sampler_seed=draw(st.integers(0, 2**40)))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(config=sde_options(), num_inference_steps=st.integers(1, 20))
def test_trajectories(config, num_inference_steps):
    """minidiff's own Brownian path: diffusers' trajectory at every call (both at most float32 rounding apart)."""
    mine, ref = build_pair(config, num_inference_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde warns when exp(log(sigma)) rounds just outside its interval
        run_side_by_side(NAME, "trajectories", mine, ref)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**63 - 1), t0=st.floats(0.001, 2.0), length=st.floats(1e-3, 200.0),
       shape=st.sampled_from([(), (3,), (2, 3, 4, 4)]), order=st.randoms(use_true_random=False))
def test_brownian_interval_equals_torchsde(seed, t0, length, shape, order: random.Random):
    """The same entropy gives the same increments as torchsde.BrownianInterval(halfway_tree=True, tol=1e-6,
    pool_size=24) as diffusers builds it, for queries in and out of [t0, t1] in any order (exact equality)."""
    t0, t1 = torch.as_tensor(t0), torch.as_tensor(t0 + length)
    ref = torchsde.BrownianInterval(t0=t0, t1=t1, size=shape, dtype=torch.float32, device="cpu", entropy=seed,
                                    tol=1e-6, pool_size=24, halfway_tree=True)
    mine = BrownianInterval(t0, t1, shape, torch.float32, "cpu", entropy=seed)
    points = [float(t0) + length * order.uniform(-0.01, 1.01) for _ in range(24)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in zip(points[::2], points[1::2]):
            a, b = min(a, b), max(a, b)
            compare("BrownianInterval", "increments vs torchsde", mine(a, b), ref(a, b), 0.0, "abs")


def test_noise_sampler_equals_diffusers_batched_seeds():
    """A list of seeds gives one path per batch item, as diffusers' BatchedBrownianTree."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler as Reference

    x = torch.zeros(3, 2, 4)
    mine, ref = BrownianTreeNoiseSampler(x, 0.03, 14.6, [1, 2, 3]), Reference(x, 0.03, 14.6, [1, 2, 3])
    for sigma, sigma_next in [(14.6, 7.0), (7.0, 7.5), (0.5, 0.03), (3.0, 0.2)]:
        compare("BrownianTreeNoiseSampler", "batched seeds vs diffusers", mine(sigma, sigma_next),
                ref(sigma, sigma_next), 0.0, "abs")


def test_img2img_start_mid_schedule():
    """set_begin_index(t_start * order), as the img2img pipeline does, and add_noise at that timestep."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, noise_sampler_seed=7)
    mine, ref = build_pair(config, 10)
    start = 4 * mine.order
    for scheduler in (mine, ref):
        scheduler.set_begin_index(start)
    clean, noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)).chunk(2)
    t = ref.timesteps[start:start + 1]
    x_mine, x_ref = mine.add_noise(clean, noise, t), ref.add_noise(clean, noise, t)
    compare(NAME, "img2img: add_noise", x_mine, x_ref, 1e-6)
    run_side_by_side(NAME, "img2img trajectories", mine, ref, timesteps=ref.timesteps[start:], sample=x_ref)


def test_unseeded_path_follows_torch_global_seed():
    """noise_sampler_seed=None draws the path's entropy from torch's global generator, as diffusers does."""
    mine, ref = build_pair(dict(noise_sampler_seed=None), 4)
    sample = deterministic_sample()
    t = ref.timesteps[0]
    torch.manual_seed(5)
    out_ref = ref.step(0.1 * sample, t, sample).prev_sample
    torch.manual_seed(5)
    out_mine = mine.step(0.1 * sample, t, sample).prev_sample
    compare(NAME, "unseeded: same global seed", out_mine, out_ref, 1e-6)


# diffusers' tests/schedulers/test_scheduler_dpm_sde.py, its CPU branch (the noise differs on CUDA and MPS generators;
# T = 1100, linear 1e-4..0.02, noise_sampler_seed = 0, 10 steps): options, expected |sum|, |mean|, the mean's tolerance
EXPECTED = [
    ({}, 162.52383422851562, 0.211619570851326, 1e-3),
    (dict(prediction_type="v_prediction"), 119.8487548828125, 0.1560530662536621, 1e-3),
    (dict(use_karras_sigmas=True), 170.3135223388672, 0.23003872730981811, 1e-2),
]


@pytest.mark.parametrize("options, expected_sum, expected_mean, mean_tol", EXPECTED)
def test_diffusers_full_loop_sums(options, expected_sum, expected_mean, mean_tol):
    """diffusers' loop as its tests write it: the scaled input replaces the sample, model(x, t) = x * t / (t + 1)."""
    scheduler = DPMSolverSDEScheduler(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02,
                                      noise_sampler_seed=0, **options)
    scheduler.set_timesteps(10)
    sample = deterministic_sample() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sample = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(sample * t / (t + 1), t, sample).prev_sample
    result_sum, result_mean = sample.abs().sum().item(), sample.abs().mean().item()
    compare(NAME, "diffusers' expected full-loop sums", torch.tensor(result_sum), torch.tensor(expected_sum), 1e-2,
            "abs")
    assert abs(result_mean - expected_mean) < mean_tol
