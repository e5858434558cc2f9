"""DDPM, DDIM, DDIMInverse and PNDM on their own: schedule properties, closed forms, round trips and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from minidiff.schedulers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, PNDMScheduler, SchedulerOutput
from minidiff.schedulers.ddim import ddim_update
from minidiff.schedulers.pndm import pndm_transfer

ALL = (DDPMScheduler, DDIMScheduler, DDIMInverseScheduler, PNDMScheduler)
SHAPE = (2, 3, 4, 4)


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def toy_eps(x, t):
    return 0.5 * torch.cos(torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape) + float(t) / 100) + 0.01 * torch.sin(x)


# ---- schedules ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_decreases_from_below_one(cls, beta_schedule):
    scheduler = cls(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    alpha_bar = scheduler.alphas_cumprod
    assert alpha_bar.dtype == torch.float32 and alpha_bar.shape == (1000,)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all()) and 0 < float(alpha_bar[-1]) < float(alpha_bar[0]) < 1
    assert torch.allclose(alpha_bar, torch.cumprod(1 - scheduler.betas.double(), 0).float(), rtol=1e-5)


def test_zero_terminal_snr_ends_at_zero_and_keeps_the_first_value():
    plain, rescaled = DDIMScheduler(), DDIMScheduler(rescale_betas_zero_snr=True)
    assert float(rescaled.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(rescaled.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)
    assert bool((rescaled.alphas_cumprod[1:] < rescaled.alphas_cumprod[:-1]).all())


def test_timesteps_of_each_spacing():
    ddim = DDIMScheduler(steps_offset=1)
    ddim.set_timesteps(5)
    assert ddim.timesteps.tolist() == [801, 601, 401, 201, 1] and ddim.timesteps.dtype == torch.int64
    for spacing, expected in [("linspace", [999, 749, 500, 250, 0]), ("trailing", [999, 799, 599, 399, 199])]:
        scheduler = DDIMScheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(5)
        assert scheduler.timesteps.tolist() == expected
    inverse = DDIMInverseScheduler(steps_offset=1)
    inverse.set_timesteps(5)
    assert inverse.timesteps.tolist() == [1, 201, 401, 601, 801]


def test_pndm_timesteps_duplicate_the_second_step_or_start_with_runge_kutta():
    plms = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    plms.set_timesteps(5)
    assert plms.timesteps.tolist() == [801, 601, 601, 401, 201, 1]  # N steps, N + 1 model calls
    prk = PNDMScheduler(steps_offset=1)
    prk.set_timesteps(10)
    assert prk.timesteps.tolist() == [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601,
                                      501, 401, 301, 201, 101, 1]


def test_config_values_read_as_attributes_and_len():
    scheduler = DDIMScheduler(num_train_timesteps=500)
    with pytest.warns(FutureWarning, match="scheduler.config|config object"):  # deprecated in diffusers: warns
        assert scheduler.num_train_timesteps == 500 == len(scheduler) == scheduler.config["num_train_timesteps"]
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    with pytest.raises(AttributeError, match="no attribute 'not_an_option'"):
        scheduler.not_an_option


# ---- the forward process --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_add_noise_and_velocity_match_the_closed_form(cls):
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise, t = randn(0), randn(1), torch.tensor([0, 999])
    alpha_bar = torch.cumprod(1 - scheduler.betas.double(), 0)[t].reshape(2, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * noise.double()
    assert torch.allclose(scheduler.add_noise(x0, noise, t).double(), expected, atol=1e-6)
    velocity = alpha_bar.sqrt() * noise.double() - (1 - alpha_bar).sqrt() * x0.double()
    assert torch.allclose(scheduler.get_velocity(x0, noise, t).double(), velocity, atol=1e-6)


def test_v_prediction_of_the_true_velocity_recovers_x0():
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False)
    scheduler.set_timesteps(10)
    x0, noise, t = randn(0), randn(1), scheduler.timesteps[3]
    x_t = scheduler.add_noise(x0, noise, t.reshape(1))
    out = scheduler.step(scheduler.get_velocity(x0, noise, t.reshape(1)), t, x_t)
    assert torch.allclose(out.pred_original_sample, x0, atol=1e-5)


# ---- stepping -------------------------------------------------------------------------------------------------------
def run(scheduler, x, model=toy_eps, **step_kwargs):
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, **step_kwargs).prev_sample
    return x


def test_ddim_eta_zero_is_deterministic_and_draws_nothing():
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    first = run(scheduler, randn(2), eta=0.0, generator=generator)
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(first, run(scheduler, randn(2), eta=0.0, generator=torch.Generator().manual_seed(99)))


def test_ddim_eta_draws_noise_at_every_step():
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(4)
    a = run(scheduler, randn(2), eta=1.0, generator=torch.Generator().manual_seed(0))
    b = run(scheduler, randn(2), eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    generator = torch.Generator().manual_seed(0)
    noises = [torch.randn(SHAPE, generator=generator) for _ in range(4)]
    with_given_noise = randn(2)
    for t, noise in zip(scheduler.timesteps, noises):
        with_given_noise = scheduler.step(toy_eps(with_given_noise, t), t, with_given_noise, eta=1.0,
                                          variance_noise=noise).prev_sample
    assert torch.equal(a, with_given_noise)


def test_ddim_steps_by_t_minus_T_over_N_whatever_the_spacing():
    scheduler = DDIMScheduler(timestep_spacing="linspace", clip_sample=False, prediction_type="sample")
    scheduler.set_timesteps(3)  # timesteps 999, 500, 0; a step from 500 lands on 500 - 333 = 167
    x, x0 = randn(0), randn(1)
    out = scheduler.step(x0, 500, x)
    alpha_bar_t = scheduler.alphas_cumprod[500]
    eps = (x - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5
    assert torch.allclose(out.prev_sample, ddim_update(x0, eps, scheduler.alphas_cumprod[167]), atol=1e-6)


def test_pndm_transfer_is_the_deterministic_ddim_step():
    alpha_bar = DDIMScheduler().alphas_cumprod
    x, eps = randn(0), randn(1)
    for t, t_prev in [(999, 899), (500, 20), (40, 0)]:
        x0 = (x - (1 - alpha_bar[t]) ** 0.5 * eps) / alpha_bar[t] ** 0.5
        expected = ddim_update(x0, eps, alpha_bar[t_prev])
        assert torch.allclose(pndm_transfer(x, eps, alpha_bar[t], alpha_bar[t_prev]), expected, atol=1e-5)


def test_ddim_inversion_then_sampling_returns_to_the_start():
    config = {"clip_sample": False, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "steps_offset": 1}
    inverse, forward = DDIMInverseScheduler(**config), DDIMScheduler(**config)
    inverse.set_timesteps(50)
    forward.set_timesteps(50)
    x0 = randn(3)
    noise = run(inverse, x0)
    assert (noise - x0).abs().max() > 1  # it did move to the noise end
    back = run(forward, noise)
    assert (back - x0).abs().max() / x0.abs().max() < 1e-2


def test_ddpm_set_timesteps_T_walks_the_training_chain():
    training, inference = DDPMScheduler(), DDPMScheduler()
    inference.set_timesteps(1000)
    a = run(training, randn(0), generator=torch.Generator().manual_seed(0))
    b = run(inference, randn(0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_ddpm_previous_timestep_and_last_step_without_noise():
    scheduler = DDPMScheduler()
    assert scheduler.previous_timestep(10) == 9  # training mode
    scheduler.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    assert [scheduler.previous_timestep(t) for t in scheduler.timesteps] == [87, 50, 1, 0, -1]
    x = randn(0)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    scheduler.step(toy_eps(x, 0), 0, x, generator=generator)
    assert torch.equal(generator.get_state(), state)  # t = 0: the posterior mean, no noise


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_splits_the_model_output(variance_type):
    scheduler = DDPMScheduler(variance_type=variance_type)
    scheduler.set_timesteps(5)
    x = randn(0)
    out = scheduler.step(torch.cat([toy_eps(x, 800), 0.5 * torch.sigmoid(x)], dim=1), scheduler.timesteps[0], x,
                         generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == SHAPE and torch.isfinite(out.prev_sample).all()


def test_outputs_unpack_like_diffusers():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(5)
    x = randn(0)
    out = scheduler.step(toy_eps(x, 801), 801, x)
    assert isinstance(out, SchedulerOutput)
    prev, x0 = scheduler.step(toy_eps(x, 801), 801, x, return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)
    pndm = PNDMScheduler(skip_prk_steps=True)
    pndm.set_timesteps(5)
    assert len(pndm.step(toy_eps(x, pndm.timesteps[0]), pndm.timesteps[0], x, return_dict=False)) == 1


# ---- config I/O -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_save_pretrained_round_trip_and_subfolder(cls, tmp_path):
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                    trained_betas=torch.linspace(0.0001, 0.02, 1000).tolist())
    scheduler.save_pretrained(tmp_path / "pipe" / "scheduler")
    saved = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__ and saved["steps_offset"] == 1
    loaded = cls.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert loaded.config.to_dict() == scheduler.config.to_dict()
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)
    assert cls.from_pretrained(tmp_path / "pipe" / "scheduler").config.to_dict() == scheduler.config.to_dict()


def test_from_config_takes_another_schedulers_config_and_overrides():
    pndm = PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    ddim = DDIMScheduler.from_config(pndm.config, clip_sample=False)
    assert ddim.config.beta_schedule == "scaled_linear" and ddim.config.steps_offset == 1 and not ddim.config.clip_sample
    assert DDPMScheduler.from_config({**dict(ddim.config), "_class_name": "DDIMScheduler"}).config.beta_schedule == "scaled_linear"


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_unknown_options_list_the_accepted_values(cls):
    with pytest.raises(ValueError, match="beta_schedule='cosine' is not supported; accepted values: 'linear', 'scaled_linear'"):
        cls(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type='noise' is not supported; accepted values: 'epsilon'"):
        cls(prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing='uniform' is not supported; accepted values:"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"unknown config option\(s\) \['num_steps'\]"):
        cls(num_steps=10)


def test_scheduler_specific_choices():
    with pytest.raises(ValueError, match="variance_type='small' is not supported; accepted values: 'fixed_small'"):
        DDPMScheduler(variance_type="small")
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported; accepted values: 'epsilon', 'v_prediction'$"):
        PNDMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="timestep_spacing='linspace' is not supported; accepted values: 'leading', 'trailing'$"):
        DDIMInverseScheduler(timestep_spacing="linspace")


@pytest.mark.parametrize("cls", ALL)
def test_bad_num_inference_steps(cls):
    scheduler = cls()
    with pytest.raises(ValueError, match="num_inference_steps=0 must be between 1 and num_train_timesteps=1000"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps=1001 must be between 1 and num_train_timesteps=1000"):
        scheduler.set_timesteps(1001)
    with pytest.raises(TypeError, match="num_inference_steps must be an int, got 2.5"):
        scheduler.set_timesteps(2.5)


def test_pndm_runge_kutta_start_needs_four_steps():
    with pytest.raises(ValueError, match="with skip_prk_steps=False `num_inference_steps` must be >= 4"):
        PNDMScheduler().set_timesteps(3)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDIMInverseScheduler, PNDMScheduler])
def test_step_before_set_timesteps(cls):
    x = randn(0)
    with pytest.raises(RuntimeError, match=rf"{cls.__name__}.step\(\) called before set_timesteps"):
        cls().step(x, 10, x)


@pytest.mark.parametrize("cls", ALL)
def test_bad_timesteps_and_shapes(cls):
    scheduler = cls(skip_prk_steps=True) if cls is PNDMScheduler else cls()
    scheduler.set_timesteps(10)
    x, t = randn(0), int(scheduler.timesteps[0])
    with pytest.raises(ValueError, match=r"timestep 1000 is outside \[0, 999\] \(num_train_timesteps=1000\)"):
        scheduler.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"timestep -1 is outside \[0, 999\]"):
        scheduler.step(x, -1, x)
    with pytest.raises(ValueError, match="integer timesteps, got 500.5"):
        scheduler.step(x, 500.5, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 3, 4, 5\) but sample has shape \(2, 3, 4, 4\)"):
        scheduler.step(randn(1, (2, 3, 4, 5)), t, x)
    with pytest.raises(ValueError, match="needs integer timesteps, got dtype torch.float32"):
        scheduler.add_noise(x, x, torch.tensor([0.5]))


@pytest.mark.parametrize("cls", [DDPMScheduler, PNDMScheduler])
def test_timestep_outside_the_schedule_lists_the_valid_ones(cls):
    scheduler = cls(skip_prk_steps=True) if cls is PNDMScheduler else cls()
    scheduler.set_timesteps(4)
    x = randn(0)
    valid = ", ".join(map(str, scheduler.timesteps.tolist()))
    with pytest.raises(ValueError, match=rf"timestep 499 is not in this schedule; .*scheduler.timesteps: \[{valid}\]"):
        scheduler.step(x, 499, x)


def test_ddim_step_options():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    x = randn(0)
    with pytest.raises(ValueError, match="eta=-0.5 must be >= 0"):
        scheduler.step(x, 901, x, eta=-0.5)
    with pytest.raises(ValueError, match="pass either generator or variance_noise"):
        scheduler.step(x, 901, x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match=r"variance_noise has shape \(2, 3, 4, 5\)"):
        scheduler.step(x, 901, x, eta=1.0, variance_noise=randn(1, (2, 3, 4, 5)))


def test_ddpm_bad_variance_output_and_custom_timesteps():
    x = randn(0)
    with pytest.raises(ValueError, match=r"variance_type='learned_range' needs a model output with 2 x 3 channels"):
        DDPMScheduler(variance_type="learned_range").step(x, 10, x)
    scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="strictly descending"):
        scheduler.set_timesteps(timesteps=[100, 87, 50, 51, 0])
    with pytest.raises(ValueError, match=r"custom timesteps must lie in \[0, 999\]"):
        scheduler.set_timesteps(timesteps=[1000, 10])
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        scheduler.set_timesteps(5, timesteps=[10, 5])


def test_from_pretrained_missing_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json does not exist"):
        DDIMScheduler.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        DDIMScheduler.from_pretrained(tmp_path / "nowhere", subfolder="scheduler")
