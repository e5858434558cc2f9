"""What every scheduler shares: its output type, config I/O, the forward process and argument checks.

A scheduler is configured once (``DDIMScheduler(beta_schedule="scaled_linear")`` or ``from_config``), told how many
steps to take (``set_timesteps(N)``), then walked by a sampling loop with ``step(model_output, t, x_t)``.

Schedulers, and so the pipelines that hold them, are not thread-safe: a sampling run is state in the scheduler
(its timesteps, step index and history). ``set_timesteps`` records the thread that owns the run, and ``step`` from
any other thread while that run is set raises a RuntimeError. Give each thread its own pipeline
(``copy.deepcopy(pipe)``) or scheduler (``type(s).from_config(s.config)``).
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from minidiff.configuration import Config, ConfigMixin, config_attribute
from minidiff.outputs import BaseOutput
from minidiff.schedulers.betas import check_common_options, count_from_trained_betas, make_betas


@dataclass
class SchedulerOutput(BaseOutput):
    """``prev_sample`` is x_{t-1}; ``pred_original_sample`` the model's current estimate of x_0 (None if the
    scheduler does not form one). Unpacks and indexes like the tuple ``(prev_sample, pred_original_sample)``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (B,) to (B, 1, 1, ...) so it broadcasts against ``like``."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


# diffusers' KarrasDiffusionSchedulers that minidiff has: one config builds any of them (``from_config``)
KARRAS_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                     "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                     "DPMSolverSDEScheduler")
# every scheduler minidiff has: the Karras family plus the classes whose configs build only themselves
SCHEDULER_NAMES = (*KARRAS_SCHEDULERS, "DDIMInverseScheduler", "LCMScheduler", "TCDScheduler")


class SchedulerMixin(ConfigMixin):
    """Config handling plus the DDPM forward process; subclasses add ``set_timesteps`` and ``step``.

    Not thread-safe (see the module docstring): one sampling run at a time, driven by one thread.
    """

    config_name = "scheduler_config.json"
    carries_other_options = True  # from_config keeps other schedulers' options, as diffusers does
    order = 1
    timesteps: torch.Tensor | None = None
    # step() before set_timesteps() walks the training schedule the constructor built (diffusers' DDPM, Euler and
    # Euler ancestral do so); the others refuse, as diffusers' do or where they would compute garbage
    steps_training_schedule = False
    _run_thread: int | None = None  # the thread whose set_timesteps started the current run

    def __getattr__(self, name: str) -> Any:
        # `scheduler.num_train_timesteps` reads the config value with a FutureWarning, as in diffusers
        return config_attribute(self, name)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes that this one's config builds, itself first (diffusers' ``compatibles``: the
        Karras-compatible family, or the class alone for DDIMInverse, LCM and TCD)."""
        name = type(self).__name__
        names = dict.fromkeys((name, *KARRAS_SCHEDULERS)) if name in KARRAS_SCHEDULERS else (name,)
        library = importlib.import_module("minidiff")
        return [getattr(library, n) for n in names if n in library.__all__]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{type(self).__name__}({options})"

    # ---- loading and saving ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = None, **overrides: Any):
        """Read ``scheduler_config.json`` from a local folder (``subfolder="scheduler"`` for a pipeline folder)."""
        from minidiff.loading.hub import resolve_folder

        return cls.from_config(cls.load_config(resolve_folder(folder), subfolder=subfolder), **overrides)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.save_config(folder)

    def register_config(self, kwargs: dict[str, Any]) -> Config:
        return super().register_config(count_from_trained_betas(kwargs, type(self).__name__))

    # ---- the noise schedule -------------------------------------------------------------------------------------
    def _init_alpha_bar_schedule(self, kwargs: dict[str, Any]) -> Config:
        """Register and check the config, then set ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod``
        (alpha_bar, float32) and the state before ``set_timesteps``: unit initial noise, no inference steps yet."""
        config = self.register_config(kwargs)
        check_common_options(config)
        self.betas = make_betas(config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        return config

    # ---- the forward process q(x_t | x_0) ----------------------------------------------------------------------
    def _alpha_bar_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] cast to ``like``'s dtype and device (cast first, then index: diffusers' order)."""
        timesteps = torch.as_tensor(timesteps, device=like.device)
        if timesteps.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__} needs integer timesteps, got dtype {timesteps.dtype}")
        T = len(self.alphas_cumprod)
        if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= T):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got min {int(timesteps.min())} max {int(timesteps.max())}")
        return self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (DDPM Eq. 4)."""
        check_same_shape("noise", noise, "original_samples", original_samples)
        alpha_bar = self._alpha_bar_at(timesteps, original_samples)
        return broadcast_to(alpha_bar**0.5, original_samples) * original_samples + broadcast_to(
            (1 - alpha_bar) ** 0.5, original_samples
        ) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022, Sec. 4)."""
        check_same_shape("noise", noise, "sample", sample)
        alpha_bar = self._alpha_bar_at(timesteps, sample)
        return broadcast_to(alpha_bar**0.5, sample) * noise - broadcast_to((1 - alpha_bar) ** 0.5, sample) * sample

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Alpha-bar schedulers feed x_t to the model unchanged."""
        return sample

    # ---- one sampling run at a time ------------------------------------------------------------------------------
    def _begin_run(self) -> None:
        """Called by ``set_timesteps``: the calling thread now owns the sampling run."""
        self._run_thread = threading.get_ident()

    def _check_run_owner(self) -> None:
        """A step from another thread than the one that called ``set_timesteps`` means two sampling loops share this
        scheduler: their steps would interleave and both runs would be wrong."""
        if self._run_thread is not None and self._run_thread != threading.get_ident():
            raise RuntimeError(
                f"{type(self).__name__}.step() was called from another thread than the one that called "
                "set_timesteps(): a scheduler (and so a pipeline) is not thread-safe; give each thread its own "
                "pipeline (copy.deepcopy(pipe)) or scheduler (type(s).from_config(s.config))"
            )

    # ---- checks shared by step() implementations ---------------------------------------------------------------
    def _check_step_args(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        """Before ``set_timesteps`` a scheduler steps only where diffusers' does: through the training schedule its
        constructor built (``steps_training_schedule``, or ``set_timesteps(num_train_timesteps)`` called there)."""
        unset = getattr(self, "num_inference_steps", None) is None and not self.steps_training_schedule
        if self.timesteps is None or unset:
            raise RuntimeError(f"{type(self).__name__}.step() called before set_timesteps(num_inference_steps)")
        self._check_run_owner()
        check_same_shape("model_output", model_output, "sample", sample)


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match")


def as_int_timestep(timestep: Any) -> int:
    """A Python int from an int, a 0-d tensor or a one-element tensor."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"step() takes one timestep, got a tensor of shape {tuple(timestep.shape)}")
        timestep = timestep.item()
    if isinstance(timestep, float) and not timestep.is_integer():
        raise ValueError(f"this scheduler uses integer timesteps, got {timestep}")
    return int(timestep)


def check_timestep(timestep: Any, num_train_timesteps: int) -> int:
    """``timestep`` as a Python int, checked to be a training timestep in [0, num_train_timesteps - 1]."""
    t = as_int_timestep(timestep)
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"timestep {t} is outside [0, {num_train_timesteps - 1}] (num_train_timesteps={num_train_timesteps})")
    return t


def check_in_schedule(timestep: int, timesteps: torch.Tensor) -> None:
    """Reject a timestep that ``set_timesteps`` did not produce, listing (some of) the valid ones."""
    if not bool((timesteps == timestep).any()):
        valid = timesteps.tolist()
        shown = ", ".join(map(str, valid)) if len(valid) <= 12 else ", ".join(map(str, valid[:8])) + f", ... {valid[-1]}"
        raise ValueError(f"timestep {timestep} is not in this schedule; step() takes the values of scheduler.timesteps: [{shown}]")


def describe_schedule(schedule: torch.Tensor) -> str:
    """The schedule for an error message: all values if short, else its length, ends and first/last few."""
    values = [round(t, 4) if isinstance(t, float) else t for t in schedule.flatten().tolist()]
    if len(values) <= 12:
        return str(values)
    return f"{len(values)} timesteps from {values[0]} down to {values[-1]} ({values[:3]} ... {values[-3:]})"


class StepIndexMixin(SchedulerMixin):
    """The step-index machine of schedulers that step by position (the sigma schedulers, LCM, TCD): on the first
    ``scale_model_input``/``step`` after ``set_timesteps`` the position is found from the timestep, or taken from
    ``set_begin_index`` (img2img starts mid-schedule), and every ``step`` advances it by one."""

    _step_index: int | None = None
    _begin_index: int | None = None

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    # ---- position in the schedule ----------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Position of the current step in ``timesteps``/``sigmas``; None until the first call after set_timesteps."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Position of the first step when a pipeline starts mid-schedule (set with :meth:`set_begin_index`)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img: ``t_start * order``). Call after ``set_timesteps``."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule. A timestep listed twice resolves to its second position, so a
        loop that starts mid-schedule on a duplicate does not skip a sigma."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule.device)
        matches = (schedule == timestep).nonzero()
        if len(matches) == 0:
            value = timestep.item() if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 else timestep
            raise ValueError(
                f"timestep {value!r} is not in the schedule of {type(self).__name__}, which holds "
                f"{describe_schedule(schedule)}; pass one of scheduler.timesteps (after set_timesteps)"
            )
        return int(matches[1 if len(matches) > 1 else 0].item())

    def _init_step_index(self, timestep: Any) -> None:
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _begin_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> int:
        """Checks shared by every ``step``; returns the step index (found on the first call)."""
        self._check_step_args(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise RuntimeError(
                f"{type(self).__name__} already took all {len(self.timesteps)} steps; "
                "call set_timesteps() to start again"
            )
        return self.step_index
