"""Training parity: minidiff's training loop against the same loop written on diffusers objects.

The reference is the loop of diffusers' tutorials (the butterflies notebook, ``train_unconditional.py``,
``train_text_to_image.py``): ``add_noise`` -> UNet -> MSE against eps (or v) -> backward -> clip -> AdamW -> cosine
warm-up schedule. Both start from the same weights (one diffusers model saved with save_pretrained, loaded by each
library), see the same images and draw the same flips, captions dropped, latents, timesteps and noise from the same
per-sample generators; the per-step losses and the final weights must agree.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.optimization import get_cosine_schedule_with_warmup

from minidiff import UNet2DConditionModel, UNet2DModel
from minidiff.training import TrainConfig, train
from minidiff.training.data import SyntheticShapes, global_batch_indices, sample_generators
from parity.pipeline_fixtures import save_reference_pipeline
from parity.report import compare
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

COMPONENT = "training"
LOSS_TOL = 1e-5  # relative, per-step losses over the first steps
WEIGHT_TOL = 1e-4  # relative, all weights after the last step (Adam divides by sqrt(v): small gradient noise grows)
STEPS, BATCH, SEED, IMAGES = 5, 4, 3, 16
OPTIMIZER = dict(learning_rate=1e-3, lr_warmup_steps=2, lr_scheduler="cosine", adam_beta1=0.9, adam_beta2=0.999,
                 adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0)


def butterfly_unet(num_class_embeds=None) -> diffusers.UNet2DModel:
    """The tutorial's UNet2DModel (DownBlock2D, then attention at the deepest levels), narrowed for CI."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def uniforms(generators) -> list[float]:
    """One uniform draw per sample (minidiff draws its flips, then its caption dropouts, this way)."""
    return [torch.rand(1, generator=g).item() for g in generators]


def reference_loop(unet, scheduler, dataset, prediction_type, encode, flip=True) -> list[float]:
    """The tutorial loop on diffusers objects; ``encode(pixels, batch_examples, generators)`` -> (x0, conditioning)."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=OPTIMIZER["learning_rate"], betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, OPTIMIZER["lr_warmup_steps"], STEPS)
    unet.train()
    losses = []
    for step in range(STEPS):
        examples = [dataset[i] for i in global_batch_indices(len(dataset), BATCH, step, SEED)]
        generators = sample_generators(SEED, step, range(BATCH))
        flips = [u < 0.5 for u in uniforms(generators)] if flip else [False] * BATCH
        pixels = torch.stack([e["pixel_values"].flip(-1) if f else e["pixel_values"] for e, f in zip(examples, flips)])
        x0, conditioning = encode(pixels, examples, generators)
        timesteps = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators])
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction = unet(noisy, timesteps, **conditioning, return_dict=False)[0]
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
        loss = F.mse_loss(prediction, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def minidiff_run(tmp_path, pretrained, **options) -> list[float]:
    config = TrainConfig(output_dir=str(tmp_path / "run"), pretrained_model=str(pretrained), synthetic_images=IMAGES,
                         seed=SEED, train_batch_size=BATCH, max_train_steps=STEPS, use_ema=False,
                         num_sample_images=0, progress=False, **OPTIMIZER, **options)
    return train(config)


def compare_weights(case: str, ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    theirs = reference.state_dict()
    flat = lambda state: torch.cat([state[k].flatten() for k in sorted(theirs)])  # noqa: E731
    compare(COMPONENT, f"{case}: weights after {STEPS} steps", flat(ours.state_dict()), flat(theirs), WEIGHT_TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("class_conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_pixel_loop(tmp_path, prediction_type, class_conditional):
    """The butterflies loop: UNet2DModel + DDPMScheduler(squaredcos_cap_v2) + add_noise + MSE + AdamW."""
    unet = butterfly_unet(num_class_embeds=3 if class_conditional else None)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type=prediction_type)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pretrained")

    ours = minidiff_run(tmp_path, tmp_path / "pretrained", class_conditional=class_conditional)

    def encode(pixels, examples, generators):
        labels = torch.tensor([e["class_label"] for e in examples])
        return pixels, ({"class_labels": labels} if class_conditional else {})

    dataset = SyntheticShapes(IMAGES, 16, seed=SEED)
    theirs = reference_loop(unet, scheduler, dataset, prediction_type, encode)
    case = f"DDPM loop, {prediction_type}, {'class-conditional' if class_conditional else 'unconditional'}"
    compare(COMPONENT, f"{case}: losses of {STEPS} steps", torch.tensor(ours), torch.tensor(theirs), LOSS_TOL)
    compare_weights(case, UNet2DModel.from_pretrained(tmp_path / "run", subfolder="unet"), unet)


def test_text_to_image_loop(tmp_path):
    """train_text_to_image.py: VAE latents x scaling_factor, CLIP embeddings of captions (30% dropped), a
    UNet2DConditionModel trained on them; the VAE and the text encoder frozen."""
    pipe, folder = save_reference_pipeline(tmp_path)
    scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")

    ours = minidiff_run(tmp_path, folder, caption_dropout=0.3, random_flip=False)

    @torch.no_grad()
    def encode(pixels, examples, generators):
        captions = [e["caption"] if u >= 0.3 else "" for e, u in zip(examples, uniforms(generators))]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generators) * pipe.vae.config.scaling_factor
        return latents, {"encoder_hidden_states": pipe.text_encoder(ids)[0]}

    dataset = SyntheticShapes(IMAGES, 32, seed=SEED)
    theirs = reference_loop(pipe.unet, scheduler, dataset, "epsilon", encode, flip=False)
    case = "text-to-image latent loop, 30% caption dropout"
    compare(COMPONENT, f"{case}: losses of {STEPS} steps", torch.tensor(ours), torch.tensor(theirs), LOSS_TOL)
    compare_weights(case, UNet2DConditionModel.from_pretrained(tmp_path / "run", subfolder="unet"), pipe.unet)
