"""Stage 1 of the built-in model: train the AutoencoderKL on the shapes images, then set its scaling_factor.

Loss per batch: ``mean |x - D(z)| + kl_weight * mean KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)`` (the VAE of
Kingma & Welling 2014 with an L1 reconstruction term, as the LDM autoencoders minus their perceptual and GAN terms;
Rombach et al. 2022, Sec. 3.1 and App. G). Flat shapes need nothing more. Afterwards ``scaling_factor`` is
1 / std of the latents over 2048 images, so the diffusion model sees latents of unit variance (SD's 0.18215).
"""

from __future__ import annotations

import os

import torch

import minidiff
from minidiff.training.shapes import CaptionedShapes
from scripts.builtin import settings
from scripts.builtin.common import Run, one_thread, parse_args


def vae_loss(vae, pixels: torch.Tensor, generators: list[torch.Generator], kl_weight: float):
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generators)  # (B, 4, 16, 16)
    reconstruction = vae.decode(latents).sample  # (B, 3, 32, 32)
    l1 = (reconstruction - pixels).abs().mean()
    kl = posterior.kl().mean() / latents[0].numel()  # per latent element
    return l1 + kl_weight * kl, l1, kl


@torch.no_grad()
def latent_std(vae, dataset: CaptionedShapes, count: int = 2048) -> float:
    latents = [vae.encode(dataset.pixel_values(range(i, i + 256))).latent_dist.sample(torch.Generator().manual_seed(i))
               for i in range(0, count, 256)]
    return torch.cat(latents).std().item()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    one_thread()
    options = dict(settings.VAE_TRAINING, dataset=settings.DATASET, model=settings.VAE)
    dataset = CaptionedShapes(**settings.DATASET)
    torch.manual_seed(options["seed"])
    vae = minidiff.AutoencoderKL(**settings.VAE).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=options["learning_rate"], weight_decay=options["weight_decay"])
    run = Run(args.output_dir or settings.VAE_RUN, {"vae": vae}, optimizer, options, args, len(dataset))
    print(f"AutoencoderKL: {vae.num_parameters() / 1e6:.2f}M weights; steps {run.step} -> {run.last_step}", flush=True)
    while run.step < run.last_step:
        indices, generators, _ = run.batch(run.step)
        run.set_learning_rate()
        loss, l1, kl = vae_loss(vae, dataset.pixel_values(indices), generators, options["kl_weight"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.log(loss=loss.item(), l1=l1.item(), kl=kl.item())
    if run.step == options["steps"]:
        vae.eval()
        vae.config.scaling_factor = round(1.0 / latent_std(vae, dataset), 4)
        vae.save_pretrained(os.path.join(run.folder, "final"))
        print(f"scaling_factor {vae.config.scaling_factor}; final VAE in {run.folder}/final", flush=True)


if __name__ == "__main__":
    main()
