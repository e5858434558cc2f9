"""`minidiff generate|img2img|inpaint|edit|train`: run a pipeline (or a training run) from the shell and say what
happened, stage by stage."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

import torch

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


@contextmanager
def stage(name: str, timings: list[tuple[str, float]]):
    start = time.perf_counter()
    yield
    timings.append((name, time.perf_counter() - start))


def load_pipeline(pipeline_class, model: str | None):
    """A diffusers folder, a single-file checkpoint, or (no --model) the built-in model."""
    if model is None:
        from minidiff.builtin import builtin_model_folder

        model = builtin_model_folder()
    if os.path.isdir(model):
        return pipeline_class.from_pretrained(model)
    if os.path.isfile(model):
        if not model.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            raise ValueError(f"{model} is neither a diffusers folder nor a .safetensors/.ckpt checkpoint")
        return pipeline_class.from_single_file(model)
    return pipeline_class.from_pretrained(model)  # a hub id: resolved from the local cache or a clear error


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="minidiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "img2img", "inpaint", "edit"):
        sub = commands.add_parser(name)
        sub.add_argument("--model", help="diffusers folder or single-file checkpoint (default: the built-in model)")
        sub.add_argument("--prompt", required=True, help="what to draw (for edit: the target prompt)")
        sub.add_argument("--negative-prompt", default=None)
        sub.add_argument("--steps", type=int, default=25)
        sub.add_argument("--guidance", type=float, default=7.5)
        sub.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--height", type=int, default=None)
        sub.add_argument("--width", type=int, default=None)
        sub.add_argument("--output", default=f"{name}.png", help="where to write the PNG")
        if name != "generate":
            sub.add_argument("--image", required=True, help="input image file")
        if name == "img2img":
            sub.add_argument("--strength", type=float, default=0.8)
        if name == "inpaint":
            sub.add_argument("--mask", required=True, help="mask image file (white = repaint)")
        if name == "edit":
            sub.add_argument("--source-prompt", required=True, help="a description of the input image")
            sub.add_argument("--start-step", type=int, default=10)
    from minidiff.training.config import add_arguments

    add_arguments(commands.add_parser("train", help="train or fine-tune a diffusion model"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import PIL.Image

    from minidiff import pipelines, schedulers

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "train":
        from minidiff.training import main as train_main

        return train_main(args)
    if not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise SystemExit(f"minidiff: --seed must be an integer in [0, 2**64), got {args.seed}")
    pipeline_class = {
        "generate": pipelines.StableDiffusionPipeline,
        "img2img": pipelines.StableDiffusionImg2ImgPipeline,
        "inpaint": pipelines.StableDiffusionInpaintPipeline,
        "edit": pipelines.StableDiffusionDDIMInversionPipeline,
    }[args.command]
    timings: list[tuple[str, float]] = []
    try:
        with stage("load", timings):
            pipe = load_pipeline(pipeline_class, args.model)
            if args.scheduler:
                pipe.scheduler = getattr(schedulers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(args.seed)
        with stage("sample", timings):
            if args.command == "edit":
                image = PIL.Image.open(args.image)
                result = pipe.edit(image, args.source_prompt, args.prompt, num_inference_steps=args.steps,
                                   start_step=args.start_step, guidance_scale=args.guidance)
            else:
                kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                              guidance_scale=args.guidance, generator=generator)
                if args.command == "generate":
                    kwargs.update(height=args.height, width=args.width)
                if args.command == "img2img":
                    kwargs.update(image=PIL.Image.open(args.image), strength=args.strength)
                if args.command == "inpaint":
                    kwargs.update(image=PIL.Image.open(args.image), mask_image=PIL.Image.open(args.mask),
                                  height=args.height, width=args.width)
                result = pipe(**kwargs)
        with stage("save", timings):
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            result.images[0].save(args.output)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"minidiff: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    for name, seconds in timings:
        print(f"  {name:<7}{seconds:7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
