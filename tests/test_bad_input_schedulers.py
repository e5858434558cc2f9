"""Bad scheduler input is refused with an error naming the option, the bound and the value, for all 8 schedulers:
never NaN steps, never a misleading error later. Also: one sampling run per scheduler and thread, and a fuzz test
over config dicts."""

from __future__ import annotations

import copy
import math
import re
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff.schedulers as md
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

ALL = (md.DDPMScheduler, md.DDIMScheduler, md.DDIMInverseScheduler, md.PNDMScheduler, md.LMSDiscreteScheduler,
       md.EulerDiscreteScheduler, md.EulerAncestralDiscreteScheduler, md.DPMSolverMultistepScheduler,
       md.HeunDiscreteScheduler, md.KDPM2DiscreteScheduler, md.KDPM2AncestralDiscreteScheduler, md.LCMScheduler,
       md.TCDScheduler, md.DPMSolverSDEScheduler, md.DPMSolverSinglestepScheduler, md.UniPCMultistepScheduler,
       md.DEISMultistepScheduler)
SMALL = dict(num_train_timesteps=50)


def run(scheduler, steps: int = 5, calls: int = 3) -> torch.Tensor:
    """set_timesteps(steps) and a few steps of a toy model on a fixed finite sample; returns the last sample."""
    scheduler.set_timesteps(steps)
    x = torch.linspace(-1, 1, 32).reshape(1, 2, 4, 4) * scheduler.init_noise_sigma  # (B, C, H, W)
    for t in scheduler.timesteps[:calls]:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(0.3 * model_input + 0.1 * torch.sin(model_input), t, x).prev_sample
    return x


# ---- schedules: betas and the options every scheduler shares -----------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(beta_start=-1), r"beta_start=-1 must lie in \(0, 1\)"),
        (dict(beta_start=0), r"beta_start=0 must lie in \(0, 1\)"),
        (dict(beta_start=float("nan")), r"beta_start=nan must lie in \(0, 1\)"),
        (dict(beta_end=2), r"beta_end=2 must lie in \(0, 1\)"),
        (dict(beta_end=1.0), r"beta_end=1.0 must lie in \(0, 1\)"),
        (dict(beta_start=0.02, beta_end=0.0001), r"beta_start=0.02 must not exceed beta_end=0.0001"),
        (dict(beta_schedule="scaled_linear", beta_start=-0.5), r"beta_start=-0.5 must lie in \(0, 1\)"),
        (dict(beta_start=0.5, beta_end=0.9), r"drives alpha_bar to 0 at timestep \d+ \(betas too large"),
        (dict(trained_betas=[0.1, 1.5], num_train_timesteps=2), r"trained_betas gives beta\[1\]=1.5; every beta"),
        (dict(trained_betas=[0.0, 0.1], num_train_timesteps=2), r"trained_betas gives beta\[0\]=0.0"),
        (dict(trained_betas=[0.1, float("inf")], num_train_timesteps=2), r"trained_betas gives beta\[1\]=inf"),
        (dict(num_train_timesteps=0), r"num_train_timesteps=0 must be at least 1"),
        (dict(num_train_timesteps=-5), r"num_train_timesteps=-5 must be at least 1"),
        (dict(steps_offset=-1), r"steps_offset=-1 must lie in \[0, num_train_timesteps - 1 = 999\]"),
        (dict(beta_schedule="cosine"), r"beta_schedule='cosine' is not supported; accepted values"),
    ],
)
def test_bad_schedule_is_refused_at_construction(cls, options, message):
    if "steps_offset" in options and "steps_offset" not in cls.config_class.field_names():
        message = r"unknown config option\(s\) \['steps_offset'\]"  # DPM-Solver singlestep has no such option
    with pytest.raises(ValueError, match=message):
        cls(**options)


@pytest.mark.parametrize("cls", ALL)
def test_cosine_schedule_ignores_beta_start_and_stays_in_range(cls):
    one_step = dict(original_inference_steps=1) if cls in (md.LCMScheduler, md.TCDScheduler) else {}
    scheduler = cls(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1, **one_step)  # beta capped at 0.999
    assert 0 < float(scheduler.betas.min()) and float(scheduler.betas.max()) < 1
    assert torch.isfinite(run(cls(beta_schedule="squaredcos_cap_v2", **SMALL))).all()


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (md.DDIMScheduler, dict(clip_sample_range=0.0), r"clip_sample_range=0.0 must be > 0 and finite"),
        (md.DDPMScheduler, dict(clip_sample_range=-1.0), r"clip_sample_range=-1.0 must be > 0"),
        (md.DDIMInverseScheduler, dict(clip_sample_range=float("nan")), r"clip_sample_range=nan must be > 0"),
        (md.DDIMScheduler, dict(dynamic_thresholding_ratio=-0.1), r"dynamic_thresholding_ratio=-0.1 must lie in \[0"),
        (md.DDPMScheduler, dict(dynamic_thresholding_ratio=1.5), r"dynamic_thresholding_ratio=1.5 must lie in \[0, 1"),
        (md.DPMSolverMultistepScheduler, dict(sample_max_value=0.0), r"sample_max_value=0.0 must be > 0"),
        (md.DDIMScheduler, dict(sample_max_value=float("inf")), r"sample_max_value=inf must be > 0 and finite"),
        (md.EulerDiscreteScheduler, dict(sigma_min=-1.0), r"sigma_min=-1.0 must be > 0"),
        (md.EulerDiscreteScheduler, dict(sigma_min=2.0, sigma_max=1.0), r"sigma_min=2.0 must be smaller than"),
        (md.DPMSolverMultistepScheduler, dict(lambda_min_clipped=float("nan")), r"lambda_min_clipped=nan must be"),
        (md.DPMSolverMultistepScheduler, dict(solver_order=4), r"solver_order=4 is not supported; accepted values: 1,"),
        (md.DPMSolverMultistepScheduler, dict(solver_order=0), r"solver_order=0 is not supported"),
        (md.DDPMScheduler, dict(variance_type="fixed"), r"variance_type='fixed' is not supported"),
        (md.DPMSolverMultistepScheduler, dict(variance_type="learned_range"),
         r"variance_type='learned_range' is not supported by minidiff"),
    ],
)
def test_bad_scheduler_specific_option_is_refused(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_dpm_solver_takes_a_ddpm_config_with_a_fixed_variance_type():
    """DDPM configs hold variance_type='fixed_small'; diffusers' DPM-Solver ignores it, and so does minidiff's."""
    dpm = md.DPMSolverMultistepScheduler.from_config(md.DDPMScheduler(variance_type="fixed_large", **SMALL).config)
    assert dpm.config.variance_type == "fixed_large" and torch.isfinite(run(dpm)).all()


def test_dpm_lambda_min_clipped_that_clips_everything_is_refused():
    scheduler = md.DPMSolverMultistepScheduler(lambda_min_clipped=100.0)
    with pytest.raises(ValueError, match=r"lambda_min_clipped=100.0 clips away every training timestep"):
        scheduler.set_timesteps(10)


@pytest.mark.parametrize("cls", [md.DDIMScheduler, md.DDPMScheduler, md.DDIMInverseScheduler, md.PNDMScheduler])
def test_steps_offset_past_the_last_timestep_is_named_at_set_timesteps(cls):
    scheduler = cls(num_train_timesteps=10, steps_offset=5)
    with pytest.raises(ValueError, match=r"steps_offset=5 with num_inference_steps=10 gives timestep 14, beyond"):
        scheduler.set_timesteps(10)


@pytest.mark.parametrize("cls", [md.LMSDiscreteScheduler, md.EulerDiscreteScheduler])
def test_sigma_schedulers_clamp_a_steps_offset_past_the_end_as_diffusers(cls):
    """diffusers interpolates sigma there (clamped): SD's configs (leading, steps_offset=1) build LMS at N = T."""
    scheduler = cls(timestep_spacing="leading", steps_offset=1, **SMALL)
    scheduler.set_timesteps(50)
    assert float(scheduler.timesteps[0]) == 50 and torch.isfinite(scheduler.sigmas).all()


# ---- set_timesteps and step arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("steps, error, message", [
    (0, ValueError, r"num_inference_steps=0 must be between 1 and num_train_timesteps=50"),
    (51, ValueError, r"num_inference_steps=51 must be between 1"),
    (5.0, TypeError, r"num_inference_steps must be an int, got 5.0"),
    (True, TypeError, r"num_inference_steps must be an int, got True"),
    ("5", TypeError, r"num_inference_steps must be an int, got '5'"),
])
def test_bad_num_inference_steps(cls, steps, error, message):
    with pytest.raises(error, match=message):
        cls(**SMALL).set_timesteps(steps)


@pytest.mark.parametrize("cls", ALL)
def test_one_inference_step_and_all_training_steps_are_finite(cls):
    options = dict(SMALL, skip_prk_steps=True) if cls is md.PNDMScheduler else SMALL
    assert torch.isfinite(run(cls(**options), steps=1, calls=1)).all()
    assert torch.isfinite(run(cls(**options), steps=49, calls=49 if cls is md.DPMSolverMultistepScheduler else 3)).all()


@pytest.mark.parametrize("options, steps", [(SMALL, 50), (dict(lambda_min_clipped=3.0, **SMALL), 5)])
def test_dpm_steps_that_would_repeat_a_timestep_are_refused(options, steps):
    """N + 1 points over fewer than N + 1 usable training timesteps repeat one: h = 0, NaN (diffusers too)."""
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps} repeats a timestep \(NaN steps"):
        md.DPMSolverMultistepScheduler(**options).set_timesteps(steps)


@pytest.mark.parametrize("eta, message", [(-0.5, r"eta=-0.5 must be >= 0"), (float("nan"), r"eta=nan must be >= 0"),
                                          (float("inf"), r"eta=inf must be >= 0 and finite")])
def test_ddim_bad_eta(eta, message):
    scheduler = md.DDIMScheduler(**SMALL)
    scheduler.set_timesteps(5)
    x = torch.ones(1, 2, 4, 4)
    with pytest.raises(ValueError, match=message):
        scheduler.step(x, scheduler.timesteps[0], x, eta=eta)


def test_ddim_eta_above_one_is_refused_only_where_it_would_give_nan():
    scheduler = md.DDIMScheduler(**SMALL)
    scheduler.set_timesteps(5)
    x = torch.ones(1, 2, 4, 4)
    assert torch.isfinite(scheduler.step(x, scheduler.timesteps[0], x, eta=1.05).prev_sample).all()
    with pytest.raises(ValueError, match=r"eta=5.0 is too large for the step from timestep \d+: sigma_t\^2 exceeds"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=5.0)


def test_ddpm_custom_timesteps_must_descend_and_lie_in_range():
    with pytest.raises(ValueError, match=r"strictly descending"):
        md.DDPMScheduler(**SMALL).set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match=r"custom timesteps must lie in \[0, 49\]"):
        md.DDPMScheduler(**SMALL).set_timesteps(timesteps=[60, 10])
    with pytest.raises(ValueError, match=r"custom timesteps must be integers, got \[10.5, 3\]"):
        md.DDPMScheduler(**SMALL).set_timesteps(timesteps=[10.5, 3])
    with pytest.raises(ValueError, match=r"custom timesteps must be a non-empty 1-d list of numbers"):
        md.DDPMScheduler(**SMALL).set_timesteps(timesteps=[])


def test_lms_step_order_must_be_a_positive_int():
    scheduler = md.LMSDiscreteScheduler(**SMALL)
    scheduler.set_timesteps(5)
    x = torch.ones(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"order=0 must be a positive int"):
        scheduler.step(x, scheduler.timesteps[0], x, order=0)


@pytest.mark.parametrize("options, message", [(dict(s_churn=-1.0), r"s_churn=-1.0 and s_noise=1.0 must be finite"),
                                              (dict(s_noise=float("nan")), r"s_noise=nan must be finite")])
def test_euler_bad_churn(options, message):
    scheduler = md.EulerDiscreteScheduler(**SMALL)
    scheduler.set_timesteps(5)
    x = torch.ones(1, 2, 4, 4)
    with pytest.raises(ValueError, match=message):
        scheduler.step(x, scheduler.timesteps[0], x, **options)


# ---- from_config ----------------------------------------------------------------------------------------------------
def test_from_config_override_must_be_an_option_of_the_class():
    with pytest.raises(ValueError, match=r"DDIMScheduler.from_config got unknown option\(s\) \['clip_smaple'\]"):
        md.DDIMScheduler.from_config(md.DDIMScheduler().config, clip_smaple=False)


@pytest.mark.parametrize("cls", [md.DDIMScheduler, md.EulerDiscreteScheduler, md.UniPCMultistepScheduler])
def test_trained_betas_set_the_number_of_training_steps(cls, tmp_path):
    """As in diffusers, trained betas are the schedule whatever num_train_timesteps says; a different count given
    beside them is replaced by their length, with a warning naming both."""
    assert cls(trained_betas=[0.1, 0.3]).config.num_train_timesteps == 2
    with pytest.warns(UserWarning, match=r"num_train_timesteps=1000 replaced by 2, the length of trained_betas"):
        scheduler = cls(num_train_timesteps=1000, trained_betas=np.array([0.1, 0.3]))
    assert len(scheduler) == 2 and scheduler.betas.tolist() == pytest.approx([0.1, 0.3])
    scheduler.save_pretrained(tmp_path)
    assert cls.from_pretrained(tmp_path).betas.tolist() == scheduler.betas.tolist()


def test_carried_options_are_readable_but_change_nothing():
    ddim = md.DDIMScheduler(clip_sample=False, rescale_betas_zero_snr=True, prediction_type="v_prediction", **SMALL)
    lms = md.LMSDiscreteScheduler.from_config(ddim.config)  # LMS has neither option
    assert lms.config["clip_sample"] is False and lms.config.to_dict()["rescale_betas_zero_snr"] is True
    assert "clip_sample" in dict(lms.config) and not hasattr(lms.config, "clip_sample")
    assert torch.equal(lms.alphas_cumprod, md.LMSDiscreteScheduler(**SMALL).alphas_cumprod)  # no rescaling
    with pytest.raises(ValueError, match=r"unknown config option\(s\) \[.clip_sample."):
        md.LMSDiscreteScheduler(clip_sample=False)  # the constructor stays strict


def test_carried_options_are_saved_and_handed_on(tmp_path):
    euler = md.EulerDiscreteScheduler.from_config(md.DDIMScheduler(clip_sample=False, set_alpha_to_one=False).config)
    euler.save_pretrained(tmp_path)
    ddim = md.DDIMScheduler.from_config(md.EulerDiscreteScheduler.from_pretrained(tmp_path).config)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False


# ---- threads --------------------------------------------------------------------------------------------------------
def test_a_step_from_another_thread_mid_run_says_schedulers_are_not_thread_safe():
    scheduler = md.DPMSolverMultistepScheduler(**SMALL)
    scheduler.set_timesteps(5)
    x = torch.ones(1, 2, 4, 4)
    errors = []

    def second_loop():
        try:
            scheduler.step(x, scheduler.timesteps[0], x)
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=second_loop)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "not thread-safe" in errors[0] and "copy.deepcopy(pipe)" in errors[0]
    assert torch.isfinite(scheduler.step(x, scheduler.timesteps[0], x).prev_sample).all()  # the owner carries on


@pytest.mark.parametrize("cls", ALL)
def test_two_threads_sharing_a_scheduler_get_a_clear_error_and_copies_work(cls):
    shared, barrier, outcomes = cls(**SMALL), threading.Barrier(2), []

    def sampling_loop(scheduler):
        try:
            scheduler.set_timesteps(5)
            barrier.wait()  # both runs set up before either steps: the second set_timesteps took the scheduler over
            outcomes.append(("ok", bool(torch.isfinite(run_steps(scheduler)).all())))
        except RuntimeError as error:
            outcomes.append(("error", str(error)))

    def run_steps(scheduler):
        x = torch.ones(1, 2, 4, 4)
        for t in scheduler.timesteps[:2]:
            x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x).prev_sample
        return x

    threads = [threading.Thread(target=sampling_loop, args=(shared,)) for _ in range(2)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert any(kind == "error" and "is not thread-safe" in text for kind, text in outcomes), outcomes

    outcomes.clear()
    barrier.reset()
    threads = [threading.Thread(target=sampling_loop, args=(copy.deepcopy(shared),)) for _ in range(2)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert outcomes == [("ok", True), ("ok", True)]


# ---- fuzz -----------------------------------------------------------------------------------------------------------
def mutations(option: str, value):
    """Wrong types, flipped signs and odd magnitudes for one option's value."""
    wrong_types = ["1", None, [1, 2], {"a": 1}, True, 4.0, 3]
    numbers = [-value, 0, value * 1e6, float("nan"), float("inf")] if isinstance(value, (int, float)) and not \
        isinstance(value, bool) else []
    return st.sampled_from([*wrong_types, *numbers])


@st.composite
def mutated_config(draw, cls):
    """(config, changed keys): a valid small config with up to 3 options mutated or removed, maybe one added."""
    config = cls(**SMALL).config.to_dict()
    changed = draw(st.lists(st.sampled_from(sorted(config)), max_size=3, unique=True))
    for option in changed:
        if draw(st.booleans()):
            config[option] = draw(mutations(option, config[option]))
        else:
            del config[option]  # a missing key: the class default applies
    if draw(st.booleans()):
        extra = draw(st.sampled_from(["clip_sample", "solver_order", "not_an_option", "_class_name"]))
        config[extra] = draw(st.sampled_from([False, 2, "x"]))
        changed.append(extra)
    return config, changed


@pytest.mark.parametrize("cls", ALL)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_fuzzed_configs_run_finitely_or_fail_naming_a_key(cls, data):
    config, changed = data.draw(mutated_config(cls))
    try:
        scheduler = cls.from_config(config)
        last = run(scheduler, steps=5, calls=3)
    except (ValueError, TypeError) as error:
        message = str(error).split("; accepted")[0]  # the list of accepted options names every key
        assert any(re.search(rf"\b{key}\b", message) for key in changed), f"{message!r} names none of {changed}"
        return
    assert torch.isfinite(last).all(), f"{cls.__name__}.from_config({config}) stepped to non-finite values"
    assert not math.isnan(float(scheduler.init_noise_sigma))


def test_two_threads_sharing_one_pipeline_get_the_not_thread_safe_error():
    """Two real sampling loops on one pipeline, held mid-run by a step callback until both have started."""
    import minidiff
    from tests.tiny_components import tiny_pipeline

    pipe = tiny_pipeline(minidiff.StableDiffusionPipeline)
    pipe.scheduler = minidiff.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    barrier, outcomes = threading.Barrier(2), []

    def wait_for_the_other(pipe, i, t, tensors):
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:  # the other loop already failed
            pass
        return tensors

    def sample():
        try:
            pipe("a red circle", num_inference_steps=3, height=16, width=16, output_type="latent",
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=wait_for_the_other)
            outcomes.append("ok")
        except RuntimeError as error:
            barrier.abort()
            outcomes.append(str(error))

    threads = [threading.Thread(target=sample) for _ in range(2)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert any("(and so a pipeline) is not thread-safe" in outcome for outcome in outcomes), outcomes


@pytest.mark.parametrize("arguments, message", [
    (dict(), r"takes exactly one of num_inference_steps, timesteps .* or sigmas .*; got none"),
    (dict(num_inference_steps=4, sigmas=[1.0, 0.0]), r"exactly one of .*; got num_inference_steps, sigmas"),
    (dict(timesteps=[10, 20]), r"custom timesteps must be strictly descending, got \[10, 20\]"),
    (dict(timesteps=[2000, 10]), r"custom timesteps must lie in \[0, 49\]"),
    (dict(sigmas=[1.0]), r"custom sigmas must be at least two finite, non-negative, descending noise levels"),
    (dict(sigmas=[1.0, 2.0, 0.0]), r"custom sigmas must be .* got \[1.0, 2.0, 0.0\]"),
    (dict(sigmas=[1.0, float("nan")]), r"custom sigmas must be"),
    (dict(sigmas=["a", 0.0]), r"custom sigmas must be"),
])
def test_euler_custom_schedule_is_checked(arguments, message):
    with pytest.raises(ValueError, match=message):
        md.EulerDiscreteScheduler(**SMALL).set_timesteps(**arguments)
