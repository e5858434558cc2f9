"""Properties of the sigma schedulers (LMS, Euler, Euler ancestral, DPM-Solver) on their own, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.schedulers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
)
from minidiff.schedulers.lms import lms_coefficients
from minidiff.schedulers.sigmas import karras_sigmas, sigma_to_t

ALL = (LMSDiscreteScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler)
KARRAS = (LMSDiscreteScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def toy_model(x, t):
    return 0.5 * torch.tanh(x) + 0.01 * float(t) / 1000


def sample(seed=0):
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def run(scheduler, x, **step_kwargs):
    """A plain sampling loop; returns the final sample and the step outputs."""
    outputs = []
    for t in scheduler.timesteps:
        out = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs)
        outputs.append(out)
        x = out.prev_sample
    return x, outputs


# ---- the schedule ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, karras", [(cls, False) for cls in ALL] + [(cls, True) for cls in KARRAS])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_sigmas_decrease_to_zero(cls, karras, spacing):
    options = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, **SD)
    if karras:
        options["use_karras_sigmas"] = True
    scheduler = cls(**options)
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas
    assert len(scheduler.timesteps) == 12 and len(sigmas) == 13
    assert sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert torch.all(scheduler.timesteps[1:] <= scheduler.timesteps[:-1])


def test_euler_log_linear_ends_at_sigma_min_then_zero():
    scheduler = EulerDiscreteScheduler(interpolation_type="log_linear", **SD)
    scheduler.set_timesteps(5)
    train_sigma_min = ((1 - scheduler.alphas_cumprod[0]) / scheduler.alphas_cumprod[0]) ** 0.5
    assert len(scheduler.sigmas) == 7  # N + 1 log-spaced sigmas, then 0 (diffusers)
    torch.testing.assert_close(scheduler.sigmas[-2], train_sigma_min)
    assert scheduler.sigmas[-1] == 0


def test_final_sigma_min():
    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        scheduler = cls(final_sigmas_type="sigma_min")
        scheduler.set_timesteps(4)
        expected = ((1 - scheduler.alphas_cumprod[0]) / scheduler.alphas_cumprod[0]) ** 0.5
        assert scheduler.sigmas[-1] == expected


def test_karras_formula_and_sigma_to_t_inverts_the_training_schedule():
    sigmas = karras_sigmas(0.03, 14.6, 5, rho=7.0)
    ramp = np.linspace(0, 1, 5)
    np.testing.assert_allclose(sigmas, (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7)
    train_sigmas = ((1 - LMSDiscreteScheduler().alphas_cumprod) / LMSDiscreteScheduler().alphas_cumprod) ** 0.5
    log_sigmas = np.log(train_sigmas.numpy())
    np.testing.assert_allclose(sigma_to_t(train_sigmas.numpy()[[0, 10, 500, 999]], log_sigmas), [0, 10, 500, 999], atol=1e-4)


def test_init_noise_sigma():
    cases = [("linspace", lambda m: m), ("trailing", lambda m: m), ("leading", lambda m: (m**2 + 1) ** 0.5)]
    for spacing, expected in cases:
        scheduler = EulerDiscreteScheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(10)
        assert scheduler.init_noise_sigma == expected(scheduler.sigmas.max())
    assert DPMSolverMultistepScheduler().init_noise_sigma == 1.0


def test_rescale_zero_snr_keeps_the_last_sigma_finite():
    for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler):
        scheduler = cls(rescale_betas_zero_snr=True)
        assert scheduler.alphas_cumprod[-1] == 2**-24
        scheduler.set_timesteps(10)
        assert torch.isfinite(scheduler.sigmas).all()


# ---- model input and forward process -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LMSDiscreteScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_scale_model_input_is_x_over_sqrt_sigma_squared_plus_one(cls):
    scheduler = cls()
    scheduler.set_timesteps(7)
    x = sample()
    t = scheduler.timesteps[0]
    torch.testing.assert_close(scheduler.scale_model_input(x, t), x / (scheduler.sigmas[0] ** 2 + 1) ** 0.5)


def test_dpm_solver_feeds_the_model_unscaled():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(7)
    x = sample()
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]) is x
    assert scheduler.step_index is None  # the step index is found by step(), as in diffusers


@pytest.mark.parametrize("cls", [LMSDiscreteScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_add_noise_is_x_plus_sigma_eps(cls):
    scheduler = cls()
    scheduler.set_timesteps(10)
    x0, noise = sample(0), sample(1)
    t = scheduler.timesteps[[2, 5]]
    expected = x0 + noise * scheduler.sigmas[[2, 5]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), expected)


def test_dpm_add_noise_is_the_vp_forward_process_also_before_set_timesteps():
    # diffusers' DPM-Solver looks up its ascending training sigmas by position here (sigma of 999 - t);
    # minidiff keeps the sigma of t itself, so training-time add_noise is the DDPM forward process.
    scheduler = DPMSolverMultistepScheduler()
    x0, noise = sample(0), sample(1)
    t = torch.tensor([10, 700])
    alpha_bar = scheduler.alphas_cumprod[t].reshape(2, 1, 1, 1)
    expected = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), expected, rtol=1e-5, atol=1e-5)


def test_euler_get_velocity_reads_alpha_bar_by_schedule_position():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    x0, noise = sample(0), sample(1)
    t = scheduler.timesteps[[1, 3]]
    alpha_bar = scheduler.alphas_cumprod[[1, 3]].reshape(2, 1, 1, 1)  # positions 1 and 3 (diffusers' quirk)
    torch.testing.assert_close(scheduler.get_velocity(x0, noise, t), alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0)
    for cls in (LMSDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler):
        assert not hasattr(cls(), "get_velocity")  # none in diffusers either


# ---- the step-index machine --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_step_index_advances_and_resets(cls):
    scheduler = cls()
    scheduler.set_timesteps(6)
    assert scheduler.step_index is None and scheduler.begin_index is None
    x = sample()
    t = scheduler.timesteps[0]
    scheduler.step(toy_model(x, t), t, x)
    assert scheduler.step_index == 1
    scheduler.step(toy_model(x, t), scheduler.timesteps[1], x)  # the index advances whatever timestep is passed
    assert scheduler.step_index == 2
    scheduler.set_timesteps(6)
    assert scheduler.step_index is None


@pytest.mark.parametrize("cls", ALL)
def test_set_begin_index_starts_mid_schedule(cls):
    scheduler = cls()
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(4)
    x = sample()
    t = scheduler.timesteps[4]
    scheduler.step(toy_model(x, t), t, x)
    assert scheduler.begin_index == 4 and scheduler.step_index == 5


def test_duplicate_timestep_resolves_to_its_second_position():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    scheduler.timesteps = torch.tensor([999.0, 500.0, 500.0, 0.0])
    assert scheduler.index_for_timestep(torch.tensor(500.0)) == 2
    assert scheduler.index_for_timestep(999.0) == 0


@pytest.mark.parametrize("cls", ALL)
def test_last_step_lands_on_the_x0_estimate(cls):
    """With a final sigma of 0, the last Euler/ancestral/DPM step returns the x0 prediction; LMS lands on the
    multistep extrapolation, which for a constant derivative is the same."""
    scheduler = cls()
    scheduler.set_timesteps(1 if cls is LMSDiscreteScheduler else 5)
    x, outputs = run(scheduler, sample())
    torch.testing.assert_close(outputs[-1].prev_sample, outputs[-1].pred_original_sample, rtol=1e-5, atol=1e-5)


def test_euler_without_churn_ignores_the_generator_and_churn_adds_noise():
    runs = []
    for seed, churn in [(0, 0.0), (1, 0.0), (0, 1.0), (1, 1.0)]:
        scheduler = EulerDiscreteScheduler()
        scheduler.set_timesteps(5)
        runs.append(run(scheduler, sample(), generator=torch.Generator().manual_seed(seed), s_churn=churn)[0])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[2], runs[3])


def test_euler_ancestral_is_reproducible_with_a_seed():
    finals = []
    for seed in (3, 3, 4):
        scheduler = EulerAncestralDiscreteScheduler()
        scheduler.set_timesteps(5)
        finals.append(run(scheduler, sample(), generator=torch.Generator().manual_seed(seed))[0])
    assert torch.equal(finals[0], finals[1]) and not torch.equal(finals[0], finals[2])


def test_dpm_first_order_step_is_ddim():
    """DPM-Solver++(1) equals deterministic DDIM: x_t = alpha_t x0 + sigma_t eps, eps implied by x_s and x0."""
    scheduler = DPMSolverMultistepScheduler(solver_order=1)
    scheduler.set_timesteps(10)
    x = sample()
    t = scheduler.timesteps[0]
    out = scheduler.step(toy_model(x, t), t, x)
    s_sigma, t_sigma = scheduler.sigmas[0], scheduler.sigmas[1]
    a_s, a_t = 1 / (s_sigma**2 + 1) ** 0.5, 1 / (t_sigma**2 + 1) ** 0.5
    eps = (x - a_s * out.pred_original_sample) / (s_sigma * a_s)
    torch.testing.assert_close(out.prev_sample, a_t * out.pred_original_sample + t_sigma * a_t * eps, rtol=1e-5, atol=1e-5)


def test_dpm_return_dict_false_is_a_one_tuple_like_diffusers():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(3)
    x = sample()
    t = scheduler.timesteps[0]
    assert len(scheduler.step(toy_model(x, t), t, x, return_dict=False)) == 1


# ---- LMS coefficients --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_integrate_polynomials_exactly(order):
    sigmas = torch.tensor([14.6, 9.0, 5.5, 2.9, 1.2, 0.4, 0.0])
    i = 4
    coefficients = lms_coefficients(sigmas, i, order)
    nodes = [float(sigmas[i - k]) for k in range(order)]
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    # a constant derivative d moves x by (sigma_next - sigma) * d ...
    assert sum(coefficients) == pytest.approx(b - a, rel=1e-12)
    # ... and every polynomial of degree < order is integrated exactly
    for degree in range(order):
        exact = (b ** (degree + 1) - a ** (degree + 1)) / (degree + 1)
        assert sum(c * node**degree for c, node in zip(coefficients, nodes)) == pytest.approx(exact, rel=1e-10, abs=1e-12)


def test_lms_step_with_constant_derivative_is_an_euler_step():
    scheduler = LMSDiscreteScheduler()
    scheduler.set_timesteps(8)
    x = sample()
    derivative = torch.full_like(x, 0.3)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        eps = derivative  # epsilon prediction: d = (x - x0) / sigma = eps
        out = scheduler.step(eps, t, x)
        torch.testing.assert_close(out.prev_sample, x + (scheduler.sigmas[i + 1] - sigma) * derivative, rtol=1e-5, atol=1e-5)
        x = out.prev_sample


def test_lms_order_comes_from_the_step_index_and_zip_truncates():
    """Started mid-schedule, the first step computes order-4 coefficients but only one derivative exists:
    the update uses the first coefficient alone (diffusers)."""
    scheduler = LMSDiscreteScheduler()
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(5)
    x = sample()
    t = scheduler.timesteps[5]
    out = scheduler.step(toy_model(x, t), t, x)
    first = lms_coefficients(scheduler.sigmas, 5, 4)[0]
    torch.testing.assert_close(out.prev_sample, x + first * (x - out.pred_original_sample) / scheduler.sigmas[5])


# ---- configs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_config_round_trip(cls, tmp_path):
    scheduler = cls(num_train_timesteps=500, timestep_spacing="trailing", prediction_type="v_prediction", **SD)
    scheduler.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == scheduler.config.to_dict()
    assert cls.from_config(scheduler.config).config == scheduler.config
    assert loaded.num_train_timesteps == 500
    scheduler.set_timesteps(9)
    loaded.set_timesteps(9)
    assert torch.equal(loaded.timesteps, scheduler.timesteps) and torch.equal(loaded.sigmas, scheduler.sigmas)


def test_from_config_takes_other_schedulers_configs():
    euler = EulerDiscreteScheduler(**SD, steps_offset=1)
    dpm = DPMSolverMultistepScheduler.from_config(euler.config, use_karras_sigmas=True)
    assert dpm.config.beta_schedule == "scaled_linear" and dpm.config.steps_offset == 1 and dpm.config.use_karras_sigmas
    assert LMSDiscreteScheduler.from_config(dpm.config).config.beta_end == 0.012
    assert DPMSolverMultistepScheduler(solver_type="bh2", algorithm_type="deis").config.solver_type == "midpoint"


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, options, message",
    [
        (LMSDiscreteScheduler, dict(beta_schedul="linear"), "unknown config option.*beta_schedul"),
        (LMSDiscreteScheduler, dict(beta_schedule="cosine"), "beta_schedule='cosine' is not supported; accepted values"),
        (EulerDiscreteScheduler, dict(prediction_type="flow"), "prediction_type='flow'.*'epsilon'"),
        (EulerDiscreteScheduler, dict(timestep_spacing="uniform"), "timestep_spacing='uniform'.*'trailing'"),
        (EulerDiscreteScheduler, dict(interpolation_type="cubic"), "interpolation_type='cubic'.*'log_linear'"),
        (EulerDiscreteScheduler, dict(final_sigmas_type="one"), "final_sigmas_type='one'.*'sigma_min'"),
        (EulerDiscreteScheduler, dict(use_exponential_sigmas=True, use_beta_sigmas=True),
         "use_exponential_sigmas=True and use_beta_sigmas=True contradict each other"),
        (LMSDiscreteScheduler, dict(use_karras_sigmas=True, use_beta_sigmas=True), "set at most one of use_karras"),
        (EulerAncestralDiscreteScheduler, dict(prediction_type="sample"), "prediction_type='sample'.*'v_prediction'"),
        (DPMSolverMultistepScheduler, dict(algorithm_type="sde-deis"), "algorithm_type='sde-deis'.*'sde-dpmsolver'"),
        (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
         "'sde-dpmsolver' has no third-order update"),
        (DPMSolverMultistepScheduler, dict(solver_order=4), "solver_order=4.*1, 2, 3"),
        (DPMSolverMultistepScheduler, dict(solver_type="rk4"), "solver_type='rk4'.*'heun'"),
        (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver"), "final_sigmas_type='zero' needs algorithm_type"),
        (DPMSolverMultistepScheduler, dict(variance_type="learned"), "variance_type='learned' is not supported by minidiff"),
    ],
)
def test_bad_options(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


@pytest.mark.parametrize("cls", ALL)
def test_bad_step_counts(cls):
    scheduler = cls(num_train_timesteps=100)
    with pytest.raises(ValueError, match="num_inference_steps=0 must be between 1 and num_train_timesteps=100"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps=101 must be between 1"):
        scheduler.set_timesteps(101)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        scheduler.set_timesteps(2.5)


def test_step_before_set_timesteps():
    """LMS, Euler and Euler ancestral walk their training schedule then, as diffusers' do
    (parity/test_scheduler_training_schedule.py); DPM-Solver++ needs its step count."""
    x = sample()
    with pytest.raises(RuntimeError, match="step\\(\\) called before set_timesteps"):
        DPMSolverMultistepScheduler().step(x, 999, x)


@pytest.mark.parametrize("cls", ALL)
def test_timestep_not_in_schedule(cls):
    scheduler = cls()
    scheduler.set_timesteps(5)
    x = sample()
    with pytest.raises(ValueError, match="timestep 123.5 is not in the schedule of .* which holds \\[999"):
        scheduler.step(x, torch.tensor(123.5), x)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_euler_rejects_integer_timesteps(cls):
    scheduler = cls()
    scheduler.set_timesteps(5)
    x = sample()
    with pytest.raises(ValueError, match="integer timestep 0; pass the timestep itself .*not its index from enumerate"):
        scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="integer timestep"):
        scheduler.step(x, torch.tensor(999), x)


@pytest.mark.parametrize("cls", ALL)
def test_mismatched_shapes(cls):
    scheduler = cls()
    scheduler.set_timesteps(5)
    x = sample()
    with pytest.raises(ValueError, match="model_output has shape \\(2, 3, 4, 4\\) but sample has shape \\(2, 3, 4, 5\\)"):
        scheduler.step(x, scheduler.timesteps[0], torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="noise has shape \\(1, 3, 4, 4\\) but original_samples has shape"):
        scheduler.add_noise(x, x[:1], scheduler.timesteps[:1])


@pytest.mark.parametrize("cls", ALL)
def test_stepping_past_the_end(cls):
    scheduler = cls()
    scheduler.set_timesteps(2)
    x, _ = run(scheduler, sample())
    with pytest.raises(RuntimeError, match="already took all 2 steps; call set_timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x)
