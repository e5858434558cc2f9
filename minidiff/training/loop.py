"""The training loop: ``train(config)`` runs ``training_step`` over seeded batches with AdamW, warm-up and a
learning-rate schedule, gradient accumulation and clipping, EMA weights, bf16 autocast, checkpoints and resume,
on one process or data-parallel under torchrun. What trains (the whole UNet, LoRA adapters, a token's embedding)
is the method's choice (``methods.py``); the loop is the same for all.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidiff.adapters.lora_formats import LORA_WEIGHT_NAME_SAFE
from minidiff.adapters.textual_inversion import TEXT_INVERSION_NAME_SAFE
from minidiff.training import checkpoint, plots, train_log
from minidiff.training.config import LATER_OPTIONS, RESUMABLE_CHANGES, TrainConfig
from minidiff.training.data import global_batch_indices, load_batch, micro_batch_positions, sample_generators
from minidiff.training.distributed import Distributed, init_distributed, shutdown_distributed
from minidiff.training.ema import EMAModel
from minidiff.training.methods import (build_method, check_class_images_folder, fingerprint, prepare_class_images,
                                       with_class_images)
from minidiff.training.prior import FrozenModelPrior, squared_error
from minidiff.training.tasks import build_task

# what a run writes into output_dir (what --overwrite deletes); anything else there is left alone
RUN_OUTPUTS = ("checkpoints", "train_log.jsonl", "loss.png", "samples.png", "model_index.json", "unet", "scheduler",
               "vae", "text_encoder", "tokenizer", "class_images", LORA_WEIGHT_NAME_SAFE, TEXT_INVERSION_NAME_SAFE)


def training_step(model, scheduler, x0: torch.Tensor, generators: list[torch.Generator], prediction_type: str,
                  conditioning: dict | None = None, loss_scale: float = 1.0, autocast_dtype=None,
                  sample_weights: torch.Tensor | None = None, prior: FrozenModelPrior | None = None,
                  prior_rows: int = 0) -> torch.Tensor:
    """One gradient computation of DDPM training (Ho et al. 2020, Algorithm 1) on clean samples ``x0`` (B, C, H, W).

    Per sample (each from its own generator): ``t ~ U{0, ..., T-1}`` and ``eps ~ N(0, I)``; then
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (``scheduler.add_noise``, DDPM Eq. 4) and the model predicts
    ``eps`` - the "simple" loss ``|| eps - eps_theta(x_t, t) ||^2`` (DDPM Eq. 14) - or the velocity
    ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (``scheduler.get_velocity``; Salimans & Ho 2022, Sec. 4).
    The mean squared error times ``loss_scale`` (1 / accumulation steps) is back-propagated; returns the loss.
    ``sample_weights`` (B,): the loss is instead ``sum_i w_i * mse_i`` over the samples' own mean squared errors
    (DreamBooth's prior preservation: instance and class halves weighted separately). With ``prior``, the last
    ``prior_rows`` rows are class images fitted to the frozen model's guided prediction instead (``prior.py``).
    """
    timesteps = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
                           for g in generators]).to(x0.device)  # (B,)
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators]).to(x0)  # (B, C, H, W)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)

    def forward(module, x, t, condition):
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            return (module or model)(x, t, **(condition or {})).sample

    if sample_weights is None:
        loss = F.mse_loss(forward(None, noisy, timesteps, conditioning).float(), target.float())
    else:
        per_sample = (prior.per_sample_losses(forward, noisy, timesteps, conditioning, target, prior_rows)
                      if prior is not None else squared_error(forward(None, noisy, timesteps, conditioning), target))
        loss = (sample_weights * per_sample).sum()  # per_sample: (B,)
    (loss * loss_scale).backward()
    return loss.detach()


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then constant, linear decay or half-cosine decay to 0 at
    ``total_steps`` (diffusers' ``get_scheduler`` formulas, SGDR's cosine: Loshchilov & Hutter 2017)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019): Adam with weight decay decoupled from the gradient."""
    return torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


class Trainer:
    """One run: the task (models, data), optimizer, EMA and bookkeeping; ``run()`` trains to ``max_train_steps``."""

    def __init__(self, config: TrainConfig, dist: Distributed, dataset=None):
        self.config, self.dist = config.check(), dist
        self.resume_from = self._check_output_dir()
        self.task, self.dataset = build_task(config, dist.device, dataset)
        self.global_batch = config.train_batch_size * config.gradient_accumulation_steps * dist.world_size
        global_batch_indices(len(self.dataset), self.global_batch, 0, config.seed)  # fails early if too large
        self.method = build_method(config, self.task)
        self.unet = self.task.unet
        self.base_model = {"folder": self.task.base_model, "fingerprint": fingerprint(self.task.base_model)}
        if config.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self.model = dist.wrap(self.task.denoiser)  # DDP all-reduces only the parameters that require grad
        self.trainable = self.method.trainable()
        self.optimizer = make_optimizer(self.trainable.values(), config)
        self.ema = EMAModel(self.unet, config.ema_max_decay, config.ema_power) if config.keeps_ema else None
        self.step, self.losses, self.log_plan, self.output_path = 0, [], None, None
        if self.resume_from:
            self._resume(self.resume_from)
        if config.with_prior_preservation:
            check_class_images_folder(config, self.task.resolution)
        self.dist.barrier()  # every process has read the output folder before rank 0 changes it
        if dist.is_main:
            self._start_output_dir()
        if config.with_prior_preservation:
            self._add_class_images()

    # ---- the output folder ------------------------------------------------------------------------------------
    def _check_output_dir(self) -> str | None:
        """The checkpoint to resume from (or None); refuses to mix runs. Reads only."""
        config, folder = self.config, self.config.output_dir
        if os.path.isfile(folder):
            raise ValueError(f"output_dir {folder} is a file")
        if config.resume:
            return checkpoint.find_checkpoint(config.resume, folder, check_trainer_state)
        entries = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if entries and not config.overwrite:
            raise ValueError(f"output_dir {folder} is not empty (it holds {', '.join(entries[:5])}); pass --resume to "
                             "continue the run in it or --overwrite to start over")
        return None

    def _enable_gradient_checkpointing(self) -> None:
        """On the UNet (and a ControlNet), and on the text encoder when the method trains part of it."""
        self.unet.enable_gradient_checkpointing()
        if getattr(self.task, "controlnet", None) is not None:
            self.task.controlnet.enable_gradient_checkpointing()
        text_encoder = getattr(self.task.pipe, "text_encoder", None)
        if text_encoder is not None and any(p.requires_grad for p in text_encoder.parameters()):
            text_encoder.enable_gradient_checkpointing()

    def _add_class_images(self) -> None:
        """DreamBooth: rank 0 draws the missing class images with the still-untrained model; all then pair them."""
        if self.dist.is_main:
            self.unet.eval()
            with torch.no_grad():
                prepare_class_images(self.config, self.task.pipe, self.task.resolution)
            self.unet.train()
        self.dist.barrier()
        self.dataset = with_class_images(self.config, self.dataset, self.task.resolution)

    def _start_output_dir(self) -> None:
        folder = self.config.output_dir
        os.makedirs(folder, exist_ok=True)
        if self.config.overwrite:
            for name in RUN_OUTPUTS:
                path = os.path.join(folder, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        log_path = os.path.join(folder, train_log.LOG_NAME)
        if self.log_plan is not None:
            train_log.continue_log(log_path, self.log_plan)
        else:
            open(log_path, "w", encoding="utf-8").close()

    def _resume(self, path: str) -> None:
        """Check the checkpoint against this run (options, global batch, the log), then restore everything."""
        state = checkpoint.read_state(path)  # checked by find_checkpoint (check_trainer_state) already
        problems = option_differences(self.config.trajectory_options, state["config"])
        saved_base = state.get("base_model")
        if saved_base and saved_base.get("fingerprint") != self.base_model["fingerprint"]:
            problems.append(f"base model {self.base_model['folder']} (fingerprint {self.base_model['fingerprint']}; "
                            f"the checkpoint was trained from {saved_base.get('folder')}, fingerprint "
                            f"{saved_base.get('fingerprint')}): its weights differ")
        if state["global_batch_size"] != self.global_batch:
            problems.append(f"global batch {self.global_batch} (checkpoint: {state['global_batch_size']}) = "
                            "train_batch_size x gradient_accumulation_steps x processes")
        if problems:
            raise ValueError(f"cannot resume from {path} with different training options: {'; '.join(problems)}. "
                             f"Only {', '.join(RESUMABLE_CHANGES)} may change on resume (keeping the global batch); "
                             "give the others as the checkpoint has them, or start a new run")
        self.log_plan = train_log.plan_resume(os.path.join(self.config.output_dir, train_log.LOG_NAME),
                                              state["losses"], self.config.max_train_steps)
        state = checkpoint.load_training_state(path, self.optimizer, list(self.trainable))
        self.method.load(path)
        if self.ema is not None:
            checkpoint.load_model_weights(self.ema.model, os.path.join(path, "unet_ema"))
            self.ema.num_updates = state["ema_updates"]
        self.step, self.losses = state["step"], state["losses"]

    # ---- training ---------------------------------------------------------------------------------------------
    def optimizer_step(self) -> float:
        """One update on the global batch of ``self.step``: accumulate micro-batch gradients, clip, AdamW, EMA."""
        config, dist, scheduler = self.config, self.dist, self.task.scheduler
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_factor(self.step, config.lr_warmup_steps, config.max_train_steps,
                                                           config.lr_scheduler)
        indices = global_batch_indices(len(self.dataset), self.global_batch, self.step, config.seed)
        autocast = torch.bfloat16 if config.mixed_precision == "bf16" else None
        total = torch.zeros(())
        for micro in range(config.gradient_accumulation_steps):
            positions = micro_batch_positions(config.train_batch_size, config.gradient_accumulation_steps, dist.rank,
                                              micro)
            generators = sample_generators(config.seed, self.step, positions)
            batch = load_batch(self.dataset, [indices[p] for p in positions], generators, config.flips)
            encoded = self.task.encode(batch, generators)
            with dist.no_sync(self.model, skip=micro < config.gradient_accumulation_steps - 1):
                total += training_step(self.model, scheduler, encoded.x0, encoded.generators,
                                       scheduler.config.prediction_type, encoded.conditioning,
                                       1 / config.gradient_accumulation_steps, autocast, encoded.sample_weights,
                                       encoded.prior, encoded.prior_rows).cpu()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable.values(), config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step()
        if self.ema is not None:
            self.ema.update(self.unet)
        return dist.mean(total / config.gradient_accumulation_steps)

    def run(self) -> list[float]:
        """Train from ``self.step`` to ``max_train_steps``; checkpoint every ``checkpointing_steps`` and at the end."""
        config = self.config
        show = config.progress and self.dist.is_main
        bar = tqdm(total=config.max_train_steps, initial=self.step, unit="step", disable=not show, dynamic_ncols=True)
        log_path = os.path.join(config.output_dir, train_log.LOG_NAME)
        log = open(log_path, "a", encoding="utf-8") if self.dist.is_main else None
        with bar, log or contextlib.nullcontext():
            while self.step < config.max_train_steps:
                loss = self.optimizer_step()
                self.step += 1
                self.losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                bar.update()
                if log:
                    log.write(train_log.log_line(self.step, loss))
                    log.flush()
                if self.step % config.checkpointing_steps == 0 or self.step == config.max_train_steps:
                    self.save_checkpoint()
        if self.dist.is_main:
            self.export()
        self.dist.barrier()
        return self.losses

    def export(self) -> None:
        """The trained pipeline (EMA weights if kept), or the method's adapter file, into ``output_dir``; a failed
        write says how to redo it. ``output_path`` is what was written."""
        try:
            self.output_path = self.method.save(self.config.output_dir, self.sampling_unet, final=True)
        except OSError as error:
            reason, fix = checkpoint.write_error(error)
            raise OSError(error.errno, f"{reason} while exporting the trained model to {self.config.output_dir}; "
                                       f"the checkpoint of step {self.step} is complete: {fix} and run again with "
                                       "--resume to export it") from error

    # ---- outputs ----------------------------------------------------------------------------------------------
    @property
    def sampling_unet(self):
        return self.ema.model if self.ema is not None else self.unet

    def save_checkpoint(self) -> str | None:
        """Rank 0 writes the checkpoint (with its loss curve and sample grid); the others wait."""
        path = None
        if self.dist.is_main:
            path = checkpoint.save_checkpoint(self.config.output_dir, self.step, self._write_models, self.optimizer,
                                              self._state(), keep=self.config.checkpoints_total_limit)
            for name in ("loss.png", "samples.png"):  # the newest pictures also at the top of the run folder
                if os.path.isfile(os.path.join(path, name)):
                    _replace_with_copy(os.path.join(path, name), os.path.join(self.config.output_dir, name))
        self.dist.barrier()
        return path

    def _write_models(self, folder: str) -> None:
        self.method.save(folder, self.unet, final=False)
        if self.ema is not None:
            self.ema.model.save_pretrained(os.path.join(folder, "unet_ema"))
        plots.save_png(plots.loss_curve(self.losses), os.path.join(folder, "loss.png"))
        if self.config.num_sample_images:
            training = self.unet.training  # a ControlNet's frozen UNet stays in eval mode
            unet = self.sampling_unet.eval()
            images = self.task.sample(unet, self.config.num_sample_images, self.config.sample_steps, self.config.seed)
            self.unet.train(training)
            plots.save_png(plots.image_grid(images), os.path.join(folder, "samples.png"))

    def _state(self) -> dict:
        return {"losses": self.losses, "ema_updates": self.ema.num_updates if self.ema else 0,
                "global_batch_size": self.global_batch, "config": self.config.trajectory_options,
                "base_model": self.base_model,
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def _replace_with_copy(source: str, target: str) -> None:
    """Copy ``source`` over ``target`` through a temporary file: ``target`` is whole before and after, or the
    OSError says what happened (the checkpoint ``source`` came from is complete either way)."""
    try:
        shutil.copyfile(source, target + ".tmp")
        os.replace(target + ".tmp", target)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(target + ".tmp")
        raise OSError(error.errno, f"{checkpoint.write_error(error)[0]} while copying {source} to {target} (left "
                                   "as it was); the checkpoint itself is complete") from error


def option_differences(given: dict, saved: dict) -> list[str]:
    """``"name=given (checkpoint: saved)"`` for each option whose value differs from the checkpoint's. A
    checkpoint older than the personalisation options (``LATER_OPTIONS``) was trained with their defaults."""
    defaults = TrainConfig(output_dir="-").trajectory_options
    saved = {**{k: defaults[k] for k in LATER_OPTIONS if k in defaults and k not in saved}, **saved}
    return [f"{name}={value!r} (checkpoint: {saved[name]!r})" if name in saved else
            f"{name}={value!r} (checkpoint: not recorded)"
            for name, value in given.items() if name not in saved or saved[name] != value]


def check_trainer_state(state: dict, checkpoint_dir: str) -> None:
    """The fields the Trainer adds to state.json: a ValueError naming the first missing, mistyped or inconsistent
    one (called on resume, after :func:`checkpoint.read_state` checked ``step`` and ``optimizer``)."""
    def bad(problem: str):
        raise ValueError(f"state.json in {checkpoint_dir}: {problem}")

    for key, kind, what in (("losses", list, "a list"), ("ema_updates", int, "an int"),
                            ("global_batch_size", int, "an int"), ("config", dict, "an object")):
        if key not in state:
            bad(f"{key!r} is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            bad(f"{key!r} must be {what}, got {type(state[key]).__name__}")
    step, losses = state["step"], state["losses"]
    if len(losses) != step:
        bad(f"'losses' has {len(losses)} entries but 'step' is {step}; the checkpoint is inconsistent")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses):
        bad("'losses' must hold numbers only")
    if not 0 <= state["ema_updates"] <= step:
        bad(f"'ema_updates' must lie in [0, step={step}], got {state['ema_updates']}")
    if state["global_batch_size"] < 1:
        bad(f"'global_batch_size' must be >= 1, got {state['global_batch_size']}")


def train(config: TrainConfig, dataset=None, announce: Callable[[str], None] | None = None) -> list[float]:
    """Train as ``config`` says (alone, or as one process of a torchrun job); returns the per-step losses.
    ``dataset``: your own examples instead of ``train_data_dir`` (see ``tasks.build_task``); pass the same one
    again to resume. ``announce`` (rank 0 only) gets a line saying what trains, and at the end one naming the
    output."""
    dist = init_distributed()
    announce = announce if dist.is_main else None
    try:
        trainer = Trainer(config, dist, dataset)
        if announce:
            announce(trainer.method.summary())
        losses = trainer.run()
        if announce and losses:
            announce(f"trained {len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                     f"{trainer.method.describe_output(trainer.output_path)}")
        return losses
    finally:
        shutdown_distributed()
