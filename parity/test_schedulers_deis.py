"""Parity of the DEIS multistep scheduler (log-rho, orders 1-3) with diffusers 0.42.1.

Same method as parity/test_schedulers_sigma.py: one config, the same toy model, whole trajectories side by side,
every step's ``prev_sample``, x0 and stored eps within 1e-6 relative; timesteps and sigmas equal. diffusers' DEIS
step returns no ``pred_original_sample``: its x0 is read from ``convert_model_output`` as it returns
(:func:`step_recording_x0`), since recovering it from the stored eps is ill-conditioned at high noise.
diffusers' own full-loop expected values (tests/schedulers/test_scheduler_deis.py) are checked too.
"""

from __future__ import annotations

import logging
import sys

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.schedulers.deis import DEISMultistepScheduler
from parity.configs import assert_same_config, public
from parity.report import compare, compare_exact
from parity.test_schedulers_sigma import (
    SD,
    SIGMA_SPACING,
    TOL,
    common_options,
    compare_step,
    diffusers_keys_and_defaults,
    diffusers_test_model,
    diffusers_test_sample,
    start_sample,
    toy_model,
)

NAME = "DEISMultistepScheduler"
SD_BETAS_TRAILING = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
logging.getLogger("diffusers").setLevel(logging.ERROR)


@st.composite
def deis_options(draw) -> dict:
    options = dict(
        draw(common_options()),
        **draw(SIGMA_SPACING),
        solver_order=draw(st.sampled_from([1, 2, 3])),
        lower_order_final=draw(st.booleans()),
        thresholding=draw(st.booleans()),
    )
    if options["thresholding"]:
        options.update(dynamic_thresholding_ratio=draw(st.sampled_from([0.995, 0.87])),
                       sample_max_value=draw(st.sampled_from([1.0, 0.5, 2.0])))
    return options


def build_pair(config: dict, num_inference_steps: int):
    mine, ref = DEISMultistepScheduler(**config), diffusers.DEISMultistepScheduler(**config)
    mine.set_timesteps(num_inference_steps)
    ref.set_timesteps(num_inference_steps)
    compare_exact(NAME, "timesteps", mine.timesteps, ref.timesteps)
    compare_exact(NAME, "sigmas", mine.sigmas, ref.sigmas)
    return mine, ref


def step_recording_x0(ref, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' step, unmodified, and the x0 its ``convert_model_output`` computed (its local ``x0_pred``, read
    with a profile hook as the function returns; the step itself returns only eps-based ``prev_sample``). Recovering
    x0 from the stored eps instead loses ~1/alpha_t ulps (alpha_t ~ 1e-4 at t = 999 of the cosine schedule)."""
    recorded = {}
    code = diffusers.DEISMultistepScheduler.convert_model_output.__code__

    def hook(frame, event, arg):
        if event == "return" and frame.f_code is code:
            recorded["x0"] = frame.f_locals["x0_pred"]

    sys.setprofile(hook)
    try:
        prev_sample = ref.step(*args).prev_sample
    finally:
        sys.setprofile(None)
    return prev_sample, recorded["x0"]


def run_side_by_side(case: str, mine, ref, timesteps=None, sample=None) -> torch.Tensor:
    timesteps = ref.timesteps if timesteps is None else timesteps
    x_mine = x_ref = start_sample() if sample is None else sample
    for t in timesteps:
        in_mine, in_ref = mine.scale_model_input(x_mine, t), ref.scale_model_input(x_ref, t)
        compare_step(NAME, f"{case}: scale_model_input", in_mine, in_ref)
        try:
            prev_ref, x0_ref = step_recording_x0(ref, toy_model(in_ref, t), t, x_ref)
        except IndexError:  # a duplicated first timestep makes diffusers run off its sigmas on the last step
            with pytest.raises(RuntimeError, match="already took all"):
                mine.step(toy_model(in_mine, t), t, x_mine)
            break
        out_mine = mine.step(toy_model(in_mine, t), t, x_mine)
        compare_step(NAME, f"{case}: prev_sample", out_mine.prev_sample, prev_ref)
        compare_step(NAME, f"{case}: pred_original_sample", out_mine.pred_original_sample, x0_ref)
        compare_step(NAME, f"{case}: stored eps (model_outputs)", mine.model_outputs[-1], ref.model_outputs[-1])
        x_mine, x_ref = out_mine.prev_sample, prev_ref
    return x_mine


@settings(max_examples=40, deadline=None, derandomize=True)
@given(config=deis_options(), num_inference_steps=st.integers(1, 25))
def test_deis_trajectories(config, num_inference_steps):
    mine, ref = build_pair(config, num_inference_steps)
    run_side_by_side("trajectories", mine, ref)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", [{}, {"use_karras_sigmas": True}])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_named_configs(order, spacing, lower_order_final):
    """Stable Diffusion's schedule, each order, with and without Karras sigmas (whose last step repeats
    sigma_min) and lower-order final steps; 20 steps (>= 15: lower_order_final has no effect there) and 8."""
    config = dict(SD, **spacing, solver_order=order, lower_order_final=lower_order_final)
    for num_inference_steps in (8, 20):
        run_side_by_side("named configs", *build_pair(config, num_inference_steps))


def test_half_precision_trajectories():
    """fp16 samples: both compute in the sample's dtype (no float32 upcast, unlike DPM-Solver)."""
    mine, ref = build_pair(dict(SD, solver_order=3, thresholding=True, dynamic_thresholding_ratio=0.9), 10)
    assert run_side_by_side("fp16 trajectories", mine, ref, sample=start_sample().half()).dtype == torch.float16


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_start_mid_schedule(strength):
    mine, ref = build_pair(dict(SD, solver_order=3), 20)
    t_start = 20 - int(20 * strength)
    mine.set_begin_index(t_start)
    ref.set_begin_index(t_start)
    timesteps = ref.timesteps[t_start:]
    first = timesteps[:1].repeat(2)
    image, noise = start_sample(1), start_sample(2)
    noisy_mine, noisy_ref = mine.add_noise(image, noise, first), ref.add_noise(image, noise, first)
    compare(NAME, "img2img: add_noise at the begin index", noisy_mine, noisy_ref, TOL)
    run_side_by_side("img2img (set_begin_index)", mine, ref, timesteps=timesteps, sample=noisy_ref)


def test_add_noise_and_vp_schedule():
    mine, ref = build_pair(dict(SD_BETAS_TRAILING), 20)
    for attribute in ("alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
        compare(NAME, f"{attribute} (VP schedule)", getattr(mine, attribute), getattr(ref, attribute), TOL)
    timesteps = ref.timesteps[[0, 7, 19]]
    x0, noise = start_sample(3)[:1].repeat(3, 1, 1, 1), start_sample(4)[:1].repeat(3, 1, 1, 1)
    compare(NAME, "add_noise (inference schedule)", mine.add_noise(x0, noise, timesteps),
            ref.add_noise(x0, noise, timesteps), TOL)


# ---- configs across libraries ----------------------------------------------------------------------------------------
def test_config_fields_are_diffusers_keys_with_diffusers_defaults():
    assert diffusers_keys_and_defaults(diffusers.DEISMultistepScheduler) == dict(DEISMultistepScheduler.config_class())


def test_from_config_and_folders_across_libraries(tmp_path):
    config = dict(SD, solver_order=3, use_karras_sigmas=True, thresholding=True, lower_order_final=False)
    mine, ref = DEISMultistepScheduler(**config), diffusers.DEISMultistepScheduler(**config)
    assert_same_config(DEISMultistepScheduler.from_config(ref.config).config, ref.config)
    assert_same_config(diffusers.DEISMultistepScheduler.from_config(dict(mine.config)).config, ref.config)
    mine.save_pretrained(tmp_path / "mine")
    ref.save_pretrained(tmp_path / "ref")
    from_mine_folder = diffusers.DEISMultistepScheduler.from_pretrained(tmp_path / "mine")
    from_ref_folder = DEISMultistepScheduler.from_pretrained(tmp_path / "ref")
    assert public(from_mine_folder.config) == public(ref.config)
    assert public(from_ref_folder.config) == public(mine.config)
    from_ref_folder.set_timesteps(8)
    from_mine_folder.set_timesteps(8)
    run_side_by_side("built across libraries (from_config, folders)", from_ref_folder, from_mine_folder)


def test_from_a_dpm_solver_config():
    """A DPM-Solver++ config (as in a Stable Diffusion folder) swaps in: diffusers renames its algorithm and
    solver types to deis / logrho and ignores the keys DEIS lacks; so does minidiff."""
    dpm = diffusers.DPMSolverMultistepScheduler(**SD, solver_type="heun", final_sigmas_type="sigma_min")
    mine, ref = DEISMultistepScheduler.from_config(dpm.config), diffusers.DEISMultistepScheduler.from_config(dpm.config)
    assert_same_config(mine.config, ref.config)
    mine.set_timesteps(12)
    ref.set_timesteps(12)
    run_side_by_side("from a DPM-Solver config", mine, ref)


# ---- diffusers' own test loop and expected values (tests/schedulers/test_scheduler_deis.py) -------------------------
TEST_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2)


def full_loop(cls, config: dict, t_start: int | None) -> torch.Tensor:
    scheduler = cls(**{**TEST_CONFIG, **config})
    scheduler.set_timesteps(10)
    sample, timesteps = diffusers_test_sample(), scheduler.timesteps
    if t_start is not None:
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        sample = scheduler.add_noise(sample, diffusers_test_sample(flip=True), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(diffusers_test_model(sample, t), t, sample).prev_sample
    return sample


DIFFUSERS_EXPECTED = [
    ("full_loop_no_noise", {}, None, "mean", 0.23916, 1e-3),
    ("full_loop_with_v_prediction", dict(prediction_type="v_prediction"), None, "mean", 0.091, 1e-3),
    ("full_loop_with_noise (sum)", {}, 8, "sum", 315.3016, 1e-2),
    ("full_loop_with_noise (mean)", {}, 8, "mean", 0.41054, 1e-3),
]


@pytest.mark.parametrize("test, config, t_start, statistic, expected, tolerance", DIFFUSERS_EXPECTED,
                         ids=[row[0] for row in DIFFUSERS_EXPECTED])
def test_diffusers_expected_values(test, config, t_start, statistic, expected, tolerance):
    mine = full_loop(DEISMultistepScheduler, config, t_start)
    ref = full_loop(diffusers.DEISMultistepScheduler, config, t_start)
    value = mine.abs().sum() if statistic == "sum" else mine.abs().mean()
    assert abs(value.item() - expected) < tolerance, f"{test}: {statistic} {value.item()} vs diffusers' {expected}"
    compare(NAME, f"diffusers test {test}: final sample", mine, ref, TOL)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_diffusers_solver_order_loops(order, prediction_type):
    """diffusers' test_solver_order_and_type loops (no NaN there), here also compared with diffusers."""
    config = dict(solver_order=order, prediction_type=prediction_type)
    mine = full_loop(DEISMultistepScheduler, config, None)
    assert not torch.isnan(mine).any()
    compare(NAME, f"diffusers test solver_order_and_type order {order} {prediction_type}: final sample", mine,
            full_loop(diffusers.DEISMultistepScheduler, config, None), TOL)
