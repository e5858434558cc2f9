"""UniPCMultistepScheduler on its own: exactness on a constant-x0 model, its first order is DDIM / DPM-Solver++(1),
the corrector's bookkeeping, config round trips and bad input."""

from __future__ import annotations

import pytest
import torch

from minidiff.schedulers.dpm_solver import DPMSolverMultistepScheduler
from minidiff.schedulers.unipc import UniPCMultistepScheduler, bh_coefficients
from minidiff.schedulers.vp_solver import noise_level

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1)


def toy_model(x, t):
    return x * (0.5 + 0.4 * torch.cos(torch.as_tensor(float(t)) / 150)) + 0.1 * torch.sin(3 * x)


def sample(seed=0):
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def run(scheduler, steps, x=None, model=toy_model):
    scheduler.set_timesteps(steps)
    x = sample() if x is None else x
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_a_model_that_knows_x0_is_followed_exactly(order, predict_x0):
    """With x0 known (constant), every difference D_k is 0, UniP and UniC reduce to the exact exponential step, and
    the trajectory stays on ``x_t = alpha_t x0 + sigma_t eps`` down to x0 itself."""
    final = "zero" if predict_x0 else "sigma_min"
    scheduler = UniPCMultistepScheduler(**SD, solver_order=order, predict_x0=predict_x0, prediction_type="sample",
                                        final_sigmas_type=final)
    x0, eps = sample(1), sample(2)
    scheduler.set_timesteps(12)
    start = noise_level(scheduler.sigmas[0])
    result = run(scheduler, 12, start.alpha * x0 + start.sigma * eps, model=lambda x, t: x0)
    end = noise_level(scheduler.sigmas[-1])
    torch.testing.assert_close(result, end.alpha * x0 + end.sigma * eps, rtol=1e-5, atol=1e-5)


def test_first_order_without_corrector_is_dpm_solver_first_order():
    unipc = UniPCMultistepScheduler(**SD, solver_order=1, disable_corrector=list(range(10)))
    dpm = DPMSolverMultistepScheduler(**SD, solver_order=1)
    torch.testing.assert_close(run(unipc, 10), run(dpm, 10), rtol=1e-5, atol=1e-6)


def test_the_corrector_changes_the_result_and_disable_corrector_switches_it_off_per_step():
    with_corrector = run(UniPCMultistepScheduler(**SD), 8)
    some_off = run(UniPCMultistepScheduler(**SD, disable_corrector=[2, 5]), 8)
    assert not torch.allclose(with_corrector, some_off)
    assert run(UniPCMultistepScheduler(**SD, disable_corrector=[7, 100]), 8).equal(with_corrector)  # never applied


def test_order_two_rho_is_the_solution_of_the_system():
    """UniP-2's rho = 0.5 shortcut and UniC-1's rho = 0.5: the linear systems they stand for."""
    scheduler = UniPCMultistepScheduler(**SD)
    scheduler.set_timesteps(10)
    s1, s0, t = (noise_level(scheduler.sigmas[i]) for i in (2, 3, 4))
    m0, m1 = sample(1), sample(2)
    _, _, R, b, D = bh_coefficients(m0, [(m1, s1)], s0, t, 2, True, "bh2")
    assert D.shape == (2, 1, 3, 4, 4)
    rho = torch.linalg.solve(R[:-1, :-1], b[:-1])
    assert abs(rho.item() - 0.5) < 0.1  # 0.5 is the small-h limit diffusers uses
    assert torch.allclose(R[0], torch.ones(2))


def test_warm_up_order_and_lower_order_final():
    scheduler = UniPCMultistepScheduler(**SD, solver_order=3)
    scheduler.set_timesteps(6)
    orders, x = [], sample()
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t), t, x).prev_sample
        orders.append(scheduler.this_order)
    assert orders == [1, 2, 3, 3, 2, 1]
    assert torch.isfinite(x).all()


def test_set_timesteps_resets_the_history():
    scheduler = UniPCMultistepScheduler(**SD)
    first = run(scheduler, 5)
    assert scheduler.last_sample is not None and scheduler.step_index == 5
    assert run(scheduler, 5).equal(first)


def test_final_sigma_and_schedule():
    interpolated = UniPCMultistepScheduler(**SD, final_sigmas_type="sigma_min")
    interpolated.set_timesteps(10)
    alpha_bar_0 = interpolated.alphas_cumprod[0]
    assert torch.isclose(interpolated.sigmas[-1], ((1 - alpha_bar_0) / alpha_bar_0) ** 0.5)
    karras = UniPCMultistepScheduler(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    karras.set_timesteps(10)
    assert karras.sigmas[-1] == karras.sigmas[-2]  # the last respaced sigma repeated
    assert karras.timesteps.dtype == torch.int64 and len(karras.sigmas) == 11
    assert UniPCMultistepScheduler().init_noise_sigma == 1.0


def test_outputs_and_return_dict():
    scheduler = UniPCMultistepScheduler(**SD, predict_x0=False, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(4)
    x, t = sample(), scheduler.timesteps[0]
    out = scheduler.step(toy_model(x, t), t, x)
    level = noise_level(scheduler.sigmas[0])
    torch.testing.assert_close(out.pred_original_sample, (x - level.sigma * toy_model(x, t)) / level.alpha)
    assert isinstance(scheduler.step(toy_model(x, t), scheduler.timesteps[1], x, return_dict=False), tuple)


def test_half_precision_stays_half():
    assert run(UniPCMultistepScheduler(**SD, solver_order=3), 6, sample().half()).dtype == torch.float16


def test_config_round_trip(tmp_path):
    scheduler = UniPCMultistepScheduler(**SD, solver_order=3, disable_corrector=[0, 2], solver_type="bh1",
                                        final_sigmas_type="sigma_min", use_karras_sigmas=True, sigma_max=14.6)
    scheduler.save_pretrained(tmp_path)
    loaded = UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == scheduler.config.to_dict()
    assert run(loaded, 7).equal(run(scheduler, 7))
    assert UniPCMultistepScheduler.from_config(scheduler.config).config.disable_corrector == [0, 2]


def test_other_solvers_names_for_the_solver_type_mean_bh2():
    dpm = DPMSolverMultistepScheduler(**SD)
    assert UniPCMultistepScheduler.from_config(dpm.config).config.solver_type == "bh2"


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(solver_order=4), ValueError, r"solver_order=4 is not supported; accepted values: 1, 2, 3"),
        (dict(solver_order=0), ValueError, r"solver_order=0 is not supported"),
        (dict(solver_type="bh3"), ValueError, r"solver_type='bh3' is not supported; accepted values: 'bh1', 'bh2'"),
        (dict(disable_corrector=3), TypeError, r"disable_corrector=3 has the wrong type int; expected a list of int"),
        (dict(disable_corrector=[1.5]), TypeError, r"disable_corrector=\[1.5\] has the wrong type"),
        (dict(disable_corrector=[0, -1]), ValueError, r"disable_corrector=\[0, -1\] holds negative step indices"),
        (dict(solver_p="dpm"), ValueError, r"solver_p='dpm' is not supported by minidiff"),
        (dict(final_sigmas_type="one"), ValueError, r"final_sigmas_type='one' is not supported"),
        (dict(prediction_type="flow_prediction"), ValueError, r"prediction_type='flow_prediction' is not supported"),
        (dict(use_flow_sigmas=True), ValueError, r"use_flow_sigmas=True is not supported by minidiff"),
        (dict(use_dynamic_shifting=True), ValueError, r"use_dynamic_shifting=True is not supported"),
        (dict(shift_terminal=0.1), ValueError, r"shift_terminal=0.1 is not supported"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), ValueError, r"contradict each other"),
        (dict(thresholding=True, predict_x0=False, final_sigmas_type="sigma_min"), ValueError,
         r"thresholding=True needs predict_x0=True"),
        (dict(solver_type="bh1"), ValueError, r"solver_type='bh1' \(B\(h\) = h is infinite there\) gives a NaN"),
        (dict(predict_x0=False), ValueError, r"final_sigmas_type='zero' with predict_x0=False"),
        (dict(lower_order_final=False), ValueError, r"lower_order_final=False and solver_order=2"),
        (dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3),
         ValueError, r"use lower_order_final=True or solver_order <= 2"),
        (dict(sigma_min=1.0, sigma_max=0.5), ValueError, r"sigma_min=1.0 must be smaller than sigma_max=0.5"),
    ],
)
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        UniPCMultistepScheduler(**options)


def test_bad_steps():
    scheduler = UniPCMultistepScheduler()
    x = sample()
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="is not in the schedule"):
        scheduler.step(x, 3, x)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(x[:1], scheduler.timesteps[0], x)
    run(scheduler, 2)
    with pytest.raises(RuntimeError, match="already took all 2 steps"):
        scheduler.step(x, scheduler.timesteps[-1], x)
