"""TrainConfig: every option of ``minidiff train``, one dataclass field each (names follow diffusers' training
scripts, ``train_unconditional.py`` and ``train_text_to_image.py``). The command-line flags are generated from the
fields (``learning_rate`` -> ``--learning-rate``), so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from minidiff.configuration import check_choice

NOISE_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULERS = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "bf16")
# Options a resumed run may change; every other option must equal the checkpoint's.
RESUMABLE_CHANGES = ("output_dir", "resume", "overwrite", "progress", "max_train_steps", "checkpointing_steps",
                     "checkpoints_total_limit", "num_sample_images", "sample_steps", "train_batch_size",
                     "gradient_accumulation_steps")


def option(default: Any, help: str, **argparse_kwargs: Any):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    output_dir: str = option(None, "run folder: checkpoints/, loss.png, samples.png and the final pipeline folder")
    # ---- data
    train_data_dir: str | None = option(None, "image folder (subfolders = classes; captions from metadata.jsonl or "
                                              "a .txt beside each image); default: the built-in synthetic shapes")
    synthetic_images: int = option(1024, "size of the built-in synthetic dataset (without --train-data-dir)")
    resolution: int | None = option(None, "image size (default: the pretrained UNet's, else 32); images are resized "
                                          "(shorter side), centre-cropped and converted to RGB")
    random_flip: bool = option(True, "flip images horizontally at random")
    # ---- model
    pretrained_model: str | None = option(None, "diffusers folder to fine-tune: a DDPM pipeline, a UNet folder, or "
                                                "a Stable Diffusion pipeline (then captions condition the UNet)")
    block_out_channels: tuple[int, ...] = option((32, 64, 64), "channels per UNet level of a new model", type="ints")
    layers_per_block: int = option(2, "resnets per UNet level of a new model")
    attention_levels: int = option(1, "the deepest N levels of a new UNet get self-attention")
    class_conditional: bool = option(False, "condition on the class (subfolder name / synthetic shape)")
    caption_dropout: float = option(0.0, "text fine-tuning: probability of an empty caption (classifier-free guidance)")
    # ---- diffusion
    noise_scheduler: str = option("ddpm", "scheduler whose add_noise makes x_t", choices=tuple(NOISE_SCHEDULERS))
    beta_schedule: str | None = option(None, "noise schedule (default: the pretrained one, else squaredcos_cap_v2)")
    num_train_timesteps: int | None = option(None, "T (default: the pretrained one, else 1000)")
    prediction_type: str | None = option(None, "what the UNet predicts (default: the pretrained one, else epsilon)",
                                         choices=PREDICTION_TYPES)
    # ---- optimisation
    train_batch_size: int = option(16, "images per micro-batch on each process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_train_steps: int = option(1000, "optimizer steps in all")
    learning_rate: float = option(1e-4, "peak AdamW learning rate")
    lr_scheduler: str = option("cosine", "learning-rate schedule after warm-up", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(100, "steps of linear warm-up from 0")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(1e-2, "AdamW decoupled weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    use_ema: bool = option(True, "keep an exponential moving average of the weights (used for samples and export)")
    ema_max_decay: float = option(0.9999, "EMA decay ceiling")
    ema_power: float = option(0.75, "EMA warm-up power: decay = 1 - (1 + step)^-power")
    mixed_precision: str = option("no", "bf16: run the UNet forward under bf16 autocast", choices=MIXED_PRECISION)
    seed: int = option(0, "seed of the data order, the noise, the timesteps and the sample grids")
    # ---- output
    checkpointing_steps: int = option(500, "write a checkpoint every N steps (and at the end)")
    checkpoints_total_limit: int | None = option(None, "keep only the newest N checkpoints")
    num_sample_images: int = option(16, "images in each checkpoint's sample grid (0: none)")
    sample_steps: int = option(50, "DDIM steps for the sample grids")
    resume: str | None = option(None, "continue from the latest checkpoint of --output-dir (no value) or from a "
                                      "checkpoint / run folder", nargs="?", const="latest")
    overwrite: bool = option(False, "start over in an --output-dir that holds another run (deletes its outputs)")
    progress: bool = option(True, "show a progress bar")

    @property
    def trajectory_options(self) -> dict[str, Any]:
        """The options that decide the losses and weights of a run (what a resume must not change)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def check(self) -> "TrainConfig":
        """Raise a ValueError naming the first bad option and what it accepts."""
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder where checkpoints and the trained model go")
        for name in ("synthetic_images", "layers_per_block", "train_batch_size", "gradient_accumulation_steps",
                     "max_train_steps", "checkpointing_steps", "sample_steps"):
            _check_at_least(name, getattr(self, name), 1)
        for name in ("lr_warmup_steps", "num_sample_images", "attention_levels", "seed"):
            _check_at_least(name, getattr(self, name), 0)
        if self.checkpoints_total_limit is not None:
            _check_at_least("checkpoints_total_limit", self.checkpoints_total_limit, 1)
        if self.resolution is not None:
            _check_at_least("resolution", self.resolution, 8)
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be positive ints, got {self.block_out_channels!r}")
        if self.attention_levels > len(self.block_out_channels):
            raise ValueError(f"attention_levels={self.attention_levels} exceeds the {len(self.block_out_channels)} "
                             "UNet levels of block_out_channels")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.ema_max_decay < 1.0:
            raise ValueError(f"ema_max_decay must lie in [0, 1), got {self.ema_max_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm}")
        check_choice("noise_scheduler", self.noise_scheduler, NOISE_SCHEDULERS)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.prediction_type is not None:
            check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue a run or start it over, not both")
        return self


def _check_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# ---- the command line -------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 32,64,64, got {text!r}") from None


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field, typed from the field's default and annotation."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {k: v for k, v in f.metadata.items() if k != "type"}
        if f.metadata.get("type") == "ints":
            kwargs["type"] = _ints
        elif isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "nargs" not in kwargs:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            kwargs["type"] = _optional(kind) if "None" in f.type else kind
        parser.add_argument(flag, default=f.default, required=f.name == "output_dir", **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}).check()
