"""The consistency schedulers (LCM, TCD) on their own: schedules, boundary conditions, noise draws, round trips and
bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.schedulers.lcm import LCMScheduler, consistency_scalings, distillation_timesteps, renoise
from minidiff.schedulers.tcd import TCDScheduler, strategic_timestep

BOTH = (LCMScheduler, TCDScheduler)


def toy_model(x, t):
    return 0.5 * torch.tanh(x) + 0.01 * float(t) / 1000


def sample(seed=0):
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def run(scheduler, x, generator=None, **step_kwargs):
    outputs = []
    for t in scheduler.timesteps:
        out = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator, **step_kwargs)
        outputs.append(out)
        x = out.prev_sample
    return x, outputs


# ---- schedules -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", BOTH)
def test_default_schedule_is_on_the_distillation_grid(cls):
    scheduler = cls()
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    assert scheduler.timesteps.dtype == torch.long
    grid = set(distillation_timesteps(1000, 50).tolist())
    for steps in range(1, 51):
        scheduler.set_timesteps(steps)
        ts = scheduler.timesteps.tolist()
        assert len(ts) == steps and set(ts) <= grid and ts == sorted(ts, reverse=True) and ts[0] == 999


def test_strength_keeps_the_low_noise_part_of_the_grid():
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4, strength=0.5)
    assert scheduler.timesteps.tolist() == [499, 379, 259, 139]


def test_tcd_explicit_original_steps_use_every_training_timestep():
    scheduler = TCDScheduler()
    scheduler.set_timesteps(4, original_inference_steps=50)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_strategic_timestep_is_float32_arithmetic():
    assert strategic_timestep(700, 0.3) == 490  # float64 would give 489
    assert strategic_timestep(259, 0.0) == 259 and strategic_timestep(259, 1.0) == 0


# ---- the update ------------------------------------------------------------------------------------------------------
def test_boundary_condition_is_identity_at_zero_and_x0_at_large_t():
    c_skip, c_out = consistency_scalings(0, 10.0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    c_skip, c_out = consistency_scalings(999, 10.0)
    assert float(c_skip) < 1e-7 and abs(float(c_out) - 1) < 1e-7


def test_renoise_matches_the_forward_process():
    x, noise = sample(1), sample(2)
    ratio = torch.tensor(0.3)
    torch.testing.assert_close(renoise(x, ratio, noise), 0.3**0.5 * x + 0.7**0.5 * noise)


def test_lcm_last_step_returns_denoised_and_draws_one_noise_per_other_step():
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    x, outputs = run(scheduler, sample(), generator)
    assert torch.equal(x, outputs[-1].denoised)
    replay = torch.Generator().manual_seed(0)
    for _ in range(3):
        torch.randn((2, 3, 4, 4), generator=replay)
    assert torch.equal(torch.randn(4, generator=generator), torch.randn(4, generator=replay))


def test_tuple_output_and_seeded_runs_agree():
    a, b = LCMScheduler(), LCMScheduler()
    for s in (a, b):
        s.set_timesteps(3)
    x_a, _ = run(a, sample(), torch.Generator().manual_seed(7))
    x_b, _ = run(b, sample(), torch.Generator().manual_seed(7))
    assert torch.equal(x_a, x_b)
    a.set_timesteps(3)
    out = a.step(toy_model(sample(), 999), 999, sample(), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


def test_tcd_eta_zero_draws_nothing_and_is_deterministic():
    scheduler = TCDScheduler()
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    x1, outputs = run(scheduler, sample(), generator, eta=0.0)
    assert torch.equal(generator.get_state(), state)
    scheduler.set_timesteps(4)
    x2, _ = run(scheduler, sample(), None, eta=0.0)
    assert torch.equal(x1, x2) and torch.equal(x1, outputs[-1].pred_noised_sample)


def test_begin_index_starts_mid_schedule():
    scheduler = LCMScheduler()
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(2)
    assert scheduler.begin_index == 2 and scheduler.step_index is None
    t = scheduler.timesteps[2]
    scheduler.step(toy_model(sample(), t), t, sample())
    assert scheduler.step_index == 3


@pytest.mark.parametrize("cls", BOTH)
def test_previous_timestep_and_round_trip(cls, tmp_path):
    scheduler = cls(original_inference_steps=25, timestep_scaling=5.0, prediction_type="v_prediction")
    scheduler.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert again.config.to_dict() == scheduler.config.to_dict()
    assert dict(cls.from_config(scheduler.config).config) == dict(scheduler.config)
    again.set_timesteps(timesteps=[999, 519, 279])
    assert [int(again.previous_timestep(t)) for t in again.timesteps] == [519, 279, -1]
    assert scheduler.scale_model_input(sample(), 3) is not None and scheduler.init_noise_sigma == 1.0


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(original_inference_steps=0), r"original_inference_steps=0 must be between 1 and num_train_timesteps"),
        (dict(original_inference_steps=2000), r"original_inference_steps=2000 must be between 1 and"),
        (dict(timestep_scaling=0.0), r"timestep_scaling=0.0 must be > 0"),
        (dict(prediction_type="flow"), r"prediction_type='flow' is not supported"),
    ],
)
def test_bad_config(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


@pytest.mark.parametrize("option", ["clip_sample", "thresholding"])
def test_tcd_warns_about_options_it_ignores(option):
    with pytest.warns(UserWarning, match=f"TCDScheduler ignores {option}=True"):
        TCDScheduler(**{option: True})


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=51), r"num_inference_steps=51 cannot exceed original_inference_steps=50"),
        (dict(num_inference_steps=4, original_inference_steps=3), r"num_inference_steps=4 cannot exceed"),
        (dict(num_inference_steps=30, strength=0.5), r"exceeds the 25 grid points left by strength=0.5"),
        (dict(num_inference_steps=4, strength=0.0), r"strength=0.0 must lie in \(0, 1\]"),
        (dict(num_inference_steps=4, strength=1.5), r"strength=1.5 must lie in \(0, 1\]"),
        (dict(), r"exactly one of num_inference_steps and timesteps"),
        (dict(num_inference_steps=3, timesteps=[999, 499]), r"exactly one of"),
        (dict(timesteps=[999, 499, 499]), r"strictly descending"),
        (dict(timesteps=[500, 999]), r"strictly descending"),
        (dict(timesteps=[1000, 10]), r"must lie in \[0, 999\]"),
        (dict(timesteps=[999, -1]), r"must lie in \[0, 999\]"),
        (dict(timesteps=[999, 500.5]), r"must be integers"),
        (dict(timesteps=[]), r"non-empty"),
        (dict(timesteps=[999, 499], strength=0.5), r"strength=0.5 cannot be combined with custom timesteps"),
    ],
)
def test_bad_schedule(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls().set_timesteps(**kwargs)


def test_custom_timesteps_off_the_grid_warn():
    with pytest.warns(UserWarning, match="not on the distillation grid"):
        LCMScheduler().set_timesteps(timesteps=[999, 500])


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_tcd_eta_out_of_range(eta):
    scheduler = TCDScheduler()
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match=r"eta=.* must lie in \[0, 1\]"):
        scheduler.step(sample(), 999, sample(), eta=eta)


@pytest.mark.parametrize("cls", BOTH)
def test_step_misuse(cls):
    scheduler = cls()
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        scheduler.step(sample(), 999, sample())
    scheduler.set_timesteps(1)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(sample(), 123, sample())
    scheduler.step(sample(), 999, sample())
    with pytest.raises(RuntimeError, match="already took all 1 steps"):
        scheduler.step(sample(), 999, sample())
    with pytest.raises(ValueError, match="shape"):
        scheduler.set_timesteps(1)
        scheduler.step(sample()[:1], 999, sample())


def test_distillation_grid_values():
    np.testing.assert_array_equal(distillation_timesteps(1000, 4), [249, 499, 749, 999])
