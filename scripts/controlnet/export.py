"""Write minidiff/weights/tiny-shapes-outline from the trained run: the ControlNet folder with float16 weights (its
config says float32, so minidiff and diffusers build float32 models and upcast on load), measured again as
shipped, and its model card (README.md) with those numbers and the evaluation's.

    python -m scripts.controlnet.export
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

import minidiff
from scripts.builtin.export import to_float16
from scripts.controlnet.draw import held_out_shapes
from scripts.controlnet.evaluate import controlnet_pipeline, measure
from scripts.controlnet.settings import GUIDANCE, HELD_OUT, IMAGES, IOU, RESULTS, RUN, SHIPPED, STEPS, THREADS, TRAIN

CARD = """\
# tiny-shapes-outline: an outline ControlNet for minidiff's built-in model

A diffusers ControlNetModel folder for the built-in tiny-shapes model (`../tiny-shapes`), trained beside it (the
model frozen) on this project's 2-core CPU with minidiff alone (`scripts/controlnet`, every setting in its
settings.py). Given a shape's outline, white on a black 32x32 image, the model draws its shape inside that outline
in the prompt's colours, at any size and place, while the model alone knows two sizes and nine positions:

    minidiff generate --prompt "a red circle on a blue background" --control-image outline.png

`minidiff.pipelines.conditions.outline(mask)` draws such an outline from an (H, W) bool mask.
`minidiff.builtin.load_builtin_pipeline(minidiff.StableDiffusionControlNetPipeline)` loads the model with this
ControlNet; diffusers' `ControlNetModel.from_pretrained` reads the same folder.

## The network

`ControlNetModel.from_unet(unet)`: the UNet's encoder copied ({weights:,} weights), zero convolutions after each of
its levels, and a condition encoder cut to the VAE's 2x downsampling (channels {channels}). Trained {steps} steps of
{batch} images (lr {lr}, constant after {warmup} warm-up steps, the noise-prediction loss through the frozen UNet) on
{images} procedural images: one circle, square or triangle of any size and place, its caption naming its colours.
{minutes:.0f} minutes on one core. Stored as float16 ({kib:.0f} KiB).

## Measured from pixels (`minidiff.training.shapes.read_scene`, no model)

On {prompts} held-out outlines in colour pairs the training never showed, {steps_eval} DDIM steps, guidance
{guidance}: the share of images whose read shape mask has IoU >= {iou} with the filled outline, whose shape and
background colours are the prompt's, and both.

| | IoU >= {iou} | median IoU | colours right | both |
|---|---|---|---|---|
{rows}

## License

Trained from scratch by the minidiff project on procedurally generated data; same license as minidiff.
"""


def row(name: str, numbers: dict) -> str:
    return (f"| {name} | {numbers['follows']:.1%} | {numbers['median_iou']:.2f} | {numbers['colours']:.1%} | "
            f"{numbers['both']:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=RUN, help="trained ControlNet folder")
    parser.add_argument("--output", default=SHIPPED)
    args = parser.parse_args()
    if not os.path.isfile(RESULTS):
        raise FileNotFoundError(f"no {RESULTS}: run python -m scripts.controlnet.evaluate first")
    with open(RESULTS, encoding="utf-8") as handle:
        results = json.load(handle)
    torch.set_num_threads(THREADS)
    shutil.rmtree(args.output, ignore_errors=True)
    controlnet = minidiff.ControlNetModel.from_pretrained(args.run)
    controlnet.save_pretrained(args.output)
    to_float16(args.output)
    shipped = measure(controlnet_pipeline(args.output), held_out_shapes())
    results["shipped"] = shipped
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    kib = sum(os.path.getsize(os.path.join(args.output, name)) for name in os.listdir(args.output)) / 1024
    rows = "\n".join([row("built-in model alone", results["without_controlnet"]),
                      row("with the ControlNet (float32, as trained)", results["controlnet"]),
                      row("with the ControlNet (float16, as shipped)", shipped)])
    card = CARD.format(weights=sum(p.numel() for p in controlnet.parameters()),
                       channels=tuple(controlnet.config.conditioning_embedding_out_channels),
                       steps=TRAIN["max_train_steps"], batch=TRAIN["train_batch_size"], lr=TRAIN["learning_rate"],
                       warmup=TRAIN["lr_warmup_steps"], images=IMAGES,
                       minutes=results["training"]["minutes"], kib=kib, prompts=HELD_OUT,
                       steps_eval=STEPS, guidance=GUIDANCE, iou=IOU, rows=rows)
    with open(os.path.join(args.output, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    print(f"wrote {args.output} ({kib:.0f} KiB):\n{rows}")


if __name__ == "__main__":
    main()
