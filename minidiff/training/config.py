"""TrainConfig: every option of ``minidiff train``, one dataclass field each (names follow diffusers' training
scripts: ``train_unconditional.py``, ``train_text_to_image.py``, ``train_text_to_image_lora.py``,
``train_dreambooth.py``, ``train_dreambooth_lora.py``, ``textual_inversion.py``). The command-line flags are generated
from the fields (``learning_rate`` -> ``--learning-rate``), so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from minidiff.configuration import check_choice
from minidiff.schedulers.betas import BETA_SCHEDULES

NOISE_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULERS = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "bf16")
METHODS = ("full", "lora", "dreambooth", "textual-inversion", "controlnet")
PRIOR_TARGETS = ("noise", "frozen-model")  # what the class images' loss fits (training/prior.py)
ADAPTER_METHODS = ("lora", "textual-inversion")  # and dreambooth with use_lora: only small added weights train
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # train_text_to_image_lora.py's target_modules
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # train_dreambooth_lora.py's text encoder targets
# The float options and the interval each must lie in ("inf": unbounded).
NUMBER_RANGES = {"learning_rate": "(0, inf)", "caption_dropout": "[0, 1]", "adam_beta1": "[0, 1)",
                 "adam_beta2": "[0, 1)", "adam_weight_decay": "[0, inf)", "adam_epsilon": "[0, inf)",
                 "ema_max_decay": "[0, 1)", "ema_power": "(0, inf)", "prior_loss_weight": "[0, inf)",
                 "prior_guidance_scale": "[0, inf)"}
# str or os.PathLike (kept as str)
PATH_OPTIONS = ("output_dir", "train_data_dir", "pretrained_model", "resume", "class_data_dir", "controlnet_model")
BOOL_OPTIONS = ("class_conditional", "overwrite", "progress", "upscale_small_images",
                "train_text_encoder", "use_lora", "with_prior_preservation", "gradient_checkpointing")
# Options added with the personalisation methods: a checkpoint written before them was trained with their defaults.
LATER_OPTIONS = ("method", "instance_prompt", "upscale_small_images", "lora_rank", "lora_alpha", "lora_target_modules",
                 "train_text_encoder", "use_lora", "with_prior_preservation", "class_prompt", "class_data_dir",
                 "num_class_images", "prior_loss_weight", "placeholder_token", "initializer_token", "num_vectors",
                 "controlnet_model", "conditioning_embedding_out_channels", "prior_target", "prior_guidance_scale")
# Options a resumed run may change; every other option must equal the checkpoint's.
RESUMABLE_CHANGES = ("output_dir", "resume", "overwrite", "progress", "max_train_steps", "checkpointing_steps",
                     "checkpoints_total_limit", "num_sample_images", "sample_steps", "train_batch_size",
                     "gradient_accumulation_steps", "validation_prompt", "gradient_checkpointing")


def option(default: Any, help: str, **argparse_kwargs: Any):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    output_dir: str = option(None, "run folder: checkpoints/, loss.png, samples.png and the final pipeline folder "
                                   "(or LoRA / embedding file)")
    method: str = option("full", "full: train every UNet weight; lora: LoRA adapters on captioned images; "
                                 "dreambooth: a subject under instance_prompt (whole UNet, or LoRA with --use-lora), "
                                 "optionally with prior preservation; textual-inversion: a new token's embedding; "
                                 "controlnet: a ControlNet on the frozen model, from images paired with condition "
                                 "images (metadata.jsonl's conditioning_image)",
                         choices=METHODS)
    # ---- data
    train_data_dir: str | None = option(None, "image folder (subfolders = classes; captions from metadata.jsonl or "
                                              "a .txt beside each image, else --prompt); default: the built-in "
                                              "synthetic shapes", aliases=("--images",))
    instance_prompt: str | None = option(None, "caption of every image without its own caption file (dreambooth: "
                                               "'a photo of sks dog'; textual-inversion: must name "
                                               "--placeholder-token)", aliases=("--prompt",))
    validation_prompt: str | None = option(None, "prompt of the per-checkpoint sample grid (default: the data's "
                                                 "captions)")
    upscale_small_images: bool = option(False, "resize images smaller than --resolution up to it (else they are an "
                                               "error)")
    synthetic_images: int = option(1024, "size of the built-in synthetic dataset (without --train-data-dir)")
    resolution: int | None = option(None, "image size (default: the pretrained UNet's, else 32); images are resized "
                                          "(shorter side), centre-cropped and converted to RGB")
    random_flip: bool | None = option(None, "flip images horizontally at random (a ControlNet's condition image "
                                            "with its image); default: on, except for --method controlnet (as "
                                            "train_controlnet.py: a pose map's left and right would swap)")
    # ---- model
    pretrained_model: str | None = option(None, "diffusers folder to fine-tune: a DDPM pipeline, a UNet folder, or "
                                                "a Stable Diffusion pipeline (then captions condition the UNet); "
                                                "lora, dreambooth and textual-inversion default to the built-in "
                                                "model")
    block_out_channels: tuple[int, ...] = option((32, 64, 64), "channels per UNet level of a new model", type="ints")
    layers_per_block: int = option(2, "resnets per UNet level of a new model")
    attention_levels: int = option(1, "the deepest N levels of a new UNet get self-attention")
    class_conditional: bool = option(False, "condition on the class (subfolder name / synthetic shape)")
    caption_dropout: float = option(0.0, "text fine-tuning: probability of an empty caption (classifier-free guidance)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, ~30%% "
                                                 "more time, the same gradients")
    # ---- LoRA (method lora, or dreambooth with --use-lora)
    lora_rank: int = option(4, "rank r of each LoRA adapter")
    lora_alpha: float | None = option(None, "LoRA alpha: the update is scaled by alpha / r (default: alpha = r)")
    lora_target_modules: tuple[str, ...] = option(UNET_LORA_TARGETS, "UNet modules that get adapters (a module "
                                                  "matches if its path is or ends with .<name>)", type="strs")
    train_text_encoder: bool = option(False, "LoRA adapters on the text encoder's " + ", ".join(TEXT_LORA_TARGETS) +
                                      " too")
    use_lora: bool = option(False, "dreambooth: train LoRA adapters instead of the whole UNet")
    # ---- DreamBooth prior preservation (Ruiz et al. 2023, Eq. 2)
    with_prior_preservation: bool = option(False, "dreambooth: also fit images the frozen model draws for "
                                                  "--class-prompt, so the class keeps its meaning")
    class_prompt: str | None = option(None, "prompt of the class images, e.g. 'a photo of a dog'")
    class_data_dir: str | None = option(None, "folder of class images (captions as for --images, else "
                                              "--class-prompt); missing ones are drawn before training (default: "
                                              "<output-dir>/class_images, which --overwrite deletes)")
    num_class_images: int = option(100, "class images to use (generated if the folder holds fewer)")
    prior_loss_weight: float = option(1.0, "weight of the class images' loss")
    prior_target: str = option("noise", "what the class images' loss fits: noise (train_dreambooth.py: the noise "
                                        "that made x_t) or frozen-model (the frozen model's guided and "
                                        "unconditional predictions on the same x_t: forgets far less; a whole-UNet "
                                        "run keeps a copy of the UNet for it)", choices=PRIOR_TARGETS)
    prior_guidance_scale: float = option(7.5, "prior_target frozen-model: the guidance scale whose prediction the "
                                              "class images keep (the one you sample with)")
    # ---- textual inversion (Gal et al. 2022)
    placeholder_token: str | None = option(None, "the new token, e.g. '<cat-toy>'")
    initializer_token: str | None = option(None, "a one-token word whose embedding starts the new token's, e.g. toy")
    num_vectors: int = option(1, "vectors of the new token (tokens <t>, <t>_1, ...)")
    # ---- ControlNet (Zhang et al. 2023; diffusers' train_controlnet.py)
    controlnet_model: str | None = option(None, "controlnet: a ControlNet folder to continue training (default: a "
                                                "new one copied from the UNet's encoder, ControlNetModel.from_unet)")
    conditioning_embedding_out_channels: tuple[int, ...] | None = option(
        None, "controlnet: channels of the new ControlNet's condition-image encoder, one stride-2 step between "
              "each, so their count sets its downsampling to the VAE's (default: 16,32,96,256 cut to the VAE's "
              "factor: 4 entries for SD's 8, 2 for the built-in model's 2)", type="ints")
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
    use_ema: bool | None = option(None, "keep an exponential moving average of the weights (used for samples and "
                                        "export); default: on for --method full only")
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
                                      "checkpoint / run folder; only " + ", ".join(
                                          "--" + name.replace("_", "-") for name in RESUMABLE_CHANGES
                                          if name not in ("resume", "overwrite")) +
                                      " may differ from the checkpoint (keeping the global batch)",
                                nargs="?", const="latest")
    overwrite: bool = option(False, "start over in an --output-dir that holds another run (deletes its outputs)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        for name in PATH_OPTIONS:  # a pathlib.Path is stored as str, so the config stays JSON (state.json)
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    @property
    def trains_adapters(self) -> bool:
        """Only small added weights train (LoRA adapters, a token's embedding); the base model stays frozen."""
        return self.method in ADAPTER_METHODS or (self.method == "dreambooth" and self.use_lora)

    @property
    def keeps_ema(self) -> bool:
        """use_ema, or its default: on for full training (train_unconditional.py), off for the personalisation
        methods (diffusers' DreamBooth, LoRA and textual-inversion scripts keep none)."""
        return self.use_ema if self.use_ema is not None else self.method == "full"

    @property
    def flips(self) -> bool:
        """random_flip, or its default: on, except for controlnet training (train_controlnet.py flips nothing)."""
        return self.random_flip if self.random_flip is not None else self.method != "controlnet"

    @property
    def trains_lora(self) -> bool:
        return self.method == "lora" or (self.method == "dreambooth" and self.use_lora)

    @property
    def trajectory_options(self) -> dict[str, Any]:
        """The options that decide the losses and weights of a run (what a resume must not change)."""
        options = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}
        # as resolved: an unset use_ema or random_flip means the method's default
        return {**options, "use_ema": self.keeps_ema, "random_flip": self.flips}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def check(self) -> "TrainConfig":
        """Raise a ValueError naming the first bad option and what it accepts."""
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder where checkpoints and the trained model go")
        for name in PATH_OPTIONS:
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ValueError(f"{name} must be a path (str or os.PathLike), got {getattr(self, name)!r}")
        for name in ("synthetic_images", "layers_per_block", "train_batch_size", "gradient_accumulation_steps",
                     "max_train_steps", "checkpointing_steps", "sample_steps", "lora_rank", "num_class_images",
                     "num_vectors"):
            _check_at_least(name, getattr(self, name), 1)
        for name in ("lr_warmup_steps", "num_sample_images", "attention_levels", "seed"):
            _check_at_least(name, getattr(self, name), 0)
        if self.checkpoints_total_limit is not None:
            _check_at_least("checkpoints_total_limit", self.checkpoints_total_limit, 1)
        if self.resolution is not None:
            _check_at_least("resolution", self.resolution, 8)
        channels = self.block_out_channels
        if isinstance(channels, str) or not channels or not all(_is_int(c) and c >= 1 for c in channels):
            raise ValueError(f"block_out_channels must be a non-empty sequence of ints >= 1 (e.g. 32,64,64), got "
                             f"{channels!r}")
        if self.attention_levels > len(self.block_out_channels):
            raise ValueError(f"attention_levels={self.attention_levels} exceeds the {len(self.block_out_channels)} "
                             "UNet levels of block_out_channels")
        if self.num_train_timesteps is not None:
            _check_at_least("num_train_timesteps", self.num_train_timesteps, 1)
        if self.seed >= 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed}")
        for name, interval in NUMBER_RANGES.items():
            _check_in(name, getattr(self, name), interval)
        if self.max_grad_norm is not None:
            _check_in("max_grad_norm", self.max_grad_norm, "(0, inf)", " (or None for no clipping)")
        for name in BOOL_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("use_ema", "random_flip"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True, False or None (its default for the method), got "
                                 f"{getattr(self, name)!r}")
        if self.beta_schedule is not None:
            check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("noise_scheduler", self.noise_scheduler, NOISE_SCHEDULERS)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.prediction_type is not None:
            check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("method", self.method, METHODS)
        check_choice("prior_target", self.prior_target, PRIOR_TARGETS)
        self._check_method_options()
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue a run or start it over, not both")
        return self

    def _check_method_options(self) -> None:
        """The options each method needs, and those that belong to another method."""
        method = self.method
        if self.lora_alpha is not None:
            _check_in("lora_alpha", self.lora_alpha, "(0, inf)", " (or None for alpha = rank)")
        targets = self.lora_target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"lora_target_modules must be a non-empty sequence of module names (e.g. "
                             f"{','.join(UNET_LORA_TARGETS)}), got {targets!r}")
        for name in ("instance_prompt", "validation_prompt", "class_prompt", "placeholder_token", "initializer_token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if self.keeps_ema and (self.trains_adapters or method == "controlnet"):
            what = "a ControlNet beside the frozen UNet" if method == "controlnet" else "only added weights"
            raise ValueError(f"use_ema keeps an average of the whole UNet; method {method!r}"
                             f"{' with use_lora' if method == 'dreambooth' else ''} trains {what}: "
                             "leave use_ema off (--no-use-ema)")
        # (option given, its name, whether this method uses it, the methods that do)
        owners = [(self.use_lora, "use_lora", method == "dreambooth", "dreambooth"),
                  (self.with_prior_preservation, "with_prior_preservation", method == "dreambooth", "dreambooth"),
                  (self.placeholder_token is not None, "placeholder_token", method == "textual-inversion",
                   "textual-inversion"),
                  (self.initializer_token is not None, "initializer_token", method == "textual-inversion",
                   "textual-inversion"),
                  (self.train_text_encoder, "train_text_encoder", self.trains_lora,
                   "lora (or dreambooth with use_lora)"),
                  (self.controlnet_model is not None, "controlnet_model", method == "controlnet", "controlnet"),
                  (self.conditioning_embedding_out_channels is not None, "conditioning_embedding_out_channels",
                   method == "controlnet", "controlnet")]
        for given, name, applies, owner in owners:
            if given and not applies:
                raise ValueError(f"{name} applies to method {owner}, not {method!r}")
        if self.prior_target != "noise" and not self.with_prior_preservation:
            raise ValueError(f"prior_target {self.prior_target!r} is the target of prior preservation's class "
                             "images: add with_prior_preservation (--with-prior-preservation --class-prompt ...)")
        if self.prior_guidance_scale != 7.5 and self.prior_target != "frozen-model":
            raise ValueError("prior_guidance_scale applies to prior_target 'frozen-model' (--prior-target "
                             f"frozen-model), not {self.prior_target!r}")
        if self.with_prior_preservation and self.class_prompt is None:
            raise ValueError("with_prior_preservation needs class_prompt: the prompt the frozen model draws the "
                             "class images from, e.g. 'a photo of a dog'")
        if method == "textual-inversion":
            missing = [name for name in ("placeholder_token", "initializer_token") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"textual-inversion needs {' and '.join(missing)}, e.g. --placeholder-token "
                                 "'<cat-toy>' --initializer-token toy")
        channels = self.conditioning_embedding_out_channels
        if channels is not None:
            if isinstance(channels, str) or not channels or not all(_is_int(c) and c >= 1 for c in channels):
                raise ValueError(f"conditioning_embedding_out_channels must be a non-empty sequence of ints >= 1 "
                                 f"(e.g. 16,32,96,256), got {channels!r}")
            if self.controlnet_model is not None:
                raise ValueError("conditioning_embedding_out_channels shapes a new ControlNet, but controlnet_model "
                                 f"{self.controlnet_model} brings its own: give one of the two")
        if (self.trains_adapters or method == "controlnet") and self.class_conditional:
            raise ValueError(f"method {method!r} fine-tunes a Stable Diffusion pipeline; class_conditional "
                             "applies to pixel-space training")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_at_least(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_in(name: str, value: Any, interval: str, note: str = "") -> None:
    """``value`` must be a finite number in ``interval``, written "[low, high)" etc. (inf: unbounded)."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    inside = number and (low <= value if interval[0] == "[" else low < value) and (
        value <= high if interval[-1] == "]" else value < high)
    if not inside:
        raise ValueError(f"{name} must lie in {interval}{note} (a finite number), got {value!r}")


# ---- the command line -------------------------------------------------------------------------------------------
def _strs(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


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
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("type", "aliases")}
        if f.metadata.get("type") in ("ints", "strs"):
            kwargs["type"] = _ints if f.metadata["type"] == "ints" else _strs
            if f.default is not None:  # as typed, not a tuple
                kwargs["help"] = f"{kwargs['help']} (default: {','.join(map(str, f.default))})"
        elif f.type.startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "nargs" not in kwargs:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            kwargs["type"] = _optional(kind) if "None" in f.type else kind
        parser.add_argument(flag, *f.metadata.get("aliases", ()), dest=f.name, default=f.default,
                            required=f.name == "output_dir", **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}).check()
