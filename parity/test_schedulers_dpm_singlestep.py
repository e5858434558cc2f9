"""Parity of DPM-Solver singlestep with diffusers 0.42.1's ``DPMSolverSinglestepScheduler``.

Both get the same config and toy model (parity/test_schedulers_sigma.py); "sde-dpmsolver++" gets two generators
with the same seed. Every call's ``prev_sample`` and x0 (diffusers returns none: the x0 is what it stored in
``model_outputs``, turned from eps with its own alpha_t, sigma_t for "dpmsolver") must agree to 1e-6 relative;
timesteps, sigmas and the order of each call must be equal. Plus diffusers' own full-loop means
(tests/schedulers/test_scheduler_dpm_single.py).
"""

from __future__ import annotations

import logging

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler
from parity.report import compare, compare_exact
from parity.test_schedulers_sigma import (
    BETA_TIMESTEP_TOL,
    BETAS,
    SIGMA_SPACING,
    TOL,
    compare_step,
    diffusers_test_model,
    diffusers_test_sample,
    start_sample,
    toy_model,
)

NAME = "DPMSolverSinglestepScheduler"
HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True)
logging.getLogger("diffusers").setLevel(logging.ERROR)  # the lower_order_final rewrite warning


def build_pair(config: dict, num_inference_steps: int | None = None, timesteps: list[int] | None = None):
    """Both schedulers from one config, with schedules and order lists compared."""
    mine, ref = DPMSolverSinglestepScheduler(**config), diffusers.DPMSolverSinglestepScheduler(**config)
    mine.set_timesteps(num_inference_steps, timesteps=timesteps)
    ref.set_timesteps(num_inference_steps, timesteps=timesteps)
    if config.get("use_beta_sigmas"):  # minidiff's own Beta quantiles: the found-back timesteps agree to rounding
        compare(NAME, "timesteps (beta sigmas)", mine.timesteps, ref.timesteps, BETA_TIMESTEP_TOL)
    else:
        compare_exact(NAME, "timesteps", mine.timesteps, ref.timesteps)
    compare_exact(NAME, "sigmas", mine.sigmas, ref.sigmas)
    compare_exact(NAME, "order_list", torch.tensor(mine.order_list), torch.tensor(ref.order_list))
    return mine, ref


def reference_x0(ref, x_ref: torch.Tensor) -> torch.Tensor:
    stored = ref.model_outputs[-1]
    if ref.config.algorithm_type != "dpmsolver":
        return stored
    alpha_t, sigma_t = ref._sigma_to_alpha_sigma_t(ref.sigmas[ref.step_index - 1])
    return (x_ref - sigma_t * stored) / alpha_t


def run_side_by_side(case: str, mine, ref, seed: int = 0, begin: int = 0) -> None:
    """Walk both over ``timesteps[begin:]`` (img2img starts mid-group), comparing every call. Where diffusers
    runs off its schedule (a repeated first timestep), minidiff must refuse the same call."""
    x_mine = x_ref = start_sample()
    gen_mine, gen_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for t in ref.timesteps[begin:]:
        try:
            out_ref = ref.step(toy_model(x_ref, t), t, x_ref, generator=gen_ref)
        except IndexError:  # cosine + Karras: rounding repeats the first timestep, the lookup starts at its 2nd copy
            with pytest.raises(RuntimeError, match="already took all"):
                mine.step(toy_model(x_mine, t), t, x_mine, generator=gen_mine)
            break
        out_mine = mine.step(toy_model(x_mine, t), t, x_mine, generator=gen_mine)
        compare_step(NAME, f"{case}: prev_sample", out_mine.prev_sample, out_ref.prev_sample)
        compare_step(NAME, f"{case}: pred_original_sample", out_mine.pred_original_sample, reference_x0(ref, x_ref))
        x_mine, x_ref = out_mine.prev_sample, out_ref.prev_sample


@st.composite
def singlestep_options(draw) -> dict:
    schedule = draw(st.sampled_from(sorted(BETAS)))
    algorithm = draw(st.sampled_from(["dpmsolver++", "dpmsolver", "sde-dpmsolver++"]))
    options = dict(
        num_train_timesteps=draw(st.sampled_from([1000, 1100, 500])),
        beta_schedule=schedule,
        beta_start=BETAS[schedule][0],
        beta_end=BETAS[schedule][1],
        prediction_type=draw(st.sampled_from(["epsilon", "v_prediction", "sample"])),
        algorithm_type=algorithm,
        solver_order=draw(st.sampled_from([1, 2, 3])),
        solver_type=draw(st.sampled_from(["midpoint", "heun"])),
        lower_order_final=draw(st.booleans()),
        **draw(SIGMA_SPACING),
        final_sigmas_type="sigma_min" if algorithm == "dpmsolver" else draw(st.sampled_from(["zero", "sigma_min"])),
        lambda_min_clipped=draw(st.sampled_from([-float("inf"), -5.1])),
        thresholding=algorithm != "dpmsolver" and draw(st.booleans()),  # diffusers fails on dpmsolver + thresholding
    )
    if options["thresholding"]:
        options.update(dynamic_thresholding_ratio=draw(st.sampled_from([0.995, 0.87])),
                       sample_max_value=draw(st.sampled_from([1.0, 0.5, 2.0])))
    return options


@HYPOTHESIS
@given(singlestep_options(), st.integers(1, 25), st.integers(0, 2**16))
def test_trajectories(config, num_inference_steps, seed):
    mine, ref = build_pair(config, num_inference_steps)
    run_side_by_side("drawn configs", mine, ref, seed)


ORDERS = [(order, solver_type) for order in (1, 2, 3) for solver_type in ("midpoint", "heun")]


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])
@pytest.mark.parametrize("order, solver_type", ORDERS)
def test_every_order_and_solver_type(algorithm, order, solver_type):
    """Fixed coverage: each algorithm x order x solver type, 12 steps (whole groups), ending at sigma_min."""
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type, final_sigmas_type="sigma_min")
    run_side_by_side("fixed grid", *build_pair(config, 12))


@pytest.mark.parametrize("begin", [1, 2, 4])
def test_starting_mid_group(begin):
    """img2img starts at any timestep: diffusers lowers the order until the history suffices."""
    mine, ref = build_pair(dict(solver_order=3, final_sigmas_type="sigma_min"), 12)
    run_side_by_side("starting mid-group", mine, ref, begin=begin)


@pytest.mark.parametrize("timesteps", [[999, 800, 600, 400, 200, 1], [901, 500, 10], [3]])
def test_custom_timesteps(timesteps):
    run_side_by_side("custom timesteps", *build_pair(dict(solver_order=3), timesteps=timesteps))


def test_repeated_set_timesteps_follows_the_first_forced_rewrite_only_in_diffusers():
    """The one documented difference: diffusers' rewrite of lower_order_final sticks in its config."""
    mine, ref = build_pair(dict(final_sigmas_type="sigma_min"), 5)  # 5 % 2 != 0: both lower the last call
    assert ref.config.lower_order_final and not mine.config.lower_order_final
    mine.set_timesteps(6)
    ref.set_timesteps(6)
    assert mine.order_list == [1, 2, 1, 2, 1, 2] and ref.order_list == [1, 2, 1, 2, 1, 1]


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_half_precision(algorithm):
    """diffusers' test_fp16_support loop (thresholding on, float16 sample and output) against minidiff's."""
    config = dict(algorithm_type=algorithm, solver_order=3, thresholding=True)
    mine, ref = build_pair(config, 10)
    x_mine = x_ref = diffusers_test_sample().half()
    gen_mine, gen_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in ref.timesteps:
        x_ref = ref.step(diffusers_test_model(x_ref, t), t, x_ref, generator=gen_ref).prev_sample
        x_mine = mine.step(diffusers_test_model(x_mine, t), t, x_mine, generator=gen_mine).prev_sample
        assert x_mine.dtype == x_ref.dtype == torch.float16
        compare(NAME, "float16: prev_sample", x_mine, x_ref, TOL)


def test_add_noise():
    mine, ref = build_pair({}, 10)
    x0, noise = start_sample(0), start_sample(1)
    t = mine.timesteps[3:4]
    compare(NAME, "add_noise", mine.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), TOL)


# ---- diffusers' own expected values (tests/schedulers/test_scheduler_dpm_single.py) ---------------------------------
# Their test config omits final_sigmas_type; their expected numbers are those of final_sigmas_type="sigma_min" (with
# 0.42.1's default "zero" diffusers itself gives e.g. 0.2278 instead of 0.2791), so it is set here.
TEST_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                   solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0,
                   algorithm_type="dpmsolver++", solver_type="midpoint", lambda_min_clipped=-float("inf"),
                   variance_type=None, final_sigmas_type="sigma_min")


def full_loop(cls, config: dict, num_inference_steps: int, begin: int, noised: bool) -> torch.Tensor:
    """Their full_loop (from timesteps[begin:]); ``noised``: test_full_loop_with_noise's add_noise first."""
    scheduler = cls(**{**TEST_CONFIG, **config})
    scheduler.set_timesteps(num_inference_steps)
    sample, timesteps = diffusers_test_sample(), scheduler.timesteps[begin:]
    if noised:
        sample = scheduler.add_noise(sample, diffusers_test_sample(flip=True), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(diffusers_test_model(sample, t), t, sample).prev_sample
    return sample


KARRAS, V = dict(use_karras_sigmas=True), dict(prediction_type="v_prediction")
# (test, config, steps, begin, add noise, statistic, expected, tolerance)
DIFFUSERS_EXPECTED = [
    ("full_loop_no_noise", {}, 10, 0, False, "mean", 0.2791, 1e-3),
    ("full_loop_with_karras", KARRAS, 10, 0, False, "mean", 0.2248, 1e-3),
    ("full_loop_with_v_prediction", V, 10, 0, False, "mean", 0.1453, 1e-3),
    ("full_loop_with_karras_and_v_prediction", dict(KARRAS, **V), 10, 0, False, "mean", 0.0649, 1e-3),
    ("full_uneven_loop", {}, 50, 3, False, "mean", 0.2574, 1e-3),
    ("full_loop_with_noise", {}, 10, 5, True, "sum", 269.2187, 1e-2),
    ("full_loop_with_noise", {}, 10, 5, True, "mean", 0.3505, 1e-3),
]


@pytest.mark.parametrize("test, config, steps, begin, noised, statistic, expected, tolerance", DIFFUSERS_EXPECTED,
                         ids=[f"{row[0]}-{row[5]}" for row in DIFFUSERS_EXPECTED])
def test_diffusers_expected_values(test, config, steps, begin, noised, statistic, expected, tolerance):
    mine = full_loop(DPMSolverSinglestepScheduler, config, steps, begin, noised)
    ref = full_loop(diffusers.DPMSolverSinglestepScheduler, config, steps, begin, noised)
    value = (mine.abs().sum() if statistic == "sum" else mine.abs().mean()).item()
    assert abs(value - expected) < tolerance, f"{test}: {statistic} {value} vs diffusers' {expected}"
    compare(NAME, f"diffusers test {test}: final sample", mine, ref, TOL)
