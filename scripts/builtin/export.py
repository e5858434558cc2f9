"""Stage 3 of the built-in model: write minidiff/weights/tiny-shapes from the stage-2 run.

The folder is a diffusers StableDiffusionPipeline folder (model_index.json, vae/, text_encoder/, tokenizer/, unet/,
scheduler/): the trained VAE, the EMA text encoder and UNet, the shipped CLIP vocabulary and a DDIMScheduler with
Stable Diffusion 1.x's schedule. Weights are stored as float16 safetensors (half the bytes) while every config
says float32, so minidiff, diffusers and transformers all build float32 models and upcast on load. The model card
(README.md) is kept.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch

import minidiff
from minidiff.loading.safetensors_io import load_safetensors, save_safetensors
from scripts.builtin import settings

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def to_float16(folder: str) -> None:
    """Rewrite every .safetensors file under ``folder`` with float16 tensors (world-readable)."""
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                tensors = load_safetensors(path)
                save_safetensors({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()},
                                 path)
                os.chmod(path, 0o644)  # readable by all once installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=os.path.join(settings.TEXT_UNET_RUN, "final"), help="stage-2 pipeline folder")
    parser.add_argument("--output", default=settings.OUTPUT)
    args = parser.parse_args()
    trained = minidiff.StableDiffusionPipeline.from_pretrained(args.run)
    pipe = minidiff.StableDiffusionPipeline(**dict(trained.components, tokenizer=minidiff.CLIPTokenizer(),
                                                   scheduler=minidiff.DDIMScheduler(**settings.SCHEDULER)))
    for name in (*COMPONENTS, "model_index.json"):
        path = os.path.join(args.output, name)
        shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
    pipe.save_pretrained(args.output)
    to_float16(args.output)
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(args.output) for n in ns)
    print(f"wrote {args.output} ({total / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
