"""Samplers by the names people use: ``by_name("DPM++ 2M Karras")`` is a DPMSolverMultistepScheduler with
``use_karras_sigmas=True``.

The names are AUTOMATIC1111's (and ComfyUI's, which match them), mapped to diffusers' classes as diffusers' scheduler
overview does. Matching ignores case, spaces, hyphens and underscores ("dpm++ 2m karras", "euler-a"); a trailing
"Karras", "Exponential" or "Beta" picks that sigma spacing on any scheduler that has it. Class names
("UniPCMultistepScheduler") are accepted too. A name sets every option that defines it: "DPM++ 2M" switches Karras
sigmas off even if the base config had them on.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from minidiff.configuration import Config

# name -> (class name, options that make it this sampler)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 3M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "DPM++ 2S": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": False}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
}
# the short names minidiff's CLI took before (kept so old commands run)
ALIASES = {"euler-a": "Euler a", "dpm++": "DPM++ 2M", "k_lms": "LMS", "k_euler": "Euler", "k_euler_a": "Euler a",
           "k_heun": "Heun", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "dpmpp_2m": "DPM++ 2M",
           "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "dpmpp_3m_sde": "DPM++ 3M SDE"}
SIGMA_SUFFIXES = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def normalise(name: str) -> str:
    """Lower case without spaces, hyphens or underscores: "DPM++ 2M Karras" -> "dpm++2mkarras"."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _scheduler_class(class_name: str):
    import minidiff.schedulers as schedulers

    return getattr(schedulers, class_name)


def _lookup() -> dict[str, str]:
    """normalised name -> canonical name, for the names, the aliases and the class names."""
    table = {normalise(name): name for name in SAMPLERS}
    table.update({normalise(alias): name for alias, name in ALIASES.items()})
    table.update({normalise(class_name): class_name for class_name, _ in SAMPLERS.values()})
    return table


def sampler_names() -> list[str]:
    """Every accepted sampler name (the A1111 names and their Karras/Exponential/Beta forms where the scheduler
    has that spacing), in table order."""
    names = []
    for name, (class_name, _) in SAMPLERS.items():
        names.append(name)
        fields = _scheduler_class(class_name).config_class.field_names()
        names += [f"{name} {suffix.title()}" for suffix, option in SIGMA_SUFFIXES.items() if option in fields]
    return names


def resolve(name: str) -> tuple[type, dict[str, Any]]:
    """The scheduler class and the options a sampler name stands for; ValueError for an unknown name, listing the
    accepted ones and the nearest."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"sampler name must be a non-empty string, got {name!r}")
    key, table = normalise(name), _lookup()
    spacing = None
    if key not in table:
        for suffix, option in SIGMA_SUFFIXES.items():
            if key.endswith(suffix) and key[: -len(suffix)] in table:
                key, spacing = key[: -len(suffix)], option
                break
    if key not in table:
        known = sampler_names()
        by_key = {normalise(k): k for k in known}
        nearest = [by_key[k] for k in difflib.get_close_matches(normalise(name), list(by_key), n=2, cutoff=0.6)]
        hint = f"; did you mean {' or '.join(repr(n) for n in nearest)}?" if nearest else ""
        raise ValueError(f"unknown sampler {name!r}{hint} Accepted: {', '.join(known)}")
    canonical = table[key]
    class_name, options = SAMPLERS.get(canonical, (canonical, {}))
    cls = _scheduler_class(class_name)
    fields = cls.config_class.field_names()
    options = dict(options)
    for option in SIGMA_SUFFIXES.values():  # the name fixes the spacing: on if it says so, else off
        if option in fields:
            options[option] = option == spacing
    if spacing is not None and spacing not in fields:
        raise ValueError(f"{canonical} ({class_name}) has no {spacing}: it steps on its own timestep grid; use "
                         f"{canonical!r} without the suffix")
    return cls, options


def by_name(name: str, config: dict | Config | None = None, **overrides: Any):
    """A scheduler from a sampler name, built on ``config`` (e.g. ``pipe.scheduler.config``, so the model's beta
    schedule and prediction type carry over, as ``from_config`` does) with the name's options and then
    ``overrides`` on top. ``by_name("Euler a")``, ``by_name("dpm++ 2m karras", pipe.scheduler.config)``."""
    cls, options = resolve(name)
    return cls.from_config(config if config is not None else {}, **{**options, **overrides})
