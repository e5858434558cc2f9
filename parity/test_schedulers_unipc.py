"""Parity of UniPCMultistepScheduler with diffusers 0.42.1: drawn configs and step counts, whole trajectories side by
side with the toy model of test_schedulers_sigma.py, every step's ``prev_sample`` and x0 estimate within 1e-6
relative (diffusers' step returns no x0: its stored converted output is used), timesteps and sigmas exact; the
configurations on which diffusers' last step is NaN, refused by minidiff; diffusers' own full-loop values."""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff.schedulers.unipc as unipc
from parity.configs import assert_same_config, public
from parity.report import compare, compare_exact
from parity.test_schedulers_sigma import (
    HYPOTHESIS,
    SD,
    SD_BETAS,
    SIGMA_SPACING,
    TOL,
    V_ZERO_SNR,
    common_options,
    compare_step,
    diffusers_test_model,
    diffusers_test_sample,
    start_sample,
    toy_model,
)

NAME = "UniPCMultistepScheduler"


def build_pair(name: str, config: dict, num_inference_steps: int):
    """The two schedulers from one config, with their schedules compared (beta-sigma timesteps to 1e-12, as in
    test_schedulers_sigma.build_pair)."""
    mine, ref = unipc.UniPCMultistepScheduler(**config), diffusers.UniPCMultistepScheduler(**config)
    mine.set_timesteps(num_inference_steps)
    ref.set_timesteps(num_inference_steps)
    if config.get("use_beta_sigmas"):
        compare(name, "timesteps (beta sigmas)", mine.timesteps.double(), ref.timesteps.double(), 1e-12)
    else:
        compare_exact(name, "timesteps", mine.timesteps, ref.timesteps)
    compare_exact(name, "sigmas", mine.sigmas, ref.sigmas)
    return mine, ref


def reference_x0(ref, x_ref: torch.Tensor) -> torch.Tensor:
    """diffusers' x0 of the step just taken: the converted output it stored (x0, or eps turned into x0 with its own
    alpha_t, sigma_t at the step's sigma)."""
    stored = ref.model_outputs[-1]
    if ref.config.predict_x0:
        return stored
    alpha_t, sigma_t = ref._sigma_to_alpha_sigma_t(ref.sigmas[ref.step_index - 1])
    return (x_ref - sigma_t * stored) / alpha_t


def run_side_by_side(case: str, mine, ref, timesteps=None, sample=None, on_step=None) -> list[torch.Tensor]:
    """Both schedulers over ``timesteps`` (default: all) on their own trajectories, compared at every step."""
    timesteps = ref.timesteps if timesteps is None else timesteps
    x_mine = x_ref = start_sample() if sample is None else sample
    trajectory = []
    for i, t in enumerate(timesteps):
        try:
            out_ref = ref.step(toy_model(x_ref, t), t, x_ref)
        except (IndexError, AssertionError):
            # Karras timesteps are rounded, so a steep schedule (cosine) can repeat the first one: both libraries
            # then start at its second position and diffusers runs off its sigmas on the last step
            with pytest.raises(RuntimeError, match="already took all"):
                mine.step(toy_model(x_mine, t), t, x_mine)
            break
        out_mine = mine.step(toy_model(x_mine, t), t, x_mine)
        compare_step(NAME, f"{case}: prev_sample", out_mine.prev_sample, out_ref.prev_sample)
        compare_step(NAME, f"{case}: pred_original_sample", out_mine.pred_original_sample, reference_x0(ref, x_ref))
        x_mine, x_ref = out_mine.prev_sample, out_ref.prev_sample
        if on_step is not None:
            x_mine, x_ref = on_step(i, t, x_mine, x_ref)
        trajectory.append(x_mine)
    return trajectory


def refused(config: dict) -> bool:
    """Whether minidiff refuses the config because diffusers' last step is NaN there (checked separately below)."""
    try:
        unipc.check_final_step(unipc.UniPCMultistepSchedulerConfig(**config))
    except ValueError:
        return True
    return False


@st.composite
def unipc_options(draw) -> dict:
    options = dict(
        draw(common_options()),
        **draw(SIGMA_SPACING),
        solver_order=draw(st.sampled_from([1, 2, 3])),
        solver_type=draw(st.sampled_from(["bh1", "bh2"])),
        predict_x0=draw(st.booleans()),
        lower_order_final=draw(st.booleans()),
        disable_corrector=draw(st.lists(st.integers(0, 12), max_size=4, unique=True)),
        rescale_betas_zero_snr=draw(st.booleans()),
        final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
    )
    if options["predict_x0"] and draw(st.booleans()):
        options.update(thresholding=True, dynamic_thresholding_ratio=draw(st.sampled_from([0.995, 0.87])),
                       sample_max_value=draw(st.sampled_from([1.0, 0.5, 2.0])))
    if any(options.get(option) for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        if draw(st.booleans()):
            options.update(sigma_min=0.03, sigma_max=draw(st.sampled_from([14.6, 80.0])))
    if refused(options):  # keep the draw useful: land on sigma_min instead, and no third order at the end
        options.update(final_sigmas_type="sigma_min", lower_order_final=options["lower_order_final"]
                       or options["solver_order"] == 3)
    return options


@settings(HYPOTHESIS, max_examples=40)
@given(config=unipc_options(), num_inference_steps=st.integers(1, 25))
def test_unipc_trajectories(config, num_inference_steps):
    mine, ref = build_pair(NAME, config, num_inference_steps)
    run_side_by_side("trajectories", mine, ref)


NAMED = [
    ("SD 25 steps", SD, 25), ("SD karras", dict(SD, use_karras_sigmas=True), 20), ("one step", SD, 1),
    ("v-prediction zero SNR", V_ZERO_SNR, 15),
    ("bh1 sigma_min", dict(SD, solver_type="bh1", final_sigmas_type="sigma_min"), 8),
    ("order 3 predict eps", dict(SD, solver_order=3, predict_x0=False, final_sigmas_type="sigma_min"), 12),
    ("order 3 no lower order final", dict(SD_BETAS, solver_order=3, lower_order_final=False,
                                          final_sigmas_type="sigma_min"), 10),
    ("corrector off on steps 0-2", dict(SD, disable_corrector=[0, 1, 2]), 10),
    ("thresholding sample prediction", dict(prediction_type="sample", thresholding=True, sample_max_value=0.5), 10),
    ("midpoint (DPM config) is bh2", dict(SD, solver_type="midpoint"), 10),
]


@pytest.mark.parametrize("label, config, num_inference_steps", NAMED, ids=[row[0] for row in NAMED])
def test_named_configs(label, config, num_inference_steps):
    mine, ref = build_pair(NAME, config, num_inference_steps)
    run_side_by_side(label, mine, ref)


def test_half_precision_trajectories():
    """fp16 samples: both compute in the sample's dtype (no float32 upcast) and agree bit for bit."""
    mine, ref = build_pair(NAME, dict(SD, solver_order=3, thresholding=True, dynamic_thresholding_ratio=0.9), 10)
    trajectory = run_side_by_side("fp16 trajectories", mine, ref, sample=start_sample().half())
    assert trajectory[-1].dtype == torch.float16


@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=st.data(), num_inference_steps=st.integers(2, 25), strength=st.sampled_from([0.3, 0.5, 1.0]),
       inpaint=st.booleans())
def test_img2img_and_inpaint_start_mid_schedule(data, num_inference_steps, strength, inpaint):
    """set_begin_index mid-schedule (no corrector on the first step: nothing to correct), add_noise at the begin
    index, and inpainting's re-noising after each step."""
    mine, ref = build_pair(NAME, data.draw(unipc_options()), num_inference_steps)
    t_start = num_inference_steps - max(int(num_inference_steps * strength), 1)
    timesteps = ref.timesteps[t_start:]
    mine.set_begin_index(t_start)
    ref.set_begin_index(t_start)
    image, noise = start_sample(1), start_sample(2)
    first = timesteps[:1].repeat(image.shape[0])
    noisy_mine, noisy_ref = mine.add_noise(image, noise, first), ref.add_noise(image, noise, first)
    compare(NAME, "img2img: add_noise at the begin index", noisy_mine, noisy_ref, TOL)

    def renoise(i, t, x_mine, x_ref):
        if not inpaint or i + 1 >= len(timesteps):
            return x_mine, x_ref
        following = timesteps[i + 1: i + 2]
        proper_mine, proper_ref = mine.add_noise(image, noise, following), ref.add_noise(image, noise, following)
        compare(NAME, "inpaint: add_noise after a step", proper_mine, proper_ref, TOL)
        return 0.5 * (x_mine + proper_mine), 0.5 * (x_ref + proper_ref)

    run_side_by_side("img2img (set_begin_index)", mine, ref, timesteps=timesteps, sample=noisy_ref, on_step=renoise)


def test_vp_schedule_and_add_noise():
    mine, ref = build_pair(NAME, dict(SD_BETAS, timestep_spacing="trailing"), 20)
    for attribute in ("alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
        compare(NAME, f"{attribute} (VP schedule)", getattr(mine, attribute), getattr(ref, attribute), TOL)
    timesteps = ref.timesteps[[0, 7, 19]]
    x0, noise = torch.randn((3, 3, 4, 4)), torch.randn((3, 3, 4, 4))
    compare(NAME, "add_noise (inference schedule)", mine.add_noise(x0, noise, timesteps),
            ref.add_noise(x0, noise, timesteps), TOL)


# ---- where diffusers' last step is NaN, minidiff refuses the config -------------------------------------------------
NAN_LAST_STEP = [
    dict(solver_type="bh1"),
    dict(predict_x0=False),
    dict(lower_order_final=False, solver_order=2),
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3),
    dict(use_beta_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3),
]


@pytest.mark.parametrize("config", NAN_LAST_STEP, ids=[str(c) for c in NAN_LAST_STEP])
def test_configs_with_a_nan_last_step_are_refused(config):
    ref = diffusers.UniPCMultistepScheduler(**config)
    ref.set_timesteps(6)
    x = start_sample()
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t), t, x).prev_sample
    assert not torch.isfinite(x).all(), f"diffusers' last step is finite for {config}: minidiff need not refuse it"
    with pytest.raises(ValueError, match="gives a NaN last step"):
        unipc.UniPCMultistepScheduler(**config)


# ---- configs across libraries ----------------------------------------------------------------------------------------
def test_config_fields_are_diffusers_keys_with_diffusers_defaults():
    from parity.test_schedulers_sigma import diffusers_keys_and_defaults

    assert diffusers_keys_and_defaults(diffusers.UniPCMultistepScheduler) == dict(unipc.UniPCMultistepSchedulerConfig())


def test_from_config_and_folders_across_libraries(tmp_path):
    config = dict(SD_BETAS, solver_order=3, use_karras_sigmas=True, disable_corrector=[0, 3], solver_type="bh1",
                  final_sigmas_type="sigma_min")
    mine, ref = unipc.UniPCMultistepScheduler(**config), diffusers.UniPCMultistepScheduler(**config)
    assert_same_config(unipc.UniPCMultistepScheduler.from_config(ref.config).config, ref.config)
    assert_same_config(diffusers.UniPCMultistepScheduler.from_config(dict(mine.config)).config, ref.config)
    mine.save_pretrained(tmp_path / "mine")
    ref.save_pretrained(tmp_path / "ref")
    from_mine_folder = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path / "mine")
    from_ref_folder = unipc.UniPCMultistepScheduler.from_pretrained(tmp_path / "ref")
    assert public(from_mine_folder.config) == public(ref.config)
    from_ref_folder.set_timesteps(8)
    from_mine_folder.set_timesteps(8)
    run_side_by_side("built across libraries (from_config, folders)", from_ref_folder, from_mine_folder)


# ---- diffusers' own test loops and expected values (tests/schedulers/test_scheduler_unipc.py) ------------------------
TEST_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
                   solver_type="bh2", final_sigmas_type="sigma_min")


def sample_1d(flip: bool = False) -> torch.Tensor:
    """UniPCMultistepScheduler1DTest's deterministic (4, 3, 8) sample."""
    values = torch.arange(4 * 3 * 8)
    values = values.flip(-1) if flip else values
    return (values.reshape(3, 8, 4) / values.numel()).permute(2, 0, 1)


def full_loop(library, config: dict, t_start: int | None, one_d: bool) -> torch.Tensor:
    scheduler = library.UniPCMultistepScheduler(**{**TEST_CONFIG, **config})
    scheduler.set_timesteps(10)
    sample = sample_1d() if one_d else diffusers_test_sample()
    timesteps = scheduler.timesteps
    if t_start is not None:
        timesteps = scheduler.timesteps[t_start:]
        noise = sample_1d(flip=True) if one_d else diffusers_test_sample(flip=True)
        sample = scheduler.add_noise(sample, noise, timesteps[:1])
    for t in timesteps:
        model_output = diffusers_test_model(sample.unsqueeze(-1), t).squeeze(-1) if one_d else \
            diffusers_test_model(sample, t)
        sample = scheduler.step(model_output, t, sample).prev_sample
    return sample


V, KARRAS = dict(prediction_type="v_prediction"), dict(use_karras_sigmas=True)
# (test, config, t_start, 1-D sample, statistic, expected, tolerance)
DIFFUSERS_EXPECTED = [
    ("full_loop_no_noise", {}, None, False, "mean", 0.2464, 1e-3),
    ("full_loop_with_karras", KARRAS, None, False, "mean", 0.2925, 1e-3),
    ("full_loop_with_v_prediction", V, None, False, "mean", 0.1014, 1e-3),
    ("full_loop_with_karras_and_v_prediction", dict(V, **KARRAS), None, False, "mean", 0.1966, 1e-3),
    ("full_loop_with_noise", {}, 8, False, "sum", 315.5757, 1e-2),
    ("full_loop_with_noise", {}, 8, False, "mean", 0.4109, 1e-3),
    ("1D full_loop_no_noise", {}, None, True, "mean", 0.2441, 1e-3),
    ("1D full_loop_with_karras", KARRAS, None, True, "mean", 0.2898, 1e-3),
    ("1D full_loop_with_v_prediction", V, None, True, "mean", 0.1014, 1e-3),
    ("1D full_loop_with_karras_and_v_prediction", dict(V, **KARRAS), None, True, "mean", 0.1944, 1e-3),
    ("1D full_loop_with_noise", {}, 8, True, "sum", 39.0870, 1e-2),
    ("1D full_loop_with_noise", {}, 8, True, "mean", 0.4072, 1e-3),
]


@pytest.mark.parametrize("test, config, t_start, one_d, statistic, expected, tolerance", DIFFUSERS_EXPECTED,
                         ids=[f"{row[0]}-{row[4]}" for row in DIFFUSERS_EXPECTED])
def test_diffusers_expected_values(test, config, t_start, one_d, statistic, expected, tolerance):
    mine, ref = full_loop(unipc, config, t_start, one_d), full_loop(diffusers, config, t_start, one_d)
    value = mine.abs().sum() if statistic == "sum" else mine.abs().mean()
    assert abs(value.item() - expected) < tolerance, f"{test}: {statistic} {value.item()} vs diffusers' {expected}"
    compare(NAME, f"diffusers test {test}: final sample", mine, ref, TOL)


def test_switch_through_dpm_solver_keeps_the_result():
    """diffusers' test_switch: UniPC -> DPM-Solver -> UniPC config round trip (bh2 -> midpoint -> bh2)."""
    from minidiff.schedulers.dpm_solver import DPMSolverMultistepScheduler

    scheduler = unipc.UniPCMultistepScheduler(**TEST_CONFIG)
    via_dpm = DPMSolverMultistepScheduler.from_config(scheduler.config)
    switched = unipc.UniPCMultistepScheduler.from_config(via_dpm.config)
    assert switched.config.solver_type == "bh2"
    for built in (scheduler, switched):
        built.set_timesteps(10)
        sample = diffusers_test_sample()
        for t in built.timesteps:
            sample = built.step(diffusers_test_model(sample, t), t, sample).prev_sample
        assert abs(sample.abs().mean().item() - 0.2464) < 1e-3
