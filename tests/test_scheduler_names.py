"""Samplers by name: every A1111 name resolves to the class and options diffusers' scheduler overview gives it, the
suffixes pick a sigma spacing, and unknown names say what is accepted and what is nearest."""

from __future__ import annotations

import pytest

import minidiff.schedulers as md
from minidiff.schedulers import by_name
from minidiff.schedulers.names import SAMPLERS, sampler_names

SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_name_builds_its_class_on_a_base_config(name):
    class_name, options = SAMPLERS[name]
    scheduler = by_name(name, SD_CONFIG)
    assert type(scheduler).__name__ == class_name
    for option, value in options.items():
        assert getattr(scheduler.config, option) == value
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(4)  # a working sampler, not just a constructed one
    assert len(scheduler.timesteps) >= 4


@pytest.mark.parametrize("name, class_name, options", [
    ("dpm++ 2m karras", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, algorithm_type="dpmsolver++")),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
     dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")),
    ("euler-a", "EulerAncestralDiscreteScheduler", {}),
    ("Euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("dpm++", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=False)),
    ("k_dpm_2_a", "KDPM2AncestralDiscreteScheduler", {}),
    ("LMS Karras", "LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("Euler Exponential", "EulerDiscreteScheduler", dict(use_exponential_sigmas=True, use_karras_sigmas=False)),
    ("UniPC Beta", "UniPCMultistepScheduler", dict(use_beta_sigmas=True)),
    ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
    ("plms", "PNDMScheduler", dict(skip_prk_steps=True)),
])
def test_spellings_and_suffixes(name, class_name, options):
    scheduler = by_name(name)
    assert type(scheduler).__name__ == class_name
    for option, value in options.items():
        assert getattr(scheduler.config, option) == value


def test_the_name_fixes_the_spacing_and_overrides_come_last():
    karras = md.DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3)
    assert by_name("DPM++ 2M", karras.config).config.use_karras_sigmas is False  # the name says no Karras
    assert by_name("DPM++ 2M", karras.config).config.solver_order == 2
    assert by_name("DPM++ 2M", karras.config, solver_order=1).config.solver_order == 1
    assert by_name("Euler", karras.config).config.use_karras_sigmas is False


def test_sampler_names_lists_suffixes_only_where_the_class_has_them():
    names = sampler_names()
    assert "DPM++ 2M Karras" in names and "Euler a" in names and "LCM" in names
    assert "DDIM Karras" not in names
    for name in names:
        by_name(name)  # each listed name is accepted


@pytest.mark.parametrize("name, message", [
    ("dpm++ 2m karas", r"unknown sampler 'dpm\+\+ 2m karas'; did you mean 'DPM\+\+ 2M Karras'"),
    ("eulr a", r"did you mean 'Euler a'"),
    ("warp drive", r"unknown sampler 'warp drive'.*Accepted: Euler, Euler Karras"),
    ("", "sampler name must be a non-empty string"),
    ("DDIM Karras", r"DDIM \(DDIMScheduler\) has no use_karras_sigmas.*use 'DDIM' without the suffix"),
])
def test_bad_names(name, message):
    with pytest.raises(ValueError, match=message):
        by_name(name)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['eta'\]"):
        by_name("Euler", eta=0.5)
