"""Properties of the two-call samplers (Heun, DPM2, DPM2 ancestral) on their own, and their errors."""

from __future__ import annotations

import pytest
import torch

from minidiff.schedulers import (
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
)

ALL = (HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)
MIDPOINT = (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def sample(seed=0):
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def toy_model(x, t):
    return 0.5 * torch.tanh(x) + 0.01 * float(t) / 1000


def step_kwargs(cls, seed=0):
    return {"generator": torch.Generator().manual_seed(seed)} if cls is KDPM2AncestralDiscreteScheduler else {}


def run(scheduler, x, model=toy_model, **kwargs):
    """A plain sampling loop over every call; returns the final sample and the step outputs."""
    outputs = []
    for t in scheduler.timesteps:
        out = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **kwargs)
        outputs.append(out)
        x = out.prev_sample
    return x, outputs


# ---- the schedule ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("respacing", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}])
def test_every_level_after_the_first_is_listed_once_per_call(cls, spacing, respacing):
    """2N - 1 calls for N steps; the levels are the single-call (Euler) schedule's, each after the first twice."""
    options = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, **SD, **respacing)
    scheduler, euler = cls(**options), EulerDiscreteScheduler(**options)
    scheduler.set_timesteps(6)
    euler.set_timesteps(6)
    assert scheduler.order == 2 and len(scheduler.timesteps) == 11
    levels = euler.sigmas  # (N + 1,): sigma_0 > ... > sigma_{N-1} > 0
    assert torch.all(levels[1:] < levels[:-1])
    inner = levels[1:-1] if cls is HeunDiscreteScheduler else levels[1:]  # DPM2 also lists the final 0 three times
    assert torch.equal(scheduler.sigmas, torch.cat([levels[:1], inner.repeat_interleave(2), levels[-1:]]))
    if cls is HeunDiscreteScheduler:  # the second call of a step runs at the next level
        assert torch.equal(scheduler.timesteps[1::2], scheduler.timesteps[2::2])


@pytest.mark.parametrize("cls", MIDPOINT)
def test_dpm2_second_call_is_at_a_log_midpoint(cls):
    """DPM2: each step's midpoint is sqrt(sigma sigma_next) (the ancestral one: towards sigma_down), and its model
    call gets the midpoint's fractional timestep, between the step's two timesteps."""
    scheduler = cls(**SD)
    scheduler.set_timesteps(5)
    starts = scheduler.sigmas[0::2][:5]  # (N,): step k starts at level k
    if cls is KDPM2DiscreteScheduler:
        ends, mids = scheduler.sigmas[1::2][:5], scheduler.sigmas_interpol[1::2][:5]
    else:
        ends, mids = scheduler.sigmas_down[0::2][:5], scheduler.sigmas_interpol[0::2][:5]
    torch.testing.assert_close(mids, (starts * ends).sqrt())  # the last step's midpoint is 0
    t = scheduler.timesteps
    assert torch.all((t[2::2] <= t[1::2]) & (t[1::2] < t[0:-1:2]))  # t_k > t_mid >= t_{k+1} (clipped at 0)


def test_ancestral_split_keeps_the_next_noise_level():
    scheduler = KDPM2AncestralDiscreteScheduler(**SD)
    scheduler.set_timesteps(8)
    sigmas_next = scheduler.sigmas[1::2][:8]  # (N,) the level each step goes to, 0 for the last
    torch.testing.assert_close(scheduler.sigmas_down[0::2][:8] ** 2 + scheduler.sigmas_up[0::2][:8] ** 2,
                               sigmas_next**2)


# ---- the two-call state machine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_state_alternates_and_the_first_call_holds_the_sample(cls):
    scheduler = cls(**SD)
    scheduler.set_timesteps(4)
    x = sample()
    assert scheduler.state_in_first_order and scheduler.step_index is None
    t0, t1 = scheduler.timesteps[:2]
    x1 = scheduler.step(toy_model(x, t0), t0, x, **step_kwargs(cls)).prev_sample
    assert not scheduler.state_in_first_order and scheduler.step_index == 1 and torch.equal(scheduler.sample, x)
    if cls is HeunDiscreteScheduler:
        assert scheduler.dt == scheduler.sigmas[1] - scheduler.sigmas[0] and scheduler.prev_derivative is not None
    scheduler.step(toy_model(x1, t1), t1, x1, **step_kwargs(cls))
    assert scheduler.state_in_first_order and scheduler.step_index == 2 and scheduler.sample is None
    if cls is HeunDiscreteScheduler:
        assert scheduler.dt is None and scheduler.prev_derivative is None
    scheduler.set_timesteps(4)
    assert scheduler.state_in_first_order and scheduler.step_index is None


@pytest.mark.parametrize("cls", MIDPOINT)
def test_the_second_call_scales_the_input_at_the_midpoint(cls):
    scheduler = cls(**SD)
    scheduler.set_timesteps(4)
    x = sample()
    t0, t1 = scheduler.timesteps[:2]
    torch.testing.assert_close(scheduler.scale_model_input(x, t0), x / (scheduler.sigmas[0] ** 2 + 1) ** 0.5)
    x1 = scheduler.step(toy_model(x, t0), t0, x, **step_kwargs(cls)).prev_sample
    mid = scheduler.sigmas_interpol[1 if cls is KDPM2DiscreteScheduler else 0]
    torch.testing.assert_close(scheduler.scale_model_input(x1, t1), x1 / (mid**2 + 1) ** 0.5)


@pytest.mark.parametrize("cls", [HeunDiscreteScheduler, KDPM2DiscreteScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_constant_slope_is_integrated_exactly(cls, prediction_type):
    """A model whose x0 estimate is x - sigma e (constant slope e in sigma): Heun's mean of two equal slopes and
    DPM2's midpoint slope both move x by e (sigma_next - sigma) per step, so the run ends at x_T - sigma_max e.
    That needs each step's second call to restart from the held sample with the whole step's dt."""
    scheduler = cls(prediction_type=prediction_type, **SD)
    scheduler.set_timesteps(7)
    x_T, e = sample() * scheduler.init_noise_sigma, sample(1)

    def model(scaled, t):  # the output whose x0 estimate is (unscaled x) - sigma e at this call's sigma
        if prediction_type == "epsilon":
            return e
        i, first = scheduler.step_index, scheduler.state_in_first_order
        sigma = scheduler.sigmas[i] if first or cls is HeunDiscreteScheduler else scheduler.sigmas_interpol[i]
        x = scaled * (sigma**2 + 1) ** 0.5
        return ((x - sigma * e) - x / (sigma**2 + 1)) / (-sigma / (sigma**2 + 1) ** 0.5)  # x0(v) = x - sigma e

    x, _ = run(scheduler, x_T, model=model)
    torch.testing.assert_close(x, x_T - scheduler.sigmas[0] * e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cls", ALL)
def test_last_call_is_an_euler_step_onto_the_x0_estimate(cls):
    """The final move to sigma = 0 takes one call (Karras et al. 2022, Algorithm 1, line 6), landing on x0."""
    scheduler = cls(**SD)
    scheduler.set_timesteps(5)
    _, outputs = run(scheduler, sample() * scheduler.init_noise_sigma, **step_kwargs(cls))
    torch.testing.assert_close(outputs[-1].prev_sample, outputs[-1].pred_original_sample, rtol=1e-5, atol=1e-5)


def test_heun_sample_prediction_and_clipping():
    """prediction_type="sample": the model output is x0; clip_sample clamps it to +-clip_sample_range."""
    scheduler = HeunDiscreteScheduler(prediction_type="sample", clip_sample=True, clip_sample_range=0.5, **SD)
    scheduler.set_timesteps(3)
    x = sample()
    out = scheduler.step(3 * x, scheduler.timesteps[0], x)
    torch.testing.assert_close(out.pred_original_sample, (3 * x).clamp(-0.5, 0.5))


def test_ancestral_noise_is_drawn_on_the_second_call_only_and_is_seeded():
    scheduler = KDPM2AncestralDiscreteScheduler(**SD)
    scheduler.set_timesteps(3)
    x, generator = sample(), torch.Generator().manual_seed(5)
    state = generator.get_state()
    t0, t1 = scheduler.timesteps[:2]
    x1 = scheduler.step(toy_model(x, t0), t0, x, generator=generator).prev_sample
    assert torch.equal(generator.get_state(), state)
    scheduler.step(toy_model(x1, t1), t1, x1, generator=generator)
    assert not torch.equal(generator.get_state(), state)
    finals = []
    for seed in (0, 0, 1):
        scheduler.set_timesteps(4)
        finals.append(run(scheduler, sample(), generator=torch.Generator().manual_seed(seed))[0])
    assert torch.equal(finals[0], finals[1]) and not torch.allclose(finals[0], finals[2])


# ---- img2img and training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_img2img_start_mid_schedule(cls):
    """set_begin_index(t_start * order): add_noise and the first call use that position, a step's first call."""
    scheduler = cls(**SD)
    scheduler.set_timesteps(10)
    start = 6 * scheduler.order
    scheduler.set_begin_index(start)
    clean, noise = sample(), sample(1)
    t = scheduler.timesteps[start]
    noisy = scheduler.add_noise(clean, noise, t.reshape(1))
    torch.testing.assert_close(noisy, clean + scheduler.sigmas[start] * noise)
    assert scheduler.state_in_first_order
    for i, t in enumerate(scheduler.timesteps[start:]):
        noisy = scheduler.step(toy_model(scheduler.scale_model_input(noisy, t), t), t, noisy,
                               **step_kwargs(cls)).prev_sample
        assert scheduler.step_index == start + i + 1
    assert torch.isfinite(noisy).all()


@pytest.mark.parametrize("cls", ALL)
def test_a_duplicated_timestep_resolves_to_its_second_position(cls):
    """diffusers' rule, so a loop entering mid-schedule on a repeated level does not skip a sigma."""
    scheduler = cls(**SD)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps
    if cls is HeunDiscreteScheduler:
        assert scheduler.index_for_timestep(t[1]) == 2
    assert scheduler.index_for_timestep(t[0]) == 0


@pytest.mark.parametrize("cls", ALL)
def test_add_noise_before_set_timesteps_is_x_plus_sigma_eps(cls):
    scheduler = cls(**SD)
    clean, noise = sample(), sample(1)
    t = torch.tensor([999.0, 0.0])
    noisy = scheduler.add_noise(clean, noise, t)
    sigma = ((1 - scheduler.alphas_cumprod[[-1, 0]]) / scheduler.alphas_cumprod[[-1, 0]]) ** 0.5
    torch.testing.assert_close(noisy, clean + sigma.reshape(2, 1, 1, 1) * noise)


# ---- configs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_config_round_trip(cls, tmp_path):
    scheduler = cls(num_train_timesteps=500, timestep_spacing="trailing", prediction_type="v_prediction",
                    use_karras_sigmas=True, **SD)
    scheduler.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == scheduler.config.to_dict()
    assert cls.from_config(scheduler.config).config == scheduler.config
    scheduler.set_timesteps(9)
    loaded.set_timesteps(9)
    assert torch.equal(loaded.timesteps, scheduler.timesteps) and torch.equal(loaded.sigmas, scheduler.sigmas)


def test_from_config_takes_other_schedulers_configs():
    euler = EulerDiscreteScheduler(**SD, steps_offset=1, timestep_spacing="leading")
    heun = HeunDiscreteScheduler.from_config(euler.config)
    assert heun.config.beta_schedule == "scaled_linear" and heun.config.steps_offset == 1
    dpm2 = KDPM2DiscreteScheduler.from_config(heun.config, use_karras_sigmas=True)
    assert dpm2.config.use_karras_sigmas and not hasattr(dpm2.config, "clip_sample")
    assert KDPM2AncestralDiscreteScheduler.from_config(dpm2.config).config.timestep_spacing == "leading"


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, options, message",
    [
        (HeunDiscreteScheduler, dict(beta_schedul="linear"), "unknown config option.*beta_schedul"),
        (HeunDiscreteScheduler, dict(beta_schedule="cosine"), "beta_schedule='cosine' is not supported; accepted"),
        (KDPM2DiscreteScheduler, dict(beta_schedule="exp"), "beta_schedule='exp' is not supported; accepted values"),
        (HeunDiscreteScheduler, dict(prediction_type="flow"), "prediction_type='flow'.*'sample'"),
        (HeunDiscreteScheduler, dict(clip_sample_range=0.0), "clip_sample_range=0.0 must be > 0"),
        (KDPM2DiscreteScheduler, dict(prediction_type="sample"), "prediction_type='sample'.*'v_prediction'"),
        (KDPM2AncestralDiscreteScheduler, dict(prediction_type="sample"), "prediction_type='sample'"),
        (KDPM2DiscreteScheduler, dict(clip_sample=True), "unknown config option.*clip_sample"),
        (KDPM2AncestralDiscreteScheduler, dict(timestep_spacing="uniform"), "timestep_spacing='uniform'"),
        (HeunDiscreteScheduler, dict(use_karras_sigmas=True, use_exponential_sigmas=True),
         "use_karras_sigmas=True and use_exponential_sigmas=True contradict each other"),
        (KDPM2AncestralDiscreteScheduler, dict(use_exponential_sigmas=True, use_beta_sigmas=True),
         "set at most one of use_karras"),
        (KDPM2DiscreteScheduler, dict(steps_offset=1000), "steps_offset=1000 must lie in"),
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
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        scheduler.set_timesteps(2.5)


@pytest.mark.parametrize("cls", ALL)
def test_timestep_not_in_schedule(cls):
    scheduler = cls()
    scheduler.set_timesteps(3)
    x = sample()
    with pytest.raises(ValueError, match="timestep 123.5 is not in the schedule of .* which holds \\[999"):
        scheduler.step(x, torch.tensor(123.5), x, **step_kwargs(cls))
    with pytest.raises(ValueError, match="timestep 123.5 is not in the schedule"):
        scheduler.scale_model_input(x, 123.5)


@pytest.mark.parametrize("cls", ALL)
def test_mismatched_shapes(cls):
    scheduler = cls()
    scheduler.set_timesteps(3)
    x = sample()
    with pytest.raises(ValueError, match="model_output has shape \\(2, 3, 4, 4\\) but sample has shape \\(2, 3, 4, 5"):
        scheduler.step(x, scheduler.timesteps[0], torch.zeros(2, 3, 4, 5), **step_kwargs(cls))
    with pytest.raises(ValueError, match="noise has shape \\(1, 3, 4, 4\\) but original_samples has shape"):
        scheduler.add_noise(x, x[:1], scheduler.timesteps[:1])


@pytest.mark.parametrize("cls", ALL)
def test_stepping_past_the_end(cls):
    scheduler = cls()
    scheduler.set_timesteps(2)
    x, _ = run(scheduler, sample(), **step_kwargs(cls))
    with pytest.raises(RuntimeError, match="already took all 3 steps; call set_timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x, **step_kwargs(cls))
