"""What a run trains, as small strategies over the one loop (``loop.Trainer``): which parameters the optimizer sees,
what a checkpoint and the export hold, and what happens after each optimizer step.

- ``FullTraining``: every UNet weight (training from scratch, fine-tuning, DreamBooth without LoRA); the export is
  the whole pipeline folder.
- ``LoRATraining``: the base model frozen, fresh LoRA adapters on the UNet (and optionally the text encoder) train
  (Hu et al. 2021; diffusers' ``train_text_to_image_lora.py``, ``train_dreambooth_lora.py``); the export is
  diffusers' ``pytorch_lora_weights.safetensors``.
- ``TextualInversionTraining``: one new token (n vectors) whose embedding rows train while everything else stays
  fixed (Gal et al. 2022, Eq. 2; diffusers' ``textual_inversion.py``); the export is ``learned_embeds.safetensors``.
- ``ControlNetTraining``: a ControlNet (Zhang et al. 2023) beside the frozen UNet, VAE and text encoder
  (diffusers' ``train_controlnet.py``); the export is the ControlNet's folder (config.json + weights).

DreamBooth (Ruiz et al. 2023) is the data side: an instance prompt, and with prior preservation class images drawn
by the frozen model before training (:func:`prepare_class_images`); the loss weighting lives in the task.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import torch
from torch import nn

from minidiff.adapters import lora
from minidiff.adapters.lora_formats import LORA_WEIGHT_NAME_SAFE, file_key
from minidiff.adapters.textual_inversion import TEXT_INVERSION_NAME_SAFE
from minidiff.fileio import atomic_write
from minidiff.loading.safetensors_io import load_safetensors, save_safetensors
from minidiff.training.checkpoint import load_model_weights
from minidiff.training.config import TEXT_LORA_TARGETS, TrainConfig
from minidiff.training.data import IMAGE_EXTENSIONS, ImageFolderDataset, PriorPreservationDataset, seed_from


def describe_size(path: str) -> str:
    """A file's size for people: "3.1 MiB", "159.1 KiB"."""
    size = os.path.getsize(path)
    return f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.1f} KiB"


def count(parameters) -> int:
    """The number of weights in ``parameters``."""
    return sum(p.numel() for p in parameters)


class Method(Protocol):
    """What the loop asks of a method (built by :func:`build_method` on a task, which it may change: adapters,
    tokens, which weights require grad)."""

    def trainable(self) -> dict[str, nn.Parameter]:
        """The optimizer's parameters by name (their order is the checkpoint's optimizer state order)."""

    def after_step(self) -> None:
        """Called after every optimizer step (textual inversion puts the other token rows back)."""

    def save(self, folder: str, unet, final: bool) -> str:
        """Write what the method trains into ``folder`` (``final``: the export, else a checkpoint); the path."""

    def load(self, checkpoint: str) -> None:
        """Restore what ``save`` wrote into a checkpoint (resume)."""

    def summary(self) -> str:
        """One line: what trains, and how many weights."""

    def describe_output(self, path: str) -> str:
        """One line: where the export is and how to use it."""


class FullTraining:
    """Every UNet weight trains; checkpoints hold unet/ + scheduler/, the export the whole pipeline."""

    def __init__(self, task, config: TrainConfig):
        self.task = task
        task.unet.requires_grad_(True)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.task.unet.named_parameters())

    def after_step(self) -> None:
        pass

    def save(self, folder: str, unet, final: bool) -> str:
        self.task.save(folder, unet, complete=final)
        return folder

    def load(self, checkpoint: str) -> None:
        load_model_weights(self.task.unet, os.path.join(checkpoint, "unet"))

    def summary(self) -> str:
        return f"training all {count(self.trainable().values()):,} UNet weights"

    def describe_output(self, path: str) -> str:
        return f"model in {path}"


class LoRATraining:
    """Fresh adapters (peft's gaussian init, drawn from ``config.seed``) on the frozen UNet's ``lora_target_modules``
    and, with ``train_text_encoder``, on the text encoder's attention projections."""

    def __init__(self, task, config: TrainConfig):
        self.task, self.pipe = task, task.pipe
        generator = torch.Generator().manual_seed(seed_from(config.seed, 1))
        self.models = {"unet": self.pipe.unet}
        if config.train_text_encoder:
            self.models["text_encoder"] = self.pipe.text_encoder
        targets = {"unet": config.lora_target_modules, "text_encoder": TEXT_LORA_TARGETS}
        for component, model in self.models.items():
            model.requires_grad_(False).train()  # a trained text encoder in train mode too, as diffusers' scripts
            lora.inject_trainable_lora(model, targets[component], config.lora_rank, config.lora_alpha,
                                       generator=generator)
        self.rank = config.lora_rank

    def trainable(self) -> dict[str, nn.Parameter]:
        return {f"{component}.{name}": parameter for component, model in self.models.items()
                for name, parameter in lora.lora_parameters(model).items()}

    def after_step(self) -> None:
        pass

    def save(self, folder: str, unet, final: bool) -> str:
        """diffusers' LoRA file (``save_lora_weights``: peft names + the adapter configs in the header)."""
        layers = {f"{component}_lora_layers": lora.lora_state_dict(model) for component, model in self.models.items()}
        metadata = {f"{component}_lora_adapter_metadata": lora.lora_adapter_metadata(model)
                    for component, model in self.models.items()}
        return type(self.pipe).save_lora_weights(folder, **layers, **metadata)

    def load(self, checkpoint: str) -> None:
        """The adapters' weights from a checkpoint's LoRA file; every expected tensor must be there, shaped right."""
        path = os.path.join(checkpoint, LORA_WEIGHT_NAME_SAFE)
        tensors = load_safetensors(path)
        with torch.no_grad():
            for component, model in self.models.items():
                for key, parameter in lora.peft_named_parameters(model).items():
                    name = file_key(component, key)
                    if name not in tensors or tensors[name].shape != parameter.shape:
                        found = "missing" if name not in tensors else f"shaped {tuple(tensors[name].shape)}"
                        raise ValueError(f"{path}: LoRA tensor {name} is {found}, but this run's adapter needs "
                                         f"{tuple(parameter.shape)}: the checkpoint belongs to another LoRA setup")
                    parameter.copy_(tensors[name])

    def summary(self) -> str:
        paths = sum(len(lora.lora_layers(model)) for model in self.models.values())
        total = sum(count(model.parameters()) for model in self.models.values())
        return (f"training {count(self.trainable().values()):,} LoRA weights (rank {self.rank}, {paths} modules of "
                f"{' and '.join(self.models)}) beside {total - count(self.trainable().values()):,} frozen ones")

    def describe_output(self, path: str) -> str:
        return f"LoRA weights in {path} ({describe_size(path)}); load them with pipe.load_lora_weights"


class TextualInversionTraining:
    """The tokens ``<t>``, ``<t>_1`` ... join the tokenizer; their rows of the token table start as the initializer
    token's embedding. The whole table is the optimizer's parameter (as diffusers' script) and every other row is
    put back after each step, so only the new rows change."""

    def __init__(self, task, config: TrainConfig):
        self.task, self.pipe = task, task.pipe
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        self.placeholder = config.placeholder_token
        self.tokens = [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, config.num_vectors)]
        initializer = check_token_options(tokenizer, self.tokens, config.initializer_token)
        table = text_encoder.resize_token_embeddings(len(tokenizer) + len(self.tokens)).weight  # (V + n, D)
        tokenizer.add_tokens(self.tokens)
        self.ids = tokenizer.convert_tokens_to_ids(self.tokens)
        with torch.no_grad():
            table[self.ids] = table[initializer].clone()
        task.unet.requires_grad_(False)
        text_encoder.requires_grad_(False).train()
        self.table = table.requires_grad_(True)
        self.name = "text_encoder." + next(name for name, p in text_encoder.named_parameters() if p is table)
        self.original = table.detach().clone()
        self.keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
        self.keep[self.ids] = False
        # The other rows' gradients (pad/end tokens: ~70 per caption) would dominate clip_grad_norm_ although
        # after_step discards their update; textual_inversion.py does not clip at all.
        table.register_hook(lambda grad: grad.masked_fill(self.keep[:, None], 0.0))  # (V + n, D)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {self.name: self.table}

    def after_step(self) -> None:
        with torch.no_grad():
            self.table[self.keep] = self.original[self.keep]

    def save(self, folder: str, unet, final: bool) -> str:
        """``{placeholder: (n, D)}``, the file diffusers' ``textual_inversion.py`` writes."""
        path = os.path.join(folder, TEXT_INVERSION_NAME_SAFE)
        os.makedirs(folder, exist_ok=True)
        save_safetensors({self.placeholder: self.table.detach()[self.ids].cpu().contiguous()}, path)
        return path

    def load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, TEXT_INVERSION_NAME_SAFE)
        vectors = load_safetensors(path).get(self.placeholder)
        if vectors is None or vectors.shape != (len(self.ids), self.table.shape[1]):
            raise ValueError(f"{path} does not hold {self.placeholder!r} as a ({len(self.ids)}, {self.table.shape[1]}) "
                             "tensor: the checkpoint belongs to another textual-inversion setup")
        with torch.no_grad():
            self.table[self.ids] = vectors.to(self.table)

    def summary(self) -> str:
        return (f"training the embedding of {self.placeholder} ({len(self.ids)} vector(s) of "
                f"{self.table.shape[1]}: {len(self.ids) * self.table.shape[1]:,} weights); everything else is frozen")

    def describe_output(self, path: str) -> str:
        return f"embedding of {self.placeholder} in {path} ({describe_size(path)}); load it with " \
               "pipe.load_textual_inversion"


class ControlNetTraining:
    """Every ControlNet weight trains (the task built it: a copy of the UNet's encoder, zero convolutions at zero);
    checkpoints hold controlnet/, the export is ``output_dir`` itself as a ControlNetModel folder, as
    train_controlnet.py's ``controlnet.save_pretrained(output_dir)``."""

    def __init__(self, task, config: TrainConfig):
        self.task, self.controlnet = task, task.controlnet
        for model in (task.unet, task.pipe.text_encoder, task.vae):
            model.requires_grad_(False)
        self.controlnet.requires_grad_(True)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.controlnet.named_parameters())

    def after_step(self) -> None:
        pass

    def save(self, folder: str, unet, final: bool) -> str:
        path = folder if final else os.path.join(folder, "controlnet")
        self.controlnet.save_pretrained(path)
        return path

    def load(self, checkpoint: str) -> None:
        load_model_weights(self.controlnet, os.path.join(checkpoint, "controlnet"))

    def summary(self) -> str:
        trained, frozen = count(self.trainable().values()), count(self.task.unet.parameters())
        return f"training all {trained:,} ControlNet weights beside {frozen:,} frozen UNet ones"

    def describe_output(self, path: str) -> str:
        return f"ControlNet in {path}; load it with ControlNetModel.from_pretrained and pass it as controlnet= to " \
               "StableDiffusionControlNetPipeline"


def check_token_options(tokenizer, tokens: list[str], initializer_token: str) -> int:
    """The id of the one-token ``initializer_token``; new ``tokens`` must not be in the vocabulary already."""
    vocabulary = tokenizer.get_vocab()
    taken = [token for token in tokens  # CLIP keeps a whole word as "word</w>"
             if any(form in vocabulary for form in (token, token.lower(), token.lower() + "</w>"))]
    if taken:
        raise ValueError(f"placeholder_token {tokens[0]!r}: {taken[0]!r} is already in the tokenizer's vocabulary; "
                         "choose a new token such as '<my-concept>'")
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"initializer_token {initializer_token!r} is {len(ids)} tokens "
                         f"({tokenizer.convert_ids_to_tokens(ids)}); it must be a single token: pick one word that "
                         "the tokenizer keeps whole, e.g. toy, dog, red")
    return ids[0]


def build_method(config: TrainConfig, task):
    """The strategy for ``config.method`` on a built task (the models are changed here: adapters, tokens)."""
    if config.method == "textual-inversion":
        return TextualInversionTraining(task, config)
    if config.method == "controlnet":
        return ControlNetTraining(task, config)
    if config.trains_lora:
        return LoRATraining(task, config)
    return FullTraining(task, config)


# ---- DreamBooth's class images ------------------------------------------------------------------------------------
def class_images_folder(config: TrainConfig) -> str:
    return config.class_data_dir or os.path.join(config.output_dir, "class_images")


def class_image_files(folder: str) -> list[str]:
    """The image files under ``folder`` (recursively; what :class:`ImageFolderDataset` would read)."""
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)]


def check_class_images_folder(config: TrainConfig, resolution: int) -> None:
    """Before anything is written: the class folder must be a folder, and the images already in it readable and
    large enough (the checks ``with_class_images`` makes after the class images are drawn)."""
    folder = class_images_folder(config)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"class_data_dir {folder} is a file; pass a folder (the missing class images are drawn "
                         "into it)")
    if os.path.isdir(folder) and class_image_files(folder):
        ImageFolderDataset(folder, resolution, upscale_small=config.upscale_small_images)


def prepare_class_images(config: TrainConfig, pipe, resolution: int) -> None:
    """Draw the missing class images with the frozen pipeline from ``class_prompt`` until the folder holds
    ``num_class_images`` (as ``train_dreambooth.py``: images already there, of any name, count), image ``k`` seeded
    by (seed, k): a re-run or a resume draws the same ones."""
    folder = class_images_folder(config)
    os.makedirs(folder, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    missing, k = config.num_class_images - len(class_image_files(folder)), 0
    while missing > 0:
        path = os.path.join(folder, f"class-{k:05d}.png")
        if not os.path.isfile(path):
            generator = torch.Generator().manual_seed(seed_from(config.seed, 2, k))
            image = pipe(config.class_prompt, height=resolution, width=resolution,
                         num_inference_steps=config.sample_steps, generator=generator).images[0]
            atomic_write(path, lambda handle: image.save(handle, format="PNG"))
            missing -= 1
        k += 1


def with_class_images(config: TrainConfig, instances, resolution: int):
    """The instance dataset paired with ``num_class_images`` class images captioned ``class_prompt``."""
    folder = class_images_folder(config)
    classes = ImageFolderDataset(folder, resolution, with_captions=True, default_caption=config.class_prompt,
                                 upscale_small=config.upscale_small_images)
    classes.files = classes.files[:config.num_class_images]
    return PriorPreservationDataset(instances, classes)


# ---- which base model a run started from ------------------------------------------------------------------------
def fingerprint(folder: str | None) -> str | None:
    """A short hash of a model folder: every config's bytes and, of each weight file, its size and its first and
    last MiB. Cheap for a 5 GB model, and it tells a different base model (or other weights) apart."""
    if folder is None or not os.path.isdir(folder):
        return None
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(folder):  # top-down: pruning ``dirs`` in place skips those folders
        dirs[:] = sorted(d for d in dirs if d != "checkpoints")
        for name in sorted(names):
            if not name.endswith((".json", ".safetensors", ".txt")):
                continue
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                size = os.path.getsize(path)
                digest.update(str(size).encode())
                digest.update(handle.read(2 ** 20))
                if size > 2 ** 21:
                    handle.seek(-2 ** 20, os.SEEK_END)
                    digest.update(handle.read())
    return digest.hexdigest()[:16]
