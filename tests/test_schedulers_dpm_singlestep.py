"""DPM-Solver singlestep on its own: order lists, the cached group start, round trips and errors."""

from __future__ import annotations

import pytest
import torch

from minidiff.schedulers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from minidiff.schedulers.dpm_solver import first_order_update
from minidiff.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler, get_order_list
from minidiff.schedulers.vp_solver import noise_level

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def toy_model(x, t):
    return 0.5 * torch.tanh(x) + 0.01 * float(t) / 1000


def sample(seed=0):
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def run(scheduler, x, **step_kwargs):
    outputs = []
    for t in scheduler.timesteps:
        out = scheduler.step(toy_model(x, t), t, x, **step_kwargs)
        outputs.append(out)
        x = out.prev_sample
    return x, outputs


@pytest.mark.parametrize("steps, order, lower, final, expected", [
    (6, 3, False, "sigma_min", [1, 2, 3, 1, 2, 3]),
    (6, 3, True, "sigma_min", [1, 2, 3, 1, 2, 1]),
    (7, 3, False, "sigma_min", [1, 2, 3, 1, 2, 3, 1]),  # uneven: lowered whatever lower_order_final says
    (8, 3, False, "sigma_min", [1, 2, 3, 1, 2, 3, 1, 2]),
    (8, 3, False, "zero", [1, 2, 3, 1, 2, 3, 1, 1]),  # ending at sigma = 0: last call first order
    (4, 2, False, "sigma_min", [1, 2, 1, 2]),
    (4, 2, True, "sigma_min", [1, 2, 1, 1]),
    (1, 2, False, "sigma_min", [1]),
    (3, 1, False, "zero", [1, 1, 1]),
])
def test_order_list(steps, order, lower, final, expected):
    assert get_order_list(steps, order, lower, final) == expected


def test_set_timesteps_does_not_rewrite_lower_order_final():
    scheduler = DPMSolverSinglestepScheduler(final_sigmas_type="sigma_min")
    scheduler.set_timesteps(5)
    assert scheduler.order_list == [1, 2, 1, 2, 1] and not scheduler.config.lower_order_final
    scheduler.set_timesteps(6)
    assert scheduler.order_list == [1, 2, 1, 2, 1, 2]


def test_schedule_is_linspace_ending_above_zero():
    scheduler = DPMSolverSinglestepScheduler(**SD)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [999, 799, 599, 400, 200]
    assert scheduler.sigmas[-1] == 0 and torch.all(scheduler.sigmas[1:] < scheduler.sigmas[:-1])
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1


def test_every_call_of_a_group_starts_from_the_cached_sample():
    """With x0-predicting models the converted output ignores the sample, so a second-order call gives the same
    result whatever sample it is handed: it steps from the group start cached by the first call."""
    results = []
    for offset in (0.0, 1.0):
        scheduler = DPMSolverSinglestepScheduler(prediction_type="sample", final_sigmas_type="sigma_min")
        scheduler.set_timesteps(4)
        x = sample()
        t0, t1 = scheduler.timesteps[:2]
        x1 = scheduler.step(toy_model(x, t0), t0, x).prev_sample
        first = noise_level(scheduler.sigmas[0]), noise_level(scheduler.sigmas[1])
        assert torch.equal(x1, first_order_update("dpmsolver++", x, scheduler.model_outputs[-1], *first))
        results.append(scheduler.step(toy_model(x1, t1), t1, x1 + offset).prev_sample)
        assert torch.equal(scheduler.sample, x)
    assert torch.equal(*results)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_full_runs_are_finite_and_seeded(algorithm, order):
    config = dict(algorithm_type=algorithm, solver_order=order, final_sigmas_type="sigma_min")
    results = []
    for _ in range(2):
        scheduler = DPMSolverSinglestepScheduler(**config)
        scheduler.set_timesteps(9)
        results.append(run(scheduler, sample(), generator=torch.Generator().manual_seed(3))[0])
    assert torch.isfinite(results[0]).all() and torch.equal(*results)


def test_half_precision_stays_half():
    scheduler = DPMSolverSinglestepScheduler(thresholding=True)
    scheduler.set_timesteps(10)
    assert run(scheduler, sample().half())[0].dtype == torch.float16


def test_custom_timesteps():
    scheduler = DPMSolverSinglestepScheduler(solver_order=3)
    scheduler.set_timesteps(timesteps=[900, 500, 100, 10])
    assert scheduler.timesteps.tolist() == [900, 500, 100, 10] and scheduler.num_inference_steps == 4
    assert scheduler.order_list == [1, 2, 3, 1]
    assert torch.isfinite(run(scheduler, sample())[0]).all()


def test_return_dict_false_is_a_one_tuple():
    scheduler = DPMSolverSinglestepScheduler()
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    out = scheduler.step(toy_model(sample(), t), t, sample(), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1


def test_config_round_trip(tmp_path):
    scheduler = DPMSolverSinglestepScheduler(num_train_timesteps=500, solver_order=3, prediction_type="v_prediction",
                                             lower_order_final=True, **SD)
    scheduler.save_pretrained(tmp_path)
    loaded = DPMSolverSinglestepScheduler.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == scheduler.config.to_dict()
    scheduler.set_timesteps(7)
    loaded.set_timesteps(7)
    assert torch.equal(loaded.timesteps, scheduler.timesteps) and torch.equal(loaded.sigmas, scheduler.sigmas)


def test_from_other_schedulers_configs_keeps_their_keys_but_stays_linspace():
    euler = EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    single = DPMSolverSinglestepScheduler.from_config(euler.config)
    single.set_timesteps(5)
    assert single.timesteps.tolist() == [999, 799, 599, 400, 200]
    assert DPMSolverMultistepScheduler.from_config(single.config).config.timestep_spacing == "leading"
    assert DPMSolverSinglestepScheduler(solver_type="bh2", algorithm_type="deis").config.algorithm_type == "dpmsolver++"


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(solver_order=4), r"solver_order=4 is not supported"),
    (dict(algorithm_type="sde-dpmsolver"), r"algorithm_type='sde-dpmsolver' is not supported"),
    (dict(solver_type="euler"), r"solver_type='euler' is not supported"),
    (dict(final_sigmas_type="one"), r"final_sigmas_type='one' is not supported"),
    (dict(algorithm_type="dpmsolver"), r"final_sigmas_type='zero' needs algorithm_type"),
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True), r"thresholding=True with"),
    (dict(variance_type="learned_range"), r"variance_type='learned_range' is not supported"),
    (dict(use_flow_sigmas=True), r"use_flow_sigmas=True is not supported"),
    (dict(use_dynamic_shifting=True), r"use_dynamic_shifting=True is not supported"),
    (dict(prediction_type="flow_prediction"), r"prediction_type='flow_prediction' is not supported"),
    (dict(use_karras_sigmas=True, use_beta_sigmas=True), r"contradict each other"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        DPMSolverSinglestepScheduler(**options)


@pytest.mark.parametrize("args, kwargs, message", [
    ((), {}, r"exactly one of num_inference_steps or timesteps"),
    ((5,), dict(timesteps=[900, 100]), r"exactly one of num_inference_steps or timesteps"),
    ((), dict(timesteps=[100, 900]), r"custom timesteps must be strictly descending, got \[100, 900\]"),
    ((), dict(timesteps=[1000, 10]), r"custom timesteps must lie in \[0, 999\] \(num_train_timesteps=1000\)"),
    ((), dict(timesteps=[]), r"custom timesteps must be a non-empty 1-d list of numbers"),
    ((), dict(timesteps=[900.5, 10.0]), r"custom timesteps must be integers, got \[900.5, 10.0\]"),
    ((1001,), {}, r"num_inference_steps=1001 must be between 1 and"),
])
def test_bad_set_timesteps(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPMSolverSinglestepScheduler().set_timesteps(*args, **kwargs)


def test_custom_timesteps_refuse_respaced_sigmas():
    with pytest.raises(ValueError, match=r"custom timesteps cannot be combined with use_karras_sigmas=True"):
        DPMSolverSinglestepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 100])


def test_step_errors():
    scheduler = DPMSolverSinglestepScheduler()
    with pytest.raises(RuntimeError, match=r"before set_timesteps"):
        scheduler.step(sample(), 999, sample())
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match=r"not in the schedule"):
        scheduler.step(sample(), 3, sample())
    run(scheduler, sample())
    with pytest.raises(RuntimeError, match=r"already took all 2 steps"):
        scheduler.step(sample(), scheduler.timesteps[-1], sample())
