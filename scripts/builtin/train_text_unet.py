"""Stage 2 of the built-in model: train the CLIPTextModel and the UNet2DConditionModel together on VAE latents.

Per step (Ho et al. 2020, Algorithm 1, in the latent space of Rombach et al. 2022): each image gets a fresh caption
from the dataset's grammar - or, with probability ``caption_dropout``, the empty caption, which teaches the
unconditional prediction classifier-free guidance needs (Ho & Salimans 2022, Sec. 3.2) - and a latent
``z ~ q(z|x)`` times the VAE's ``scaling_factor``; ``minidiff.training.training_step`` noises it at a random
timestep and back-propagates ``|| v - v_theta(z_t, t, CLIP(caption)) ||^2`` (v-prediction, Salimans & Ho 2022)
into the UNet and the text encoder.
An EMA of both is what ships. Every checkpoint prints how many of 16 held-out prompts the EMA model gets right.
"""

from __future__ import annotations

import os

import torch

import minidiff
from minidiff.random import randn_tensor
from minidiff.training import EMAModel, training_step
from minidiff.training.shapes import CaptionedShapes, held_out_prompts
from scripts.builtin import settings
from scripts.builtin.common import Run, one_thread, parse_args
from scripts.builtin.evaluate import prompt_match


@torch.no_grad()
def encode_dataset(vae, dataset: CaptionedShapes, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z|x) for every image (N, 4, 8, 8): the VAE is frozen, so it runs once."""
    means, stds = [], []
    for start in range(0, len(dataset), batch):
        posterior = vae.encode(dataset.pixel_values(range(start, min(start + batch, len(dataset))))).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class CaptionTokens:
    """CLIP token ids (77 per caption, padded with <|endoftext|>), cached: the grammar has few distinct captions."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for caption in set(captions) - set(self.cache):
            self.cache[caption] = self.tokenizer(caption, padding="max_length", max_length=77, truncation=True,
                                                 return_tensors="pt")["input_ids"][0]
        return torch.stack([self.cache[c] for c in captions])  # (B, 77)


def pipeline(vae, text_encoder, unet) -> minidiff.StableDiffusionPipeline:
    pipe = minidiff.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=minidiff.CLIPTokenizer(),
                                            unet=unet, scheduler=minidiff.DDIMScheduler(**settings.SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    one_thread()
    o = dict(settings.TEXT_UNET_TRAINING, dataset=settings.DATASET, unet=settings.UNET,
             text_encoder=settings.TEXT_ENCODER, scheduler=settings.SCHEDULER)
    vae = minidiff.AutoencoderKL.from_pretrained(args.vae or os.path.join(settings.VAE_RUN, "final")).eval()
    dataset = CaptionedShapes(**settings.DATASET)
    means, stds = encode_dataset(vae, dataset)
    tokens = CaptionTokens(minidiff.CLIPTokenizer())
    torch.manual_seed(o["seed"])
    text_encoder = minidiff.CLIPTextModel(**settings.TEXT_ENCODER).train()
    unet = minidiff.UNet2DConditionModel(**settings.UNET).train()
    scheduler = minidiff.DDPMScheduler.from_config(settings.SCHEDULER)  # its add_noise makes z_t
    both = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = EMAModel(both, o["ema_max_decay"], o["ema_power"])
    optimizer = torch.optim.AdamW(both.parameters(), lr=o["learning_rate"], weight_decay=o["weight_decay"],
                                  fused=True)
    models = {"unet": unet, "text_encoder": text_encoder, "unet_ema": ema.model["unet"],
              "text_encoder_ema": ema.model["text_encoder"]}
    run = Run(args.output_dir or settings.TEXT_UNET_RUN, models, optimizer, o, args, len(dataset))
    ema.num_updates = run.extra.get("ema_updates", 0)
    print(f"UNet {unet.num_parameters() / 1e6:.2f}M, text encoder {text_encoder.num_parameters() / 1e6:.2f}M "
          f"weights; steps {run.step} -> {run.last_step}", flush=True)
    probe = held_out_prompts(16)
    while run.step < run.last_step:
        indices, generators, caption_rngs = run.batch(run.step)
        run.set_learning_rate()
        captions = [dataset.caption(i, rng) if torch.rand(1, generator=g).item() >= o["caption_dropout"] else ""
                    for i, g, rng in zip(indices, generators, caption_rngs)]
        noise = randn_tensor(means[indices].shape, generator=generators)
        latents = (means[indices] + stds[indices] * noise) * vae.config.scaling_factor  # z ~ q(z|x), scaled
        text = text_encoder(tokens(captions))[0]  # (B, 77, 64)
        loss = training_step(unet, scheduler, latents, generators, scheduler.config.prediction_type,
                             {"encoder_hidden_states": text})
        torch.nn.utils.clip_grad_norm_(both.parameters(), o["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(both)
        run.extra["ema_updates"] = ema.num_updates
        run.log(loss=loss.item())
        if run.step % o["checkpoint_every"] == 0 or run.step == run.last_step:
            pipe = pipeline(vae, ema.model["text_encoder"], ema.model["unet"])
            print(f"  step {run.step}: held-out prompt match {prompt_match(pipe, probe)['fraction']:.2f}", flush=True)
    if run.step == o["steps"]:
        pipeline(vae, ema.model["text_encoder"], ema.model["unet"]).save_pretrained(os.path.join(run.folder, "final"))
        print(f"final pipeline (EMA weights) in {run.folder}/final", flush=True)


if __name__ == "__main__":
    main()
