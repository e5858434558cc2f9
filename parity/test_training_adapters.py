"""Personalisation training parity: minidiff's LoRA, DreamBooth and textual-inversion training against the same
steps written on diffusers + peft + transformers objects.

The reference is the update of diffusers' example scripts written as a plain loop: ``train_text_to_image_lora.py``
and ``train_dreambooth_lora.py`` (diffusers' UNet and transformers' CLIP with peft adapters,
``add_adapter(LoraConfig(..., init_lora_weights="gaussian"))``, AdamW over the adapters only, the gradient norm
clipped; DreamBooth adds ``prior_loss_weight`` x the class images' MSE) and ``textual_inversion.py`` (the whole
token table trainable, every row but the new tokens' restored after each step). Both sides start from one tiny
seeded SD pipeline folder and the same adapter (minidiff's initial draw copied into peft's), read the same image
files and draw flips, latents, timesteps and noise from the same per-sample generators (as parity/test_training.py
does). Per-step losses and trained weights must agree, and the files minidiff saves must give the same images when
diffusers loads them (``load_lora_weights``, ``load_textual_inversion``) as when minidiff does (float64 pipelines).
"""

from __future__ import annotations

import contextlib
import copy
import os

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import minidiff
from minidiff.adapters.lora import base_state_dict, lora_state_dict
from minidiff.training import TrainConfig, Trainer
from minidiff.training.data import global_batch_indices, sample_generators
from minidiff.training.distributed import init_distributed
from parity.pipeline_fixtures import save_reference_pipeline
from parity.report import compare
from tests.training_fixtures import one_thread, write_image  # noqa: F401  (autouse: single-threaded tiny models)

COMPONENT_LORA = "LoRA training"
LOSS_TOL = 1e-6  # relative, every step's loss
WEIGHT_TOL = 1e-5  # relative, the trained LoRA weights / token rows after the last step
# DreamBooth's weights, as parity/test_training.py's: Adam divides each gradient by its own sqrt(v), so the ~1e-6
# relative fp32 difference of the two libraries' gradients (measured: 1.3e-6 at step 1) grows to ~lr x 1e-3 in the
# weights of the smallest gradients; with prior preservation's 2x batch that is 1.8e-5 (LoRA) and 1.0e-5 (UNet).
ADAM_WEIGHT_TOL = 1e-4
# The frozen-model prior's first step: the adapters start at zero, so the class rows' change d from the frozen
# prediction is 0 but for rounding (~1e-7), and so is the prior's gradient; Adam turns the few gradient entries as
# small as that into updates of a fraction of lr (measured: 2.0e-4 in one LoRA matrix, the rest <= 1e-5).
FROZEN_PRIOR_WEIGHT_TOL = 5e-4
WHOLE_UNET_LR = 1e-3  # DreamBooth without LoRA: parity/test_training.py's fine-tuning rate (the script's is 5e-6)
NP_TOL = 1e-4  # absolute, float64 pipelines' np images in [0, 1]
STEPS, BATCH, SEED, RESOLUTION, IMAGES = 3, 2, 5, 32, 4
OPTIMIZER = dict(learning_rate=1e-2, lr_warmup_steps=0, lr_scheduler="cosine", adam_beta1=0.9, adam_beta2=0.999,
                 adam_weight_decay=1e-2, adam_epsilon=1e-8)
COMMON = dict(seed=SEED, train_batch_size=BATCH, max_train_steps=STEPS, resolution=RESOLUTION, use_ema=False,
              num_sample_images=0, progress=False, **OPTIMIZER)
CAPTIONS = ["a red disc on the left", "a green square", "a blue triangle at the top", "a red square"]
PROMPT = "a green disc at the top"


# ---------------------------------------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny seeded SD pipeline, saved by diffusers' save_pretrained: what both libraries start from."""
    return save_reference_pipeline(tmp_path_factory.mktemp("base"))[1]


def write_images(folder, captions: list[str] | None) -> list[str]:
    """``IMAGES`` seeded RESOLUTION-square PNGs (no resize or crop needed), each with a ``.txt`` caption if given;
    their paths in the order a folder is read (sorted)."""
    paths = [os.path.join(folder, f"image_{i}.png") for i in range(IMAGES)]
    for i, path in enumerate(paths):
        write_image(path, size=(RESOLUTION, RESOLUTION), seed=100 + i)
        if captions:
            with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as handle:
                handle.write(captions[i])
    return paths


def read_pixels(path: str) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: uint8 / 127.5 - 1 in float32, as diffusers' Normalize([0.5], [0.5]) after ToTensor."""
    with PIL.Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


def uniforms(generators) -> list[float]:
    """One uniform per sample (minidiff draws its flips, then its caption dropouts, this way)."""
    return [torch.rand(1, generator=g).item() for g in generators]


def flipped(pixels: list[torch.Tensor], generators) -> torch.Tensor:
    """RandomHorizontalFlip(p=0.5), each sample's coin from its own generator: (B, 3, H, W)."""
    return torch.stack([p.flip(-1) if u < 0.5 else p for p, u in zip(pixels, uniforms(generators))])


# ---------------------------------------------------------------------------------------------------------- minidiff

def minidiff_trainer(tmp_path, folder, name: str, **options) -> Trainer:
    """A built (not yet run) Trainer, so the test can read the adapters it starts from."""
    config = TrainConfig(output_dir=str(tmp_path / name), pretrained_model=str(folder), **{**COMMON, **options})
    return Trainer(config, init_distributed())


def minidiff_pipeline(folder) -> minidiff.StableDiffusionPipeline:
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipeline(folder) -> diffusers.StableDiffusionPipeline:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_of(pipe, prompt: str = PROMPT) -> np.ndarray:
    """A 2-step 32x32 txt2img image of the float64 pipeline (the project's standard for whole-pipeline parity)."""
    pipe.to(torch.float64)
    return pipe(prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, guidance_scale=5.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


# ---------------------------------------------------------------------------------------------------------- reference

class Reference:
    """diffusers' UNet + VAE + scheduler and transformers' CLIP, loaded from the saved folder as the scripts load
    them; ``loop`` is their training update."""

    def __init__(self, folder):
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        for model in (self.text_encoder, self.vae, self.unet):
            model.requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids  # (B, 77)

    def loop(self, params: list[torch.nn.Parameter], batch_of_step, loss_of=F.mse_loss, max_grad_norm=1.0,
             after_step=lambda: None, learning_rate=OPTIMIZER["learning_rate"], predict=None) -> list[float]:
        """The scripts' update, ``STEPS`` times. ``batch_of_step(step)`` -> (parts, generators): one sample's
        generator per position, having drawn the flips, and ``parts``, lists of (pixels (B, 3, H, W), captions,
        anything else ``predict`` reads): the instance images, then (DreamBooth) their class images. Each part
        draws, per sample, its caption-dropout uniform and VAE latent in turn; then every row (instance rows, class
        rows) its timestep, then its noise. ``predict(noisy, timesteps, text, parts)`` (default: the UNet's
        ``.sample``) is the model's prediction."""
        predict = predict or (lambda noisy, timesteps, text, parts: self.unet(noisy, timesteps, text).sample)
        betas = (OPTIMIZER["adam_beta1"], OPTIMIZER["adam_beta2"])
        optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=betas,
                                      weight_decay=OPTIMIZER["adam_weight_decay"], eps=OPTIMIZER["adam_epsilon"])
        schedule = get_scheduler(OPTIMIZER["lr_scheduler"], optimizer, num_warmup_steps=OPTIMIZER["lr_warmup_steps"],
                                 num_training_steps=STEPS)
        losses = []
        for step in range(STEPS):
            parts, generators = batch_of_step(step)
            latents = torch.cat([self.latents(part[0], generators) for part in parts])  # (parts x B, 4, h, w)
            ids = self.token_ids([caption for part in parts for caption in part[1]])  # (parts x B, 77)
            rows = generators * len(parts)
            timesteps = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in rows])  # (parts x B,)
            noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in rows])
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            text = self.text_encoder(ids)[0]  # (parts x B, 77, D)
            prediction = predict(noisy, timesteps, text, parts)
            loss = loss_of(prediction.float(), noise.float())
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            after_step()
            losses.append(loss.item())
        return losses

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generators) -> torch.Tensor:
        uniforms(generators)  # the caption-dropout draws (dropout 0 here: every caption kept)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generators)  # (B, 4, h, w)
        return latents * self.vae.config.scaling_factor


def batches(paths: list[str], captions: list[str], random_flip: bool = True, class_paths=(), class_prompt=None):
    """``batch_of_step`` over the image files: minidiff's seeded global-batch order, one generator per sample.
    With class images, dataset example ``i`` pairs instance ``i mod n`` with class image ``i mod m`` over
    ``max(n, m)`` examples (train_dreambooth.py's DreamBoothDataset); flips: the instances', then the classes'."""
    instances = [read_pixels(path) for path in paths]
    classes = [read_pixels(path) for path in class_paths]
    length = max(len(instances), len(classes))

    def part(images: list[torch.Tensor], generators) -> torch.Tensor:
        return flipped(images, generators) if random_flip else torch.stack(images)

    def batch_of_step(step: int):
        indices = global_batch_indices(length, BATCH, step, SEED)
        generators = sample_generators(SEED, step, range(BATCH))
        chosen = [i % len(instances) for i in indices]
        parts = [(part([instances[i] for i in chosen], generators), [captions[i] for i in chosen])]
        if classes:
            chosen = [i % len(classes) for i in indices]
            parts.append((part([classes[i] for i in chosen], generators), [class_prompt] * BATCH))
        return parts, generators

    return batch_of_step


def add_peft_lora(model, rank: int, alpha: float, targets, initial: dict[str, torch.Tensor]) -> list:
    """peft's adapter on ``model`` (what the scripts add), then minidiff's initial numbers copied in (``initial``
    uses peft's ``get_peft_model_state_dict`` names) once they are seen to follow peft's distribution (up = 0,
    down ~ N(0, std 1/r)); returns the trainable parameters."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    params = {name.replace(".default", ""): p for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(params) == sorted(initial), "peft and minidiff adapt different modules"
    for part in ("lora_A", "lora_B"):
        ours = torch.cat([initial[k].flatten() for k in initial if f".{part}." in k])
        theirs = torch.cat([params[k].detach().flatten() for k in params if f".{part}." in k])
        assert abs(ours.std() - theirs.std()) <= 0.1 / rank and abs(ours.mean()) <= 0.1 / rank, \
            f"minidiff's initial {part} (std {ours.std():.4f}) is not peft's gaussian init (std {theirs.std():.4f})"
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(initial[name])
    return list(params.values())


def flat_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten() for k in sorted(state)])


def saved_weights(folder, component: str) -> dict[str, torch.Tensor]:
    """The base folder's weights of ``component`` as diffusers / transformers saved them."""
    (name,) = [n for n in os.listdir(os.path.join(folder, component)) if n.endswith(".safetensors")]
    return load_file(os.path.join(folder, component, name))


def compare_lora(component: str, case: str, ours: dict, theirs: dict, tol: float = WEIGHT_TOL) -> None:
    """Every trained down (A) and up (B) matrix, flattened into one vector (peft's names, sorted)."""
    assert sorted(ours) == sorted(theirs), "minidiff's file and peft name different LoRA tensors"
    compare(component, f"{case}: LoRA weights after {STEPS} steps", flat_state(ours), flat_state(theirs), tol)


def split_lora_file(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' LoRA file ``{component}.{module}.lora_A.weight`` -> component -> tensors under the names peft
    gives them here (transformers 5's CLIPTextModel has no ``text_model.`` level; the file keeps the classic one)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        component, name = key.split(".", 1)
        parts.setdefault(component, {})[name.removeprefix("text_model.")] = tensor
    return parts


# ---------------------------------------------------------------------------------------------------------- LoRA

LORA_CASES = {
    "UNet, rank 4 (defaults)": dict(),
    "UNet + text encoder, rank 2 alpha 3": dict(lora_rank=2, lora_alpha=3.0, train_text_encoder=True),
    "UNet attn2 + ff, rank 3 alpha 1.5": dict(lora_rank=3, lora_alpha=1.5,
                                              lora_target_modules=("attn2.to_q", "attn2.to_v", "ff.net.2")),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_training(folder, tmp_path, case):
    """train_text_to_image_lora.py's update on captioned images; the saved file loads in diffusers."""
    options = LORA_CASES[case]
    paths = write_images(tmp_path / "images", CAPTIONS)
    trainer = minidiff_trainer(tmp_path, folder, "run", method="lora", train_data_dir=str(tmp_path / "images"),
                               **options)
    rank, alpha = trainer.config.lora_rank, trainer.config.lora_alpha or trainer.config.lora_rank
    pipe = trainer.task.pipe
    initial = {"unet": {k: v.clone() for k, v in lora_state_dict(pipe.unet).items()}}
    if trainer.config.train_text_encoder:
        initial["text_encoder"] = {k: v.clone() for k, v in lora_state_dict(pipe.text_encoder).items()}
    ours = trainer.run()

    reference = Reference(folder)
    params = add_peft_lora(reference.unet, rank, alpha, trainer.config.lora_target_modules, initial["unet"])
    if "text_encoder" in initial:
        params += add_peft_lora(reference.text_encoder, rank, alpha, ("q_proj", "k_proj", "v_proj", "out_proj"),
                                initial["text_encoder"])
    theirs = reference.loop(params, batches(paths, CAPTIONS))
    compare(COMPONENT_LORA, f"{case}: losses of {STEPS} steps", torch.tensor(ours), torch.tensor(theirs), LOSS_TOL)
    saved = split_lora_file(os.path.join(trainer.config.output_dir, "pytorch_lora_weights.safetensors"))
    assert sorted(saved) == sorted(initial), f"the file holds {sorted(saved)}, trained were {sorted(initial)}"
    for component in initial:
        compare_lora(COMPONENT_LORA, f"{case}, {component}", saved[component],
                     get_peft_model_state_dict(getattr(reference, component)))

    for component in initial:
        compare(COMPONENT_LORA, f"{case}, {component}: base weights after {STEPS} steps (bit-identical)",
                flat_state(base_state_dict(getattr(pipe, component))), flat_state(saved_weights(folder, component)),
                0.0, "abs")
    assert trainer.output_path == os.path.join(trainer.config.output_dir, "pytorch_lora_weights.safetensors")
    compare_saved_lora(case, folder, trainer.config.output_dir, "text_encoder" in initial)


def compare_saved_lora(case: str, folder, output_dir, text_encoder: bool) -> None:
    """The saved file through each library's ``load_lora_weights``: the same float64 image (and, with a text
    encoder adapter, prompt embeddings), unlike the base model's."""
    theirs = diffusers_pipeline(folder)
    base_image, base_text = image_of(theirs), prompt_embeddings(theirs)
    theirs.to(torch.float32).load_lora_weights(str(output_dir))
    ours = minidiff_pipeline(folder)
    ours.load_lora_weights(str(output_dir))
    expected = image_of(theirs)
    compare(COMPONENT_LORA, f"{case}: saved LoRA, txt2img np (float64)", image_of(ours), expected, NP_TOL, "abs")
    assert np.abs(expected - base_image).max() > 10 * NP_TOL, "the trained LoRA does not change the image"
    if text_encoder:
        expected = prompt_embeddings(theirs)
        compare(COMPONENT_LORA, f"{case}: saved LoRA, prompt embeddings (float64)", prompt_embeddings(ours),
                expected, WEIGHT_TOL)
        assert (expected - base_text).abs().max() > 1e-4, "the text encoder's LoRA does not change the embeddings"


@torch.no_grad()
def prompt_embeddings(pipe) -> torch.Tensor:
    return pipe.to(torch.float64).encode_prompt(PROMPT, "cpu", 1, False)[0]  # (1, 77, D)


# ------------------------------------------------------------------------------------------------ textual inversion

PLACEHOLDER, INITIALIZER, VECTORS = "<sks-shape>", "square", 2


def reference_textual_inversion(reference: Reference) -> tuple[torch.nn.Parameter, list[int]]:
    """textual_inversion.py's set-up: the new tokens added to the tokenizer, the table resized and their rows set
    to the initializer's; the whole table is the trained parameter. Returns it and the new tokens' ids."""
    tokens = [PLACEHOLDER] + [f"{PLACEHOLDER}_{i}" for i in range(1, VECTORS)]
    assert reference.tokenizer.add_tokens(tokens) == VECTORS
    (initializer_id,) = reference.tokenizer.encode(INITIALIZER, add_special_tokens=False)
    ids = reference.tokenizer.convert_tokens_to_ids(tokens)
    reference.text_encoder.resize_token_embeddings(len(reference.tokenizer))
    table = reference.text_encoder.get_input_embeddings().weight  # (V + n, D)
    with torch.no_grad():
        table[ids] = table[initializer_id].clone()
    table.requires_grad_(True)
    return table, ids


def test_textual_inversion_training(folder, tmp_path):
    """textual_inversion.py's update (a 2-vector token; the script clips no gradient): the same losses and learned
    rows, every other row bit-identical to the base; learned_embeds.safetensors loads in diffusers."""
    component, case = "textual inversion training", f"{VECTORS}-vector {PLACEHOLDER} from {INITIALIZER!r}"
    prompt = f"a photo of {PLACEHOLDER}"
    paths = write_images(tmp_path / "images", None)
    trainer = minidiff_trainer(tmp_path, folder, "run", method="textual-inversion", max_grad_norm=None,
                               train_data_dir=str(tmp_path / "images"), instance_prompt=prompt,
                               placeholder_token=PLACEHOLDER, initializer_token=INITIALIZER, num_vectors=VECTORS)
    ours = trainer.run()

    reference = Reference(folder)
    table, ids = reference_textual_inversion(reference)
    original = table.detach().clone()
    kept = torch.ones(len(table), dtype=torch.bool)
    kept[min(ids):max(ids) + 1] = False

    def restore_other_rows():
        with torch.no_grad():
            table[kept] = original[kept]

    expanded = prompt.replace(PLACEHOLDER, " ".join(reference.tokenizer.convert_ids_to_tokens(ids)))
    theirs = reference.loop([table], batches(paths, [expanded] * IMAGES), max_grad_norm=None,
                            after_step=restore_other_rows)
    compare(component, f"{case}: losses of {STEPS} steps", torch.tensor(ours), torch.tensor(theirs), LOSS_TOL)
    learned = load_file(os.path.join(trainer.config.output_dir, "learned_embeds.safetensors"))
    assert list(learned) == [PLACEHOLDER], f"learned_embeds.safetensors holds {list(learned)}"
    compare(component, f"{case}: learned rows after {STEPS} steps", learned[PLACEHOLDER], table.detach()[ids],
            WEIGHT_TOL)
    assert not torch.equal(learned[PLACEHOLDER], original[ids]), "the new token's rows did not train"

    base_table = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").get_input_embeddings()
    trained_table = trainer.task.pipe.text_encoder.get_input_embeddings().weight.detach()  # (V + n, D)
    assert trained_table.shape == table.shape, f"minidiff's table is {tuple(trained_table.shape)}"
    compare(component, f"{case}: every other row after {STEPS} steps (bit-identical)",
            trained_table[:len(base_table.weight)], base_table.weight.detach(), 0.0, "abs")

    theirs_pipe = diffusers_pipeline(folder)
    untrained = prompt.replace(PLACEHOLDER, " ".join([INITIALIZER] * VECTORS))  # the new rows' starting point
    base_image = image_of(theirs_pipe, untrained)
    theirs_pipe.to(torch.float32).load_textual_inversion(trainer.config.output_dir)
    ours_pipe = minidiff_pipeline(folder)
    ours_pipe.load_textual_inversion(trainer.config.output_dir)
    expected = image_of(theirs_pipe, prompt)
    compare(component, f"{case}: saved embedding, txt2img np (float64)", image_of(ours_pipe, prompt), expected,
            NP_TOL, "abs")
    assert np.abs(expected - base_image).max() > 10 * NP_TOL, "the learned token draws what its initializer draws"


# ------------------------------------------------------------------------------------------------------- DreamBooth

INSTANCE_PROMPT, CLASS_PROMPT, PRIOR_LOSS_WEIGHT, CLASS_IMAGES = "a photo of sks shape", "a photo of a shape", 0.5, 3
PRIOR_GUIDANCE = 4.0  # prior_guidance_scale of the frozen-model target


def prior_preservation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """train_dreambooth.py's loss on the [instance; class] batch: mse(instance half) + prior_loss_weight x
    mse(class half) (Ruiz et al. 2023, Eq. 2)."""
    prediction, prediction_prior = prediction.chunk(2)
    target, target_prior = target.chunk(2)
    return F.mse_loss(prediction, target) + PRIOR_LOSS_WEIGHT * F.mse_loss(prediction_prior, target_prior)


def frozen_model_prior(reference: Reference, frozen):
    """``prior_target="frozen-model"`` written on the diffusers side: ``(predict, loss_of)`` for Reference.loop.
    ``predict`` stacks [instance; class] predictions, the class rows under the empty caption, and the frozen
    model's predictions of both (``frozen()`` yields it, without a graph); ``loss_of`` is mse(instance) +
    prior_loss_weight x mean(|d_u + g (d_c - d_u)|^2 + |d_u|^2), d the change from the frozen prediction."""
    def predict(noisy, timesteps, text, parts):
        empty = reference.text_encoder(reference.token_ids([""] * BATCH))[0]  # (B, 77, D)
        x, t = noisy[BATCH:], timesteps[BATCH:]  # the class rows, again under the empty caption
        trained = reference.unet(torch.cat([noisy, x]), torch.cat([timesteps, t]), torch.cat([text, empty])).sample
        with torch.no_grad(), frozen() as unet:
            kept = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text[BATCH:], empty])).sample
        return torch.cat([trained, kept])  # (5B, C, h, w)

    def loss_of(stacked, noise):
        instance, conditional, unconditional, kept_conditional, kept_unconditional = stacked.split(BATCH)
        d_c, d_u = conditional - kept_conditional, unconditional - kept_unconditional
        prior = (d_u + PRIOR_GUIDANCE * (d_c - d_u)).pow(2).mean() + d_u.pow(2).mean()
        return F.mse_loss(instance, noise[:BATCH]) + PRIOR_LOSS_WEIGHT * prior

    return predict, loss_of


@contextlib.contextmanager
def adapters_off(unet):
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


PRIOR_CASES = {"noise target, LoRA": ("noise", True), "noise target, whole UNet": ("noise", False),
               "frozen-model target, LoRA": ("frozen-model", True),
               "frozen-model target, whole UNet": ("frozen-model", False)}


@pytest.mark.parametrize("case", list(PRIOR_CASES))
def test_dreambooth_prior_preservation(folder, tmp_path, case):
    """train_dreambooth(_lora).py with prior preservation: class images already in class_data_dir (3 of them for 4
    instance images, so the pairing wraps), no flips (the scripts have none), prior_loss_weight 0.5; and the same
    with the class images fitted to the frozen model's guided prediction (training/prior.py)."""
    prior_target, use_lora = PRIOR_CASES[case]
    component = "DreamBooth training"
    paths = write_images(tmp_path / "instances", None)
    class_paths = [str(tmp_path / "classes" / f"class-{k:05d}.png") for k in range(CLASS_IMAGES)]
    for k, path in enumerate(class_paths):
        write_image(path, size=(RESOLUTION, RESOLUTION), seed=200 + k)
    learning_rate = OPTIMIZER["learning_rate"] if use_lora else WHOLE_UNET_LR
    guidance = dict(prior_guidance_scale=PRIOR_GUIDANCE) if prior_target == "frozen-model" else {}
    trainer = minidiff_trainer(tmp_path, folder, "run", method="dreambooth", use_lora=use_lora, random_flip=False,
                               train_data_dir=str(tmp_path / "instances"), instance_prompt=INSTANCE_PROMPT,
                               with_prior_preservation=True, class_prompt=CLASS_PROMPT,
                               class_data_dir=str(tmp_path / "classes"), num_class_images=CLASS_IMAGES,
                               prior_loss_weight=PRIOR_LOSS_WEIGHT, learning_rate=learning_rate,
                               prior_target=prior_target, **guidance)
    initial = {k: v.clone() for k, v in lora_state_dict(trainer.task.pipe.unet).items()} if use_lora else None
    ours = trainer.run()
    assert sorted(os.listdir(tmp_path / "classes")) == [os.path.basename(p) for p in class_paths], \
        "minidiff drew class images although class_data_dir held enough"

    reference = Reference(folder)
    if use_lora:
        rank = trainer.config.lora_rank
        params = add_peft_lora(reference.unet, rank, trainer.config.lora_alpha or rank,
                               trainer.config.lora_target_modules, initial)
        frozen = lambda: adapters_off(reference.unet)  # noqa: E731
    else:
        kept = copy.deepcopy(reference.unet).requires_grad_(False).eval()
        params = list(reference.unet.requires_grad_(True).parameters())
        frozen = lambda: contextlib.nullcontext(kept)  # noqa: E731
    predict, loss_of = frozen_model_prior(reference, frozen) if prior_target == "frozen-model" \
        else (None, prior_preservation_loss)
    batch_of_step = batches(paths, [INSTANCE_PROMPT] * IMAGES, random_flip=False, class_paths=class_paths,
                            class_prompt=CLASS_PROMPT)
    theirs = reference.loop(params, batch_of_step, loss_of=loss_of, learning_rate=learning_rate, predict=predict)
    compare(component, f"prior preservation, {case}: losses of {STEPS} steps", torch.tensor(ours),
            torch.tensor(theirs), LOSS_TOL)
    if use_lora:
        saved = split_lora_file(os.path.join(trainer.config.output_dir, "pytorch_lora_weights.safetensors"))
        tol = FROZEN_PRIOR_WEIGHT_TOL if prior_target == "frozen-model" else ADAM_WEIGHT_TOL
        compare_lora(component, f"prior preservation, {case}", saved["unet"],
                     get_peft_model_state_dict(reference.unet), tol)
    else:
        trained = minidiff.UNet2DConditionModel.from_pretrained(trainer.config.output_dir, subfolder="unet")
        theirs_state, ours_state = reference.unet.state_dict(), trained.state_dict()
        compare(component, f"prior preservation, {case}: UNet weights after {STEPS} steps",
                flat_state({k: ours_state[k] for k in theirs_state}), flat_state(theirs_state), ADAM_WEIGHT_TOL)
