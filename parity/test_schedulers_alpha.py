"""Parity of the alpha-bar schedulers (DDPM, DDIM, DDIMInverse, PNDM) with diffusers 0.42.1.

Both libraries get the same config, the same toy model and, where the scheduler draws noise, generators with the
same seed; their trajectories run side by side and every step's ``prev_sample`` and ``pred_original_sample`` must
agree to 1e-6 (relative to the reference's largest value).
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff.schedulers as md
from parity.configs import assert_same_config
from parity.report import compare, compare_exact

TOL = 1e-6
NAMES = ("DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler")
HYPOTHESIS = settings(max_examples=20, deadline=None, derandomize=True)


def pair(name: str):
    return getattr(md, name), getattr(diffusers, name)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet: linear in x with a t-dependent gain plus a fixed nonlinear term."""
    t = float(t)
    return x * (t / (t + 1)) + 0.1 * torch.sin(3 * x)


def learned_variance_model(variance_type: str):
    """2C-channel output for learned variances: the toy prediction, then a variance (``learned``, positive)
    or an interpolation weight in [-1, 1] (``learned_range``)."""

    def model(x, t):
        extra = 0.01 + 0.05 * torch.sigmoid(x) if variance_type == "learned" else torch.tanh(x)
        return torch.cat([toy_model(x, t), extra], dim=1)

    return model


def start_sample(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def run_side_by_side(name: str, case: str, mine, ref, model=toy_model, sample=None, step_kwargs=None, seed=0):
    """Walk both schedulers over their (compared) timesteps, each on its own trajectory; compare every step."""
    compare_exact(name, "timesteps", mine.timesteps, ref.timesteps)
    x_mine = x_ref = start_sample() if sample is None else sample
    kwargs_mine, kwargs_ref = dict(step_kwargs or {}), dict(step_kwargs or {})
    if "generator" in inspect.signature(ref.step).parameters:  # same seed, separate generators
        kwargs_mine["generator"] = torch.Generator().manual_seed(seed)
        kwargs_ref["generator"] = torch.Generator().manual_seed(seed)
    for t in ref.timesteps:
        out_mine = mine.step(model(x_mine, t), t, x_mine, **kwargs_mine)
        out_ref = ref.step(model(x_ref, t), t, x_ref, **kwargs_ref)
        compare(name, f"{case}: prev_sample", out_mine.prev_sample, out_ref.prev_sample, TOL)
        if getattr(out_ref, "pred_original_sample", None) is not None:
            compare(name, f"{case}: pred_original_sample", out_mine.pred_original_sample, out_ref.pred_original_sample, TOL)
        x_mine, x_ref = out_mine.prev_sample, out_ref.prev_sample
    return x_mine, x_ref


# ---- configs -----------------------------------------------------------------------------------------------------
def config_keys_and_defaults(cls) -> dict:
    parameters = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("self", "kwargs")}


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_are_diffusers_keys_with_diffusers_defaults(name):
    mine_cls, ref_cls = pair(name)
    assert config_keys_and_defaults(ref_cls) == dict(mine_cls.config_class())
    mine, ref = mine_cls(), ref_cls()
    compare(name, "default alphas_cumprod", mine.alphas_cumprod, ref.alphas_cumprod, TOL)
    compare(name, "default betas", mine.betas, ref.betas, TOL)


@st.composite
def common_config(draw, spacings=("leading", "linspace", "trailing"), predictions=("epsilon", "v_prediction", "sample"),
                  rescale=True):
    T = draw(st.sampled_from([1000, 250]))
    config = {
        "num_train_timesteps": T,
        "beta_schedule": draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        "beta_start": draw(st.sampled_from([0.0001, 0.00085, 0.001])),
        "beta_end": draw(st.sampled_from([0.012, 0.02])),
        "prediction_type": draw(st.sampled_from(predictions)),
        "timestep_spacing": draw(st.sampled_from(spacings)),
        "steps_offset": draw(st.sampled_from([0, 1])),
    }
    if draw(st.integers(0, 9)) == 0:
        config["trained_betas"] = torch.linspace(0.0002, 0.03, T).tolist()
    if rescale and draw(st.booleans()):
        # Zero terminal SNR: alpha_bar_{T-1} = 0, where an eps prediction cannot give x0 (v is what Lin et al. use).
        config["rescale_betas_zero_snr"] = True
        if config["prediction_type"] == "epsilon":
            config["prediction_type"] = "v_prediction"
    return config


@st.composite
def clipping(draw):
    return {
        "clip_sample": draw(st.booleans()),
        "clip_sample_range": draw(st.sampled_from([1.0, 0.5, 2.0])),
        "thresholding": draw(st.booleans()),
        "dynamic_thresholding_ratio": draw(st.sampled_from([0.995, 0.9])),
        "sample_max_value": draw(st.sampled_from([1.0, 1.5])),
    }


def assert_from_config_round_trips(name: str, mine, ref) -> None:
    """minidiff from the diffusers config, and diffusers from dict(minidiff config), carry the same settings."""
    mine_cls, ref_cls = pair(name)
    assert_same_config(mine_cls.from_config(ref.config).config, ref.config)
    assert_same_config(ref_cls.from_config(dict(mine.config)).config, mine.config)


# ---- whole trajectories over drawn configs --------------------------------------------------------------------------
@HYPOTHESIS
@given(config=common_config(), clip=clipping(), steps=st.integers(1, 40), eta=st.sampled_from([0.0, 0.0, 0.3, 1.0]),
       set_alpha_to_one=st.booleans(), use_clipped=st.booleans(), seed=st.integers(0, 2**16))
def test_ddim_trajectories(config, clip, steps, eta, set_alpha_to_one, use_clipped, seed):
    config = {**config, **clip, "set_alpha_to_one": set_alpha_to_one}
    mine, ref = md.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    assert_from_config_round_trips("DDIMScheduler", mine, ref)
    compare("DDIMScheduler", "drawn configs: alphas_cumprod", mine.alphas_cumprod, ref.alphas_cumprod, TOL)
    mine.set_timesteps(steps)
    ref.set_timesteps(steps)
    run_side_by_side("DDIMScheduler", "drawn configs", mine, ref, seed=seed,
                     step_kwargs={"eta": eta, "use_clipped_model_output": use_clipped})


@HYPOTHESIS
@given(config=common_config(), clip=clipping(), steps=st.integers(1, 40),
       variance_type=st.sampled_from(["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]),
       training_mode=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_ddpm_trajectories(config, clip, steps, variance_type, training_mode, seed):
    config = {**config, **clip, "variance_type": variance_type}
    if training_mode == 0:  # no set_timesteps: all T steps, t -> t - 1
        config["num_train_timesteps"] = 250
        config.pop("trained_betas", None)
    mine, ref = md.DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    assert_from_config_round_trips("DDPMScheduler", mine, ref)
    if training_mode:
        mine.set_timesteps(steps)
        ref.set_timesteps(steps)
    model = learned_variance_model(variance_type) if variance_type.startswith("learned") else toy_model
    run_side_by_side("DDPMScheduler", "drawn configs", mine, ref, model=model, seed=seed)


@HYPOTHESIS
@given(config=common_config(spacings=("leading", "trailing")), clip_sample=st.booleans(), set_alpha_to_one=st.booleans(),
       steps=st.integers(1, 40))
def test_ddim_inverse_trajectories(config, clip_sample, set_alpha_to_one, steps):
    config = {**config, "clip_sample": clip_sample, "set_alpha_to_one": set_alpha_to_one}
    mine, ref = md.DDIMInverseScheduler(**config), diffusers.DDIMInverseScheduler(**config)
    assert_from_config_round_trips("DDIMInverseScheduler", mine, ref)
    mine.set_timesteps(steps)
    ref.set_timesteps(steps)
    run_side_by_side("DDIMInverseScheduler", "drawn configs", mine, ref, sample=0.3 * start_sample())


@HYPOTHESIS
@given(config=common_config(predictions=("epsilon", "v_prediction"), rescale=False), skip_prk_steps=st.booleans(),
       set_alpha_to_one=st.booleans(), steps=st.integers(1, 40))
def test_pndm_trajectories(config, skip_prk_steps, set_alpha_to_one, steps):
    if not skip_prk_steps:
        steps = max(steps, 4)  # the Runge-Kutta start needs 4 timesteps
    config = {**config, "skip_prk_steps": skip_prk_steps, "set_alpha_to_one": set_alpha_to_one}
    mine, ref = md.PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    assert_from_config_round_trips("PNDMScheduler", mine, ref)
    mine.set_timesteps(steps)
    ref.set_timesteps(steps)
    run_side_by_side("PNDMScheduler", "drawn configs", mine, ref)


def test_ddpm_custom_timesteps():
    mine, ref = md.DDPMScheduler(), diffusers.DDPMScheduler()
    for scheduler in (mine, ref):
        scheduler.set_timesteps(timesteps=[900, 640, 310, 87, 50, 1, 0])
    run_side_by_side("DDPMScheduler", "custom timesteps", mine, ref, seed=3)


def test_ddpm_fixed_large_log_is_the_intended_variance():
    """diffusers' fixed_large_log step takes sqrt(log beta_t), a NaN; minidiff's noise scale is sqrt(beta_t) (the
    std of the log-variance log beta_t), so its trajectory is compared with diffusers' fixed_large."""
    broken = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    x = start_sample()
    assert torch.isnan(broken.step(toy_model(x, 500), 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    mine = md.DDPMScheduler(variance_type="fixed_large_log", clip_sample=False)
    ref = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    mine.set_timesteps(25)
    ref.set_timesteps(25)
    run_side_by_side("DDPMScheduler", "fixed_large_log vs diffusers fixed_large", mine, ref, seed=1)


# ---- the forward process --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_and_velocity(name, beta_schedule):
    mine_cls, ref_cls = pair(name)
    mine, ref = mine_cls(beta_schedule=beta_schedule), ref_cls(beta_schedule=beta_schedule)
    generator = torch.Generator().manual_seed(7)
    x0 = torch.randn((6, 3, 8, 8), generator=generator)
    noise = torch.randn((6, 3, 8, 8), generator=generator)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    compare(name, "add_noise", mine.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps), TOL)
    if hasattr(ref, "get_velocity"):  # diffusers' PNDM has no get_velocity
        compare(name, "get_velocity", mine.get_velocity(x0, noise, timesteps), ref.get_velocity(x0, noise, timesteps), TOL)


# ---- from_config across libraries -------------------------------------------------------------------------------------
SD_PNDM_CONFIG = {  # a Stable Diffusion 1.x scheduler_config.json, read by both libraries
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


@pytest.mark.parametrize("name", NAMES)
def test_from_config_across_libraries(name):
    mine_cls, ref_cls = pair(name)
    diffusers_source = diffusers.PNDMScheduler.from_config(SD_PNDM_CONFIG)
    mine = mine_cls.from_config(diffusers_source.config)  # a diffusers FrozenDict, another class's config
    ref = ref_cls.from_config(diffusers_source.config)
    mine.set_timesteps(12)
    ref.set_timesteps(12)
    run_side_by_side(name, "from_config(diffusers config)", mine, ref)

    minidiff_source = mine_cls.from_config(SD_PNDM_CONFIG, prediction_type="v_prediction")
    ref = ref_cls.from_config(dict(minidiff_source.config))  # diffusers from a minidiff config
    mine = mine_cls.from_config(minidiff_source.config)
    mine.set_timesteps(12)
    ref.set_timesteps(12)
    run_side_by_side(name, "diffusers from_config(minidiff config)", mine, ref)


# ---- diffusers' own test numbers (tests/schedulers/test_scheduler_*.py) ---------------------------------------------
def diffusers_test_sample() -> torch.Tensor:
    """``dummy_sample_deter`` of diffusers' SchedulerCommonTest: arange(768)/768 laid out as (3, 8, 8, 4) -> (4, 3, 8, 8)."""
    return (torch.arange(4 * 3 * 8 * 8).reshape(3, 8, 8, 4) / (4 * 3 * 8 * 8)).permute(3, 0, 1, 2)


def diffusers_test_model(sample, t):
    return sample * t / (t + 1)


def diffusers_test_loop(scheduler) -> torch.Tensor:
    """DDPM: all training steps with torch.manual_seed(0)'s stream; the others: set_timesteps(10), eta = 0."""
    sample = diffusers_test_sample()
    if "DDPM" in type(scheduler).__name__:
        generator = torch.Generator().manual_seed(0)
        for t in reversed(range(len(scheduler))):
            sample = scheduler.step(diffusers_test_model(sample, t), t, sample, generator=generator).prev_sample
        return sample
    scheduler.set_timesteps(10)
    for t in scheduler.timesteps:
        sample = scheduler.step(diffusers_test_model(sample, t), t, sample).prev_sample
    return sample


REFERENCE_SUMS = [  # (scheduler, config beyond diffusers' test base config, expected sum of |x|)
    ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": True}, 258.9606),
    ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": True, "prediction_type": "v_prediction"}, 202.0296),
    ("DDIMScheduler", {"clip_sample": True}, 172.0067),
    ("DDIMScheduler", {"clip_sample": True, "prediction_type": "v_prediction"}, 52.5302),
    ("DDIMScheduler", {"clip_sample": True, "set_alpha_to_one": False, "beta_start": 0.01}, 149.0784),
    ("DDIMInverseScheduler", {"clip_sample": True}, 671.6816),
    ("DDIMInverseScheduler", {"clip_sample": True, "prediction_type": "v_prediction"}, 1394.2185),
    ("PNDMScheduler", {}, 198.1318),
    ("PNDMScheduler", {"prediction_type": "v_prediction"}, 67.3986),
    ("PNDMScheduler", {"set_alpha_to_one": True, "beta_start": 0.01}, 230.0399),
]


@pytest.mark.parametrize("name, overrides, expected", REFERENCE_SUMS)
def test_diffusers_reference_sums(name, overrides, expected):
    mine_cls, ref_cls = pair(name)
    config = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", **overrides}
    mine = diffusers_test_loop(mine_cls(**config))
    ref = diffusers_test_loop(ref_cls(**config))
    label = ", ".join(f"{k}={v}" for k, v in overrides.items() if k not in ("clip_sample", "variance_type")) or "defaults"
    compare(name, f"diffusers test sum {expected} ({label})", mine.abs().sum(), expected, 1e-2, metric="abs")
    compare(name, f"diffusers test loop vs diffusers ({label})", mine, ref, TOL)


# ---- DDIM inversion -------------------------------------------------------------------------------------------------
def weakly_x_dependent_eps(x, t):
    """An eps model that depends on x only weakly, as inversion assumes (eps(x_t) ~ eps(x_{t-1}))."""
    return 0.5 * torch.cos(torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape) + float(t) / 100) + 0.01 * torch.sin(x)


@pytest.mark.parametrize("spacing, steps_offset", [("leading", 1), ("trailing", 0)])
def test_ddim_inversion_then_sampling_matches_diffusers(spacing, steps_offset):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
              "set_alpha_to_one": True, "timestep_spacing": spacing, "steps_offset": steps_offset}
    inverse, ref_inverse = md.DDIMInverseScheduler(**config), diffusers.DDIMInverseScheduler(**config)
    inverse.set_timesteps(25)
    ref_inverse.set_timesteps(25)
    x0 = start_sample(5)
    noise, _ = run_side_by_side("DDIMInverseScheduler", f"inversion trajectory ({spacing})", inverse, ref_inverse,
                                model=weakly_x_dependent_eps, sample=x0)

    forward, ref_forward = md.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    forward.set_timesteps(25)
    ref_forward.set_timesteps(25)
    run_side_by_side("DDIMScheduler", f"sampling from inverted noise ({spacing})", forward, ref_forward,
                     model=weakly_x_dependent_eps, sample=noise)
