"""DEIS multistep on its own: the log-rho coefficients integrate their polynomials exactly, the schedule's final
sigma, config round trips, diffusers' renamed options and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.schedulers.deis import DEISMultistepScheduler, second_order_update, third_order_update
from minidiff.schedulers.dpm_solver import DPMSolverMultistepScheduler, first_order_update
from minidiff.schedulers.vp_solver import noise_level

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1)


def toy_model(x, t):
    return 0.5 * torch.tanh(x) + 0.01 * float(t) / 1000


def sample(seed=0):
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def run(scheduler, x):
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t), t, x).prev_sample
    return x


# ---- the update rules ----------------------------------------------------------------------------------------------
SIGMAS = torch.tensor([3.0, 1.7, 0.9, 0.45], dtype=torch.float64)  # s2, s1, s0, t on the sigma grid


def exact_step(x, poly, s0, t):
    """``x_t = alpha_t (x_s / alpha_s + int_{rho_s}^{rho_t} eps(rho) d rho)`` with eps a polynomial in log rho."""
    grid = np.linspace(float(s0.sigma / s0.alpha), float(t.sigma / t.alpha), 20001)  # trapezoid, float64
    values = np.polyval(poly, np.log(grid))
    integral = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)))
    return t.alpha * (x / s0.alpha + integral)


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_updates_integrate_polynomials_in_log_rho_exactly(degree):
    """Order k is exact when eps is a polynomial of degree < k in log rho (Zhang & Chen 2023, Eq. 15)."""
    s2, s1, s0, t = (noise_level(sigma) for sigma in SIGMAS)
    poly = [0.3, -0.7, 1.1][-(degree + 1):]
    eps = [torch.tensor(np.polyval(poly, np.log(float(s.sigma / s.alpha))), dtype=torch.float64) for s in (s0, s1, s2)]
    x = torch.tensor(0.25, dtype=torch.float64)
    expected = exact_step(x, poly, s0, t)
    results = {3: third_order_update(x, *eps, s0, s1, s2, t)}
    if degree <= 1:
        results[2] = second_order_update(x, eps[0], eps[1], s0, s1, t)
    if degree == 0:
        results[1] = first_order_update("dpmsolver", x, eps[0], s0, t)
    for order, result in results.items():
        torch.testing.assert_close(result, expected, rtol=1e-7, atol=1e-9, msg=f"order {order}")


def test_first_order_step_is_ddim():
    scheduler = DEISMultistepScheduler(solver_order=1)
    scheduler.set_timesteps(10)
    x = sample()
    t = scheduler.timesteps[0]
    out = scheduler.step(toy_model(x, t), t, x)
    s, nxt = noise_level(scheduler.sigmas[0]), noise_level(scheduler.sigmas[1])
    eps = (x - s.alpha * out.pred_original_sample) / s.sigma
    torch.testing.assert_close(out.prev_sample, nxt.alpha * out.pred_original_sample + nxt.sigma * eps,
                               rtol=1e-5, atol=1e-5)


def test_orders_share_the_first_step_and_differ_later():
    finals = []
    for order in (1, 2, 3):
        scheduler = DEISMultistepScheduler(solver_order=order, **SD)
        scheduler.set_timesteps(12)
        x = sample()
        t = scheduler.timesteps[0]
        first = scheduler.step(toy_model(x, t), t, x).prev_sample
        scheduler.set_timesteps(12)
        finals.append((first, run(scheduler, x)))
    assert torch.equal(finals[0][0], finals[1][0]) and torch.equal(finals[0][0], finals[2][0])
    assert not torch.allclose(finals[0][1], finals[1][1]) and not torch.allclose(finals[1][1], finals[2][1])


# ---- schedule and properties ---------------------------------------------------------------------------------------
def test_final_sigma_is_the_smallest_training_sigma_or_the_last_respaced_one():
    scheduler = DEISMultistepScheduler(**SD)
    scheduler.set_timesteps(10)
    a0 = scheduler.alphas_cumprod[0]
    assert len(scheduler.sigmas) == 11 and scheduler.sigmas[-1] == (((1 - a0) / a0) ** 0.5).float()
    karras = DEISMultistepScheduler(**SD, use_karras_sigmas=True)
    karras.set_timesteps(10)
    assert karras.sigmas[-1] == karras.sigmas[-2]


def test_vp_properties_and_one_tuple():
    scheduler = DEISMultistepScheduler()
    scheduler.set_timesteps(5)
    x = sample()
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]) is x
    assert len(scheduler.step(toy_model(x, 999), scheduler.timesteps[0], x, return_dict=False)) == 1


def test_half_precision_stays_half():
    scheduler = DEISMultistepScheduler(solver_order=3, **SD)
    scheduler.set_timesteps(6)
    assert run(scheduler, sample().half()).dtype == torch.float16


def test_set_timesteps_restarts_the_history():
    scheduler = DEISMultistepScheduler(solver_order=3, **SD)
    scheduler.set_timesteps(8)
    first = run(scheduler, sample())
    scheduler.set_timesteps(8)
    assert torch.equal(run(scheduler, sample()), first)


# ---- configs --------------------------------------------------------------------------------------------------------
def test_save_pretrained_and_from_config_round_trip(tmp_path):
    scheduler = DEISMultistepScheduler(**SD, solver_order=3, use_karras_sigmas=True, thresholding=True)
    scheduler.save_pretrained(tmp_path)
    loaded = DEISMultistepScheduler.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == scheduler.config.to_dict()
    assert dict(DEISMultistepScheduler.from_config(scheduler.config).config) == dict(scheduler.config)
    for s in (scheduler, loaded):
        s.set_timesteps(9)
    assert torch.equal(run(scheduler, sample()), run(loaded, sample()))


def test_dpm_solver_names_are_renamed_as_diffusers_does():
    dpm = DPMSolverMultistepScheduler(**SD, solver_type="heun")
    deis = DEISMultistepScheduler.from_config(dpm.config)
    assert deis.config.algorithm_type == "deis" and deis.config.solver_type == "logrho"
    assert deis.config.beta_schedule == "scaled_linear" and deis.config.steps_offset == 1
    assert DEISMultistepScheduler(algorithm_type="dpmsolver", solver_type="bh2").config.solver_type == "logrho"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(solver_order=4), r"solver_order=4 is not supported; accepted values: 1, 2, 3"),
        (dict(solver_order=0), r"solver_order=0 is not supported"),
        (dict(algorithm_type="sde-dpmsolver++"), r"algorithm_type='sde-dpmsolver\+\+'.*'deis'"),
        (dict(solver_type="bh3"), r"solver_type='bh3'.*'logrho'"),
        (dict(prediction_type="flow_prediction"), r"prediction_type='flow_prediction'"),
        (dict(use_flow_sigmas=True), r"use_flow_sigmas=True is not supported by minidiff"),
        (dict(flow_shift=3.0), r"flow_shift=3.0 is not supported by minidiff"),
        (dict(use_dynamic_shifting=True), r"use_dynamic_shifting=True is not supported by minidiff"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), r"use_karras_sigmas"),
        (dict(sample_max_value=0.0), r"sample_max_value=0.0 must be > 0"),
        (dict(beta_schedule="cubic"), r"beta_schedule='cubic'"),
    ],
)
def test_bad_options_are_clear_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        DEISMultistepScheduler(**options)


def test_bad_steps():
    scheduler = DEISMultistepScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    x = run(scheduler, sample())
    with pytest.raises(RuntimeError, match="already took all 2 steps"):
        scheduler.step(toy_model(x, 0), scheduler.timesteps[-1], x)
