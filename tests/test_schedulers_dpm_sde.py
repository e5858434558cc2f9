"""DPMSolverSDEScheduler (DPM++ SDE) and minidiff's Brownian interval on their own: the Brownian path's statistics
and consistency, the schedule's shape, seeded reproducibility, config round trips and errors."""

from __future__ import annotations

import math

import pytest
import torch

from minidiff.schedulers.brownian import BrownianInterval, BrownianTreeNoiseSampler
from minidiff.schedulers.dpm_solver_sde import DPMSolverSDEScheduler, log_sigma_midpoints

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# ---- the Brownian interval ---------------------------------------------------------------------------------------
def test_increments_are_gaussian_with_variance_the_interval_length():
    """Over 20000 independent coordinates, W(b) - W(a) has mean 0 and variance b - a (4-sigma bounds), and the
    increments over disjoint intervals are uncorrelated."""
    tree = BrownianInterval(0.1, 10.0, (20000,), entropy=3)
    for a, b in [(0.1, 10.0), (2.0, 2.5), (0.3, 0.30001), (7.25, 9.0)]:
        z = tree(a, b) / math.sqrt(b - a)
        n = z.numel()
        assert abs(z.mean().item()) < 4 / math.sqrt(n)
        assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)
    left, right = tree(1.0, 3.0), tree(3.0, 4.0)
    correlation = torch.corrcoef(torch.stack([left, right]))[0, 1].item()
    assert abs(correlation) < 4 / math.sqrt(20000)


def test_increments_add_up_along_the_path():
    """Bridge consistency: W(a, c) = W(a, b) + W(b, c), and the whole interval's increment is the root's."""
    tree = BrownianInterval(0.0, 1.0, (5, 3), entropy=11)
    whole = tree(0.0, 1.0)
    torch.testing.assert_close(tree(0.0, 0.37) + tree(0.37, 0.8) + tree(0.8, 1.0), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(tree(0.2, 0.45) + tree(0.45, 0.6), tree(0.2, 0.6), rtol=0, atol=1e-5)
    assert torch.equal(tree(0.5, 0.5), torch.zeros(5, 3))


def test_same_entropy_same_path_in_any_query_order():
    """The tree is dyadic (split at halves), so the path depends on the entropy only, not on which intervals were
    asked for first."""
    queries = [(0.2, 0.9), (0.01, 0.05), (0.5, 0.6), (0.9, 1.0), (0.33, 0.34)]
    forward = BrownianInterval(0.0, 1.0, (4,), entropy=5)
    backward = BrownianInterval(0.0, 1.0, (4,), entropy=5)
    first = [forward(a, b) for a, b in queries]
    second = [backward(a, b) for a, b in reversed(queries)][::-1]
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    other = BrownianInterval(0.0, 1.0, (4,), entropy=6)
    assert not torch.allclose(other(0.2, 0.9), first[0])


def test_small_cache_gives_the_same_values():
    """The memo only saves work: a one-entry cache recomputes the same increments."""
    big, small = BrownianInterval(0.0, 5.0, (3,), entropy=2), BrownianInterval(0.0, 5.0, (3,), entropy=2, cache_size=1)
    for a, b in [(1.0, 2.0), (0.1, 4.9), (1.0, 2.0), (3.3, 3.4)]:
        assert torch.equal(big(a, b), small(a, b))


def test_noise_sampler_is_standard_normal_and_batched_seeds_are_per_item():
    x = torch.zeros(2, 10000)
    sampler = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[4, 4])
    noise = sampler(14.6, 3.0)  # a step downwards in sigma
    assert noise.shape == x.shape and torch.equal(noise[0], noise[1])
    assert abs(noise.std().item() - 1) < 0.05
    single = BrownianTreeNoiseSampler(x[0], 0.03, 14.6, seed=4)
    assert torch.equal(single(14.6, 3.0), noise[0])
    assert torch.equal(single(3.0, 14.6), -noise[0])  # the reverse step sees the opposite increment


def test_brownian_bad_input():
    with pytest.raises(ValueError, match="t0 <= t1"):
        BrownianInterval(1.0, 0.5, (2,))
    with pytest.raises(ValueError, match="tol=0"):
        BrownianInterval(0.0, 1.0, (2,), tol=0)
    with pytest.raises(ValueError, match="ta <= tb"):
        BrownianInterval(0.0, 1.0, (2,), entropy=1)(0.7, 0.2)
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        BrownianTreeNoiseSampler(torch.zeros(3, 2), 0.1, 1.0, seed=[1, 2])


# ---- the scheduler -----------------------------------------------------------------------------------------------
def run(scheduler: DPMSolverSDEScheduler, steps: int = 6) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(0.3 * scheduler.scale_model_input(x, t), t, x).prev_sample
    return x


def test_schedule_is_doubled_with_midpoints():
    scheduler = DPMSolverSDEScheduler(**SD)
    assert scheduler.order == 2 and len(scheduler.timesteps) == 2 * 1000 - 1  # the full chain before set_timesteps
    scheduler.set_timesteps(5)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    assert len(sigmas) == 10 and len(timesteps) == 9 and timesteps.dtype == torch.float64
    assert sigmas[-1] == 0 and torch.equal(sigmas[1:-1:2], sigmas[2::2])
    levels = torch.cat([sigmas[:1], sigmas[2::2]]).double().numpy()  # the 5 levels
    midpoints = torch.from_numpy(log_sigma_midpoints(levels))
    torch.testing.assert_close(midpoints, (torch.from_numpy(levels[:-1]) * torch.from_numpy(levels[1:])).sqrt())
    assert (timesteps[:-1:2] > timesteps[1::2]).all() and (timesteps[1::2] > timesteps[2::2]).all()


def test_state_alternates_and_the_midpoint_scales_the_second_call():
    scheduler = DPMSolverSDEScheduler(noise_sampler_seed=1)
    scheduler.set_timesteps(3)
    x = torch.ones(1, 1, 2, 2)
    t0, t_mid = scheduler.timesteps[:2]
    assert scheduler.state_in_first_order
    x = scheduler.step(0.1 * x, t0, x).prev_sample
    assert not scheduler.state_in_first_order
    expected = x / (scheduler.mid_point_sigma**2 + 1) ** 0.5
    torch.testing.assert_close(scheduler.scale_model_input(x, t_mid), expected)
    assert scheduler.mid_point_sigma == pytest.approx((scheduler.sigmas[0] * scheduler.sigmas[1]).sqrt().item())


def test_seeded_runs_repeat_and_seeds_differ():
    a, b = run(DPMSolverSDEScheduler(noise_sampler_seed=9)), run(DPMSolverSDEScheduler(noise_sampler_seed=9))
    assert torch.equal(a, b)
    assert not torch.allclose(a, run(DPMSolverSDEScheduler(noise_sampler_seed=10)))
    torch.manual_seed(0)
    unseeded = run(DPMSolverSDEScheduler())
    torch.manual_seed(0)
    assert torch.equal(unseeded, run(DPMSolverSDEScheduler()))  # None: the path's seed comes from torch.manual_seed


def test_s_noise_zero_is_deterministic_and_the_last_step_lands_on_x0():
    scheduler = DPMSolverSDEScheduler(noise_sampler_seed=1)
    scheduler.set_timesteps(1)
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    out = scheduler.step(0.5 * x, scheduler.timesteps[0], x)
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample)  # one step, to sigma = 0: Euler onto x0
    first, second = (DPMSolverSDEScheduler(noise_sampler_seed=s) for s in (1, 2))
    for s in (first, second):
        s.set_timesteps(4)
    t = first.timesteps[0]
    torch.testing.assert_close(first.step(0.5 * x, t, x, s_noise=0.0).prev_sample,
                               second.step(0.5 * x, t, x, s_noise=0.0).prev_sample)


def test_config_round_trip(tmp_path):
    scheduler = DPMSolverSDEScheduler(num_train_timesteps=500, timestep_spacing="trailing", use_karras_sigmas=True,
                                      noise_sampler_seed=42, prediction_type="v_prediction", **SD)
    scheduler.save_pretrained(tmp_path)
    loaded = DPMSolverSDEScheduler.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == scheduler.config.to_dict() and loaded.noise_sampler_seed == 42
    assert DPMSolverSDEScheduler.from_config(scheduler.config).config == scheduler.config
    assert torch.equal(run(loaded, 4), run(scheduler, 4))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prediction_type="sample"), "prediction_type='sample'.*'v_prediction'"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "contradict each other"),
        (dict(timestep_spacing="uniform"), "timestep_spacing='uniform'"),
        (dict(beta_schedule="cosine"), "beta_schedule='cosine'"),
        (dict(noise_sampler_seed=-1), "noise_sampler_seed=-1 must be None or an int >= 0"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        DPMSolverSDEScheduler(**options)


def test_seed_of_the_wrong_type():
    with pytest.raises(TypeError, match="noise_sampler_seed=1.5 has the wrong type float; expected int or None"):
        DPMSolverSDEScheduler(noise_sampler_seed=1.5)


def test_bad_steps():
    scheduler = DPMSolverSDEScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="num_inference_steps=0 must be between 1"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(torch.zeros(1, 1, 2, 2), 12345.0, torch.zeros(1, 1, 2, 2))
