"""Parity of the sigma schedulers (LMS, Euler, Euler ancestral, DPM-Solver multistep) with diffusers 0.42.1.

Both libraries get the same config, the same toy model and, where the scheduler draws noise, generators with the
same seed; their trajectories run side by side and every step's ``prev_sample`` and ``pred_original_sample`` (and
the scaled model input) must agree to 1e-6 relative to the reference's largest value. Timesteps and sigmas must be
equal. Where diffusers itself produces non-finite values (DPM-Solver heun/3rd order with Karras sigmas ending on
sigma_min divides 0 by 0 on its last step), minidiff must produce them at the same places.

LMS: diffusers integrates each LMS coefficient with ``scipy.integrate.quad`` over an integrand built from float32
tensors, so every coefficient carries ~1e-7 relative noise, which the update's cancellations amplify (up to ~3e-5
on some trajectories). minidiff integrates the polynomial exactly. So LMS is checked three ways: its coefficients
against diffusers' ``get_lms_coefficient`` (1e-6); trajectories against diffusers' class whose
``get_lms_coefficient`` runs the same quadrature on float64 sigmas (:class:`LMSFloat64Quadrature`, 1e-6); and
trajectories against stock diffusers, recorded as their own case at 1e-4.
"""

from __future__ import annotations

import inspect
import logging
import math

import diffusers
import pytest
import scipy.integrate
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff.schedulers as md
from minidiff.schedulers.lms import lms_coefficients
from parity.configs import assert_same_config, public
from parity.report import compare, compare_exact

TOL = 1e-6
BETA_TIMESTEP_TOL = 1e-12
STOCK_LMS_TOL = 1e-4
NAMES = ("LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")
LMS, EULER, EULER_A, DPM = NAMES
HYPOTHESIS = settings(max_examples=15, deadline=None, derandomize=True)
logging.getLogger("diffusers").setLevel(logging.ERROR)  # "scale_model_input should be called before step" etc.


class LMSFloat64Quadrature(diffusers.LMSDiscreteScheduler):
    """diffusers' LMS scheduler with one change: the coefficient integral runs on float64 sigmas (same integrand,
    same ``quad`` call), removing the float32 noise of the stock version. Everything else is diffusers' code."""

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        sigmas = self.sigmas.double().tolist()

        def lagrange_basis(tau: float) -> float:
            value = 1.0
            for k in range(order):
                if k != current_order:
                    value *= (tau - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
            return value

        return scipy.integrate.quad(lagrange_basis, sigmas[t], sigmas[t + 1], epsrel=1e-4)[0]


def reference_class(name: str):
    return LMSFloat64Quadrature if name == "LMSDiscreteScheduler" else getattr(diffusers, name)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet: a t-dependent gain on x plus a fixed nonlinear term."""
    return x * (0.5 + 0.4 * math.cos(float(t) / 150)) + 0.1 * torch.sin(3 * x)


def start_sample(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def compare_step(name: str, case: str, actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """``compare`` on the finite entries, after checking that both have their non-finite values at the same places."""
    bad = ~torch.isfinite(expected)
    if bad.any():
        assert torch.equal(bad, ~torch.isfinite(actual)), f"{name} / {case}: non-finite values differ from diffusers'"
        actual, expected = actual[~bad], expected[~bad]
    compare(name, case, actual, expected, tol)


def reference_x0(name: str, ref, out_ref, x_ref: torch.Tensor) -> torch.Tensor:
    """diffusers' x0 estimate of the step just taken. DPM-Solver does not return one: use the converted model
    output it stored (x0 for (sde-)dpmsolver++; eps for (sde-)dpmsolver, turned into x0 with diffusers' own
    alpha_t, sigma_t)."""
    if name != "DPMSolverMultistepScheduler":
        return out_ref.pred_original_sample
    stored = ref.model_outputs[-1]
    if ref.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
        return stored
    alpha_t, sigma_t = ref._sigma_to_alpha_sigma_t(ref.sigmas[ref.step_index - 1])
    return (x_ref - sigma_t * stored) / alpha_t


def run_side_by_side(name, case, mine, ref, timesteps=None, sample=None, step_kwargs=None, seed=0, on_step=None):
    """Walk both schedulers over ``timesteps`` (default: all), each on its own trajectory; compare every step.
    Returns minidiff's samples after each step. ``on_step(i, t, x_mine, x_ref)`` runs after step i (inpainting)."""
    timesteps = ref.timesteps if timesteps is None else timesteps
    x_mine = x_ref = start_sample() if sample is None else sample
    kwargs_mine, kwargs_ref = dict(step_kwargs or {}), dict(step_kwargs or {})
    if "generator" in inspect.signature(ref.step).parameters:  # same seed, separate generators
        kwargs_mine["generator"] = torch.Generator().manual_seed(seed)
        kwargs_ref["generator"] = torch.Generator().manual_seed(seed)
    trajectory = []
    for i, t in enumerate(timesteps):
        in_mine, in_ref = mine.scale_model_input(x_mine, t), ref.scale_model_input(x_ref, t)
        compare_step(name, f"{case}: scale_model_input", in_mine, in_ref)
        try:
            out_ref = ref.step(toy_model(in_ref, t), t, x_ref, **kwargs_ref)
        except IndexError:  # a duplicated first timestep makes diffusers run off its sigmas on the last step
            with pytest.raises(RuntimeError, match="already took all"):
                mine.step(toy_model(in_mine, t), t, x_mine, **kwargs_mine)
            break
        out_mine = mine.step(toy_model(in_mine, t), t, x_mine, **kwargs_mine)
        compare_step(name, f"{case}: prev_sample", out_mine.prev_sample, out_ref.prev_sample)
        compare_step(name, f"{case}: pred_original_sample", out_mine.pred_original_sample,
                     reference_x0(name, ref, out_ref, x_ref))
        x_mine, x_ref = out_mine.prev_sample, out_ref.prev_sample
        if on_step is not None:
            x_mine, x_ref = on_step(i, t, x_mine, x_ref)
        trajectory.append(x_mine)
    return trajectory


def build_pair(name: str, config: dict, num_inference_steps: int):
    """The two schedulers from one config, with their schedules compared."""
    mine, ref = getattr(md, name)(**config), reference_class(name)(**config)
    mine.set_timesteps(num_inference_steps)
    ref.set_timesteps(num_inference_steps)
    if config.get("use_beta_sigmas"):
        # the Beta quantiles are minidiff's own (1e-14 from scipy's): their float32 sigmas agree bit for bit, the
        # float64 fractional timesteps found back from them to rounding
        compare(name, "timesteps (beta sigmas)", mine.timesteps, ref.timesteps, BETA_TIMESTEP_TOL)
    else:
        compare_exact(name, "timesteps", mine.timesteps, ref.timesteps)
    compare_exact(name, "sigmas", mine.sigmas, ref.sigmas)
    compare_exact(name, "init_noise_sigma", torch.as_tensor(mine.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma))
    return mine, ref


def check_against_stock_lms(config: dict, num_inference_steps: int, trajectory: list[torch.Tensor]) -> None:
    """Stock diffusers' LMS from the same start: its coefficients against minidiff's exact ones (1e-6) and its
    samples against minidiff's trajectory (1e-4, see the module docstring)."""
    name = "LMSDiscreteScheduler"
    stock, mine = diffusers.LMSDiscreteScheduler(**config), md.LMSDiscreteScheduler(**config)
    stock.set_timesteps(num_inference_steps)
    mine.set_timesteps(num_inference_steps)
    x = start_sample()
    for i, (t, x_mine) in enumerate(zip(stock.timesteps, trajectory)):
        order = min(i + 1, 4)
        expected = torch.tensor([stock.get_lms_coefficient(order, i, k) for k in range(order)], dtype=torch.float64)
        exact = torch.tensor(lms_coefficients(mine.sigmas, i, order))
        compare(name, "coefficients vs stock diffusers", exact, expected, TOL)
        x = stock.step(toy_model(stock.scale_model_input(x, t), t), t, x).prev_sample
        compare(name, "trajectories vs stock diffusers (float32 quadrature): prev_sample", x_mine, x, STOCK_LMS_TOL)


# ---- drawn configs -------------------------------------------------------------------------------------------------
BETAS = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (0.0001, 0.02)}


@st.composite
def common_options(draw, prediction_types=("epsilon", "v_prediction", "sample")) -> dict:
    schedule = draw(st.sampled_from(sorted(BETAS)))
    spacing = draw(st.sampled_from(["linspace", "leading", "trailing"]))
    return dict(
        num_train_timesteps=draw(st.sampled_from([1000, 1100, 500])),
        beta_schedule=schedule,
        beta_start=BETAS[schedule][0],
        beta_end=BETAS[schedule][1],
        prediction_type=draw(st.sampled_from(prediction_types)),
        timestep_spacing=spacing,
        steps_offset=draw(st.integers(0, 1)),
    )


SIGMA_SPACING = st.sampled_from([{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                 {"use_beta_sigmas": True}])


@st.composite
def lms_options(draw) -> dict:
    return dict(draw(common_options()), **draw(SIGMA_SPACING))


@st.composite
def euler_options(draw) -> dict:
    spacing = draw(SIGMA_SPACING)
    options = dict(
        draw(common_options()),
        **spacing,
        rescale_betas_zero_snr=draw(st.booleans()),
        interpolation_type=draw(st.sampled_from(["linear", "log_linear"])),
        final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
        timestep_type=draw(st.sampled_from(["discrete", "continuous"])),
    )
    if spacing and draw(st.booleans()):  # a respaced grid may take its own ends
        options.update(sigma_min=0.03, sigma_max=draw(st.sampled_from([14.6, 80.0])))
    return options


@st.composite
def euler_ancestral_options(draw) -> dict:
    return dict(draw(common_options(("epsilon", "v_prediction"))), rescale_betas_zero_snr=draw(st.booleans()))


@st.composite
def dpm_options(draw) -> dict:
    algorithm = draw(st.sampled_from(["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"]))
    options = dict(
        draw(common_options()),
        algorithm_type=algorithm,
        solver_order=draw(st.sampled_from([1, 2] if algorithm == "sde-dpmsolver" else [1, 2, 3])),
        solver_type=draw(st.sampled_from(["midpoint", "heun"])),
        lower_order_final=draw(st.booleans()),
        euler_at_final=draw(st.booleans()),
        **draw(SIGMA_SPACING),
        rescale_betas_zero_snr=draw(st.booleans()),
        final_sigmas_type="sigma_min" if algorithm.endswith("dpmsolver") else draw(st.sampled_from(["zero", "sigma_min"])),
        lambda_min_clipped=draw(st.sampled_from([-float("inf"), -5.1])),
        thresholding=draw(st.booleans()),
    )
    if options["thresholding"]:
        options.update(
            dynamic_thresholding_ratio=draw(st.sampled_from([0.995, 0.87])),
            sample_max_value=draw(st.sampled_from([1.0, 0.5, 2.0])),
        )
    return options


OPTIONS = {
    "LMSDiscreteScheduler": lms_options(),
    "EulerDiscreteScheduler": euler_options(),
    "EulerAncestralDiscreteScheduler": euler_ancestral_options(),
    "DPMSolverMultistepScheduler": dpm_options(),
}
STEPS = st.integers(1, 30)  # the named configs below add fixed coverage of the common combinations


# ---- whole trajectories ----------------------------------------------------------------------------------------------
@HYPOTHESIS
@given(config=lms_options(), num_inference_steps=STEPS)
def test_lms_trajectories(config, num_inference_steps):
    mine, ref = build_pair("LMSDiscreteScheduler", config, num_inference_steps)
    trajectory = run_side_by_side("LMSDiscreteScheduler", "trajectories", mine, ref)
    check_against_stock_lms(config, num_inference_steps, trajectory)


@HYPOTHESIS
@given(
    config=euler_options(),
    num_inference_steps=STEPS,
    churn=st.sampled_from(
        [dict(), dict(s_churn=0.5), dict(s_churn=3.0, s_noise=0.8), dict(s_churn=2.0, s_tmin=1.0, s_tmax=10.0)]
    ),
)
def test_euler_trajectories(config, num_inference_steps, churn):
    mine, ref = build_pair("EulerDiscreteScheduler", config, num_inference_steps)
    run_side_by_side("EulerDiscreteScheduler", "trajectories", mine, ref, step_kwargs=churn, seed=num_inference_steps)


@HYPOTHESIS
@given(config=euler_ancestral_options(), num_inference_steps=STEPS, seed=st.integers(0, 2**16))
def test_euler_ancestral_trajectories(config, num_inference_steps, seed):
    mine, ref = build_pair("EulerAncestralDiscreteScheduler", config, num_inference_steps)
    run_side_by_side("EulerAncestralDiscreteScheduler", "trajectories", mine, ref, seed=seed)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(config=dpm_options(), num_inference_steps=STEPS)
def test_dpm_solver_trajectories(config, num_inference_steps):
    mine, ref = build_pair("DPMSolverMultistepScheduler", config, num_inference_steps)
    run_side_by_side("DPMSolverMultistepScheduler", "trajectories", mine, ref)


# ---- named configs: the combinations that matter in practice, each run whatever hypothesis draws --------------------
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD = dict(SD_BETAS, timestep_spacing="leading", steps_offset=1)  # Stable Diffusion's scheduler_config.json
V_ZERO_SNR = dict(SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
DPM_GRID = [
    (f"{algorithm} order {order} {solver_type}{' karras' if karras else ''}",
     dict(SD, algorithm_type=algorithm, solver_order=order, solver_type=solver_type, use_karras_sigmas=karras,
          final_sigmas_type="zero" if algorithm == "dpmsolver++" else "sigma_min"), 12, {})
    for algorithm in ("dpmsolver++", "dpmsolver") for order in (1, 2, 3) for solver_type in ("midpoint", "heun")
    for karras in (False, True)
]
NAMED_CONFIGS = {
    "LMSDiscreteScheduler": [
        ("SD", SD, 25, {}), ("SD karras", dict(SD, use_karras_sigmas=True), 20, {}), ("one step", SD, 1, {}),
        ("v-prediction trailing", dict(SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing"), 15, {}),
        ("sample prediction cosine", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"), 10, {}),
    ],
    "EulerDiscreteScheduler": [
        ("SD", SD, 25, {}), ("SD karras", dict(SD, use_karras_sigmas=True), 20, {}), ("one step", SD, 1, {}),
        ("v-prediction zero SNR", dict(V_ZERO_SNR, final_sigmas_type="sigma_min"), 15, {}),
        ("log-linear", dict(SD, interpolation_type="log_linear"), 10, {}),
        ("continuous timesteps (EDM v)", dict(SD_BETAS, prediction_type="v_prediction", timestep_type="continuous",
                                          use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0), 12, {}),
        ("churn", SD, 20, dict(s_churn=2.0, s_noise=1.003)),
        ("churn in a sigma window", dict(SD, use_karras_sigmas=True), 20, dict(s_churn=40.0, s_tmin=0.05, s_tmax=10.0)),
    ],
    "EulerAncestralDiscreteScheduler": [
        ("SD", SD, 25, {}), ("one step", SD, 1, {}), ("v-prediction zero SNR", V_ZERO_SNR, 15, {}),
        ("linspace cosine", dict(beta_schedule="squaredcos_cap_v2"), 10, {}),
    ],
    "DPMSolverMultistepScheduler": DPM_GRID + [
        ("SD 25 steps", SD, 25, {}), ("one step", SD, 1, {}), ("v-prediction zero SNR", V_ZERO_SNR, 15, {}),
        ("thresholding sample prediction", dict(prediction_type="sample", thresholding=True, sample_max_value=0.5), 10, {}),
        ("euler at final, no lower order", dict(SD, euler_at_final=True, lower_order_final=False), 20, {}),
        ("cosine with lambda clip", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 10, {}),
    ],
}
NAMED = [(name, *row) for name, rows in NAMED_CONFIGS.items() for row in rows]


@pytest.mark.parametrize(
    "name, label, config, num_inference_steps, step_kwargs", NAMED, ids=[f"{row[0]}-{row[1]}" for row in NAMED]
)
def test_named_configs(name, label, config, num_inference_steps, step_kwargs):
    mine, ref = build_pair(name, config, num_inference_steps)
    trajectory = run_side_by_side(name, "trajectories", mine, ref, step_kwargs=step_kwargs)
    if name == "LMSDiscreteScheduler":
        check_against_stock_lms(config, num_inference_steps, trajectory)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_trajectories(name):
    """fp16 samples: Euler, Euler ancestral and DPM-Solver compute in float32 and cast back, LMS stays in fp16,
    as in diffusers; the results agree bit for bit, so the fp32 tolerance applies."""
    config = dict(SD, thresholding=True, dynamic_thresholding_ratio=0.9) if name == DPM else SD
    mine, ref = build_pair(name, config, 10)
    trajectory = run_side_by_side(name, "fp16 trajectories", mine, ref, sample=start_sample().half())
    assert trajectory[-1].dtype == torch.float16


# ---- img2img and inpainting: starting mid-schedule, re-noising after steps -----------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    data=st.data(),
    num_inference_steps=st.integers(2, 25),
    strength=st.sampled_from([0.3, 0.5, 0.75, 1.0]),
    inpaint=st.booleans(),
)
def test_img2img_and_inpaint_start_mid_schedule(name, data, num_inference_steps, strength, inpaint):
    """The img2img recipe: ``t_start = N - int(N * strength)`` (at least one step left), ``set_begin_index(t_start *
    order)``, the image noised to ``timesteps[t_start]``; inpainting re-noises the image to the next timestep after
    each step and blends it in."""
    mine, ref = build_pair(name, data.draw(OPTIONS[name]), num_inference_steps)
    t_start = num_inference_steps - max(int(num_inference_steps * strength), 1)
    timesteps = ref.timesteps[t_start * ref.order :]
    mine.set_begin_index(t_start * mine.order)
    ref.set_begin_index(t_start * ref.order)
    image, noise = start_sample(1), start_sample(2)
    first = timesteps[:1].repeat(image.shape[0])
    noisy_mine, noisy_ref = mine.add_noise(image, noise, first), ref.add_noise(image, noise, first)
    compare(name, "img2img: add_noise at the begin index", noisy_mine, noisy_ref, TOL)

    def renoise(i, t, x_mine, x_ref):
        if not inpaint or i + 1 >= len(timesteps):
            return x_mine, x_ref
        following = timesteps[i + 1 : i + 2]
        proper_mine, proper_ref = mine.add_noise(image, noise, following), ref.add_noise(image, noise, following)
        compare(name, "inpaint: add_noise after a step", proper_mine, proper_ref, TOL)
        return 0.5 * (x_mine + proper_mine), 0.5 * (x_ref + proper_ref)

    run_side_by_side(name, "img2img (set_begin_index)", mine, ref, timesteps=timesteps, sample=noisy_ref, on_step=renoise)


# ---- training-time forward process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES[:3])
def test_add_noise_before_set_timesteps(name):
    """Training noises with integer timesteps on the full training schedule (DPM-Solver: see tests/, diffusers
    reads its ascending sigmas by position there)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    mine, ref = getattr(md, name)(**config), reference_class(name)(**config)
    compare(name, "alphas_cumprod", mine.alphas_cumprod, ref.alphas_cumprod, TOL)
    compare_exact(name, "training timesteps and sigmas", torch.cat([mine.timesteps, mine.sigmas]),
                  torch.cat([ref.timesteps.float(), ref.sigmas]))
    timesteps = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(0))
    x0, noise = torch.randn((4, 3, 4, 4)), torch.randn((4, 3, 4, 4))
    compare(name, "add_noise (training)", mine.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps), TOL)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_on_the_inference_schedule(name):
    mine, ref = build_pair(name, dict(timestep_spacing="trailing"), 20)
    if name == "DPMSolverMultistepScheduler":
        for attribute in ("alpha_t", "sigma_t", "lambda_t"):
            compare(name, f"{attribute} (VP schedule)", getattr(mine, attribute), getattr(ref, attribute), TOL)
    timesteps = ref.timesteps[[0, 7, 19]]
    x0, noise = torch.randn((3, 3, 4, 4)), torch.randn((3, 3, 4, 4))
    noisy_mine, noisy_ref = mine.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps)
    compare(name, "add_noise (inference schedule)", noisy_mine, noisy_ref, TOL)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_euler_get_velocity(spacing):
    mine, ref = build_pair("EulerDiscreteScheduler", dict(timestep_spacing=spacing, prediction_type="v_prediction"), 10)
    timesteps = ref.timesteps[[0, 4, 9]]
    x0, noise = torch.randn((3, 3, 4, 4)), torch.randn((3, 3, 4, 4))
    velocity_mine, velocity_ref = mine.get_velocity(x0, noise, timesteps), ref.get_velocity(x0, noise, timesteps)
    compare("EulerDiscreteScheduler", "get_velocity", velocity_mine, velocity_ref, TOL)


# ---- configs across libraries ----------------------------------------------------------------------------------------
def diffusers_keys_and_defaults(cls) -> dict:
    import inspect

    parameters = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("self", "kwargs")}


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_are_diffusers_keys_with_diffusers_defaults(name):
    assert diffusers_keys_and_defaults(getattr(diffusers, name)) == dict(getattr(md, name).config_class())


CROSS_CONFIGS = {
    "LMSDiscreteScheduler": dict(use_karras_sigmas=True, prediction_type="v_prediction"),
    "EulerDiscreteScheduler": dict(timestep_spacing="leading", steps_offset=1, interpolation_type="log_linear"),
    "EulerAncestralDiscreteScheduler": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "DPMSolverMultistepScheduler": dict(solver_order=3, use_karras_sigmas=True, thresholding=True, euler_at_final=True),
}


@pytest.mark.parametrize("name", NAMES)
def test_from_config_and_folders_across_libraries(name, tmp_path):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **CROSS_CONFIGS[name])
    mine_cls, ref_cls = getattr(md, name), getattr(diffusers, name)
    mine, ref = mine_cls(**config), ref_cls(**config)
    assert_same_config(mine_cls.from_config(ref.config).config, ref.config)
    assert_same_config(ref_cls.from_config(dict(mine.config)).config, ref.config)
    mine.save_pretrained(tmp_path / "mine")
    ref.save_pretrained(tmp_path / "ref")
    from_mine_folder = ref_cls.from_pretrained(tmp_path / "mine")
    from_ref_folder = mine_cls.from_pretrained(tmp_path / "ref")
    assert public(from_mine_folder.config) == public(ref.config)
    assert public(from_ref_folder.config) == public(mine.config)
    from_ref_folder.set_timesteps(8)
    from_mine_folder.set_timesteps(8)
    if name == "LMSDiscreteScheduler":  # stock diffusers LMS: see the module docstring
        from_mine_folder = reference_class(name).from_config(from_mine_folder.config)
        from_mine_folder.set_timesteps(8)
    run_side_by_side(name, "built across libraries (from_config, folders)", from_ref_folder, from_mine_folder)


# ---- diffusers' own test loops and expected values (tests/schedulers/test_scheduler_*.py) -------------------------------
def diffusers_test_sample(flip: bool = False) -> torch.Tensor:
    values = torch.arange(4 * 3 * 8 * 8)
    values = values.flip(-1) if flip else values
    return (values.reshape(3, 8, 8, 4) / values.numel()).permute(3, 0, 1, 2)


def diffusers_test_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, 1, 1, 1).to(sample.dtype)
    return sample * t / (t + 1)


def karras_family_loop(library, name: str, config: dict, t_start: int | None) -> torch.Tensor:
    """diffusers' full_loop for LMS/Euler/EulerA: note it steps the *scaled* sample, as those tests do."""
    scheduler = getattr(library, name)(**config)
    scheduler.set_timesteps(10)
    generator = torch.manual_seed(0)
    sample = diffusers_test_sample() * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if t_start is not None:
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        sample = scheduler.add_noise(sample, diffusers_test_sample(flip=True), timesteps[:1])
    for t in timesteps:
        sample = scheduler.scale_model_input(sample, t)
        kwargs = {} if name == "LMSDiscreteScheduler" else dict(generator=generator)
        sample = scheduler.step(diffusers_test_model(sample, t), t, sample, **kwargs).prev_sample
    return sample


DPM_TEST_CONFIG = dict(
    solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0, algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=False, euler_at_final=False, lambda_min_clipped=-float("inf"),
    variance_type=None, final_sigmas_type="sigma_min",
)


def dpm_loop(library, name: str, config: dict, t_start: int | None) -> torch.Tensor:
    scheduler = library.DPMSolverMultistepScheduler(**{**DPM_TEST_CONFIG, **config})
    scheduler.set_timesteps(10)
    sample, timesteps = diffusers_test_sample(), scheduler.timesteps
    if t_start is not None:
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        sample = scheduler.add_noise(sample, diffusers_test_sample(flip=True), timesteps[:1])
    generator = torch.manual_seed(0)
    for t in timesteps:
        sample = scheduler.step(diffusers_test_model(sample, t), t, sample, generator=generator).prev_sample
    return sample


T1100 = dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
T1100_V, T1100_KARRAS = dict(T1100, prediction_type="v_prediction"), dict(T1100, use_karras_sigmas=True)
THRESHOLD = dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5)
K, D = karras_family_loop, dpm_loop
# (scheduler, test, loop, config, t_start, statistic, expected, tolerance) from diffusers' tests/schedulers
DIFFUSERS_EXPECTED = [
    (LMS, "full_loop_no_noise", K, T1100, None, "sum", 1006.388, 1e-2),
    (LMS, "full_loop_with_v_prediction", K, T1100_V, None, "sum", 0.0017, 1e-2),
    (LMS, "full_loop_device_karras_sigmas", K, T1100_KARRAS, None, "sum", 3812.9927, 2e-2),
    (LMS, "full_loop_with_noise", K, T1100, 8, "sum", 27663.6895, 1e-2),
    (EULER, "full_loop_no_noise", K, T1100, None, "sum", 10.0807, 1e-2),
    (EULER, "full_loop_with_v_prediction", K, T1100_V, None, "sum", 0.0002, 1e-2),
    (EULER, "full_loop_device_karras_sigmas", K, T1100_KARRAS, None, "sum", 124.52299499511719, 1e-2),
    (EULER, "full_loop_with_noise", K, T1100, 8, "sum", 57062.9297, 1e-2),
    (EULER_A, "full_loop_no_noise", K, T1100, None, "sum", 152.3192, 1e-2),
    (EULER_A, "full_loop_with_v_prediction", K, T1100_V, None, "sum", 108.4439, 1e-2),
    (EULER_A, "full_loop_with_noise", K, T1100, 8, "sum", 56163.0508, 1e-2),
    (DPM, "full_loop_no_noise", D, {}, None, "mean", 0.3301, 1e-3),
    (DPM, "full_loop_no_noise_thres", D, THRESHOLD, None, "mean", 1.1364, 1e-3),
    (DPM, "full_loop_with_v_prediction", D, dict(prediction_type="v_prediction"), None, "mean", 0.2251, 1e-3),
    (DPM, "full_loop_with_karras_and_v_prediction", D, dict(prediction_type="v_prediction", use_karras_sigmas=True),
     None, "mean", 0.2096, 1e-3),
    (DPM, "full_loop_with_noise", D, {}, 5, "sum", 318.4111, 1e-2),
]


@pytest.mark.parametrize(
    "name, test, loop, config, t_start, statistic, expected, tolerance",
    DIFFUSERS_EXPECTED,
    ids=[f"{row[0]}-{row[1]}" for row in DIFFUSERS_EXPECTED],
)
def test_diffusers_expected_values(name, test, loop, config, t_start, statistic, expected, tolerance):
    mine, ref = loop(md, name, config, t_start), loop(diffusers, name, config, t_start)
    value = mine.abs().sum() if statistic == "sum" else mine.abs().mean()
    assert abs(value.item() - expected) < tolerance, f"{name} {test}: {statistic} {value.item()} vs diffusers' {expected}"
    # LMS here is stock diffusers (float32 quadrature); these ten steps stay within 1e-6 of it
    compare(name, f"diffusers test {test}: final sample", mine, ref, TOL)


@pytest.mark.parametrize("options", [dict(), dict(interpolation_type="log_linear", prediction_type="v_prediction"),
                                     dict(final_sigmas_type="sigma_min", prediction_type="sample"),
                                     dict(use_karras_sigmas=True)])
@pytest.mark.parametrize("custom", ["timesteps", "sigmas"])
def test_euler_custom_timesteps_and_sigmas(options, custom):
    """``set_timesteps(timesteps=...)`` / ``(sigmas=...)`` (diffusers' custom schedules), uneven ones included."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **options)
    mine, ref = md.EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    if custom == "timesteps" and options.get("use_karras_sigmas"):
        with pytest.raises(ValueError, match="custom timesteps cannot be combined with use_karras_sigmas=True"):
            mine.set_timesteps(timesteps=[900, 500, 100])
        return
    schedule = {"timesteps": [999, 850.5, 600, 301, 120, 15], "sigmas": [14.6, 6.1, 2.0, 0.9, 0.25, 0.03, 0.0]}
    run_custom_schedule(mine, ref, f"custom {custom} {options}", **{custom: schedule[custom]})


def run_custom_schedule(mine, ref, case: str, **schedule) -> None:
    """``set_timesteps(**schedule)`` on both: the same timesteps and sigmas exactly, then the same trajectory."""
    name = type(mine).__name__
    for scheduler in (mine, ref):
        scheduler.set_timesteps(**schedule)
    compare_exact(name, f"{case}: timesteps", mine.timesteps, ref.timesteps)
    compare_exact(name, f"{case}: sigmas", mine.sigmas, ref.sigmas)
    run_side_by_side(name, case, mine, ref)


@pytest.mark.parametrize("options", [dict(), dict(solver_order=3, final_sigmas_type="sigma_min"),
                                     dict(algorithm_type="sde-dpmsolver++", prediction_type="v_prediction")])
def test_dpm_solver_custom_timesteps(options):
    """DPMSolverMultistepScheduler.set_timesteps(timesteps=[...]) (diffusers' custom integer schedule)."""
    mine, ref = md.DPMSolverMultistepScheduler(**options), diffusers.DPMSolverMultistepScheduler(**options)
    run_custom_schedule(mine, ref, f"custom timesteps {options}", timesteps=[999, 850, 600, 301, 120, 15])


@pytest.mark.parametrize("steps", [4, 15, 25])
@pytest.mark.parametrize("options", [dict(), dict(prediction_type="v_prediction", algorithm_type="sde-dpmsolver++"),
                                     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          solver_order=3, final_sigmas_type="zero")])
def test_dpm_solver_lu_lambdas(options, steps):
    """``use_lu_lambdas``: DPM-Solver's uniform-lambda step sizes, timesteps rounded, as diffusers."""
    mine = md.DPMSolverMultistepScheduler(use_lu_lambdas=True, **options)
    ref = diffusers.DPMSolverMultistepScheduler(use_lu_lambdas=True, **options)
    for scheduler in (mine, ref):
        scheduler.set_timesteps(steps)
    compare_exact("DPMSolverMultistepScheduler", "use_lu_lambdas: timesteps", mine.timesteps, ref.timesteps)
    compare_exact("DPMSolverMultistepScheduler", "use_lu_lambdas: sigmas", mine.sigmas, ref.sigmas)
    run_side_by_side("DPMSolverMultistepScheduler", f"use_lu_lambdas {options}", mine, ref)
