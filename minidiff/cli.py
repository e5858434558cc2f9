"""`minidiff generate|img2img|inpaint|edit|train`: run a pipeline (or a training run) from the shell and say what
happened, stage by stage."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import PIL.Image
import torch

from minidiff.fileio import IMAGE_FORMATS, save_image
from minidiff.schedulers.names import SAMPLERS, resolve


@contextmanager
def stage(name: str, timings: list[tuple[str, float]]):
    start = time.perf_counter()
    yield
    timings.append((name, time.perf_counter() - start))


ATTENTION_BACKENDS = ("sdpa", "math", "chunked")


def sampler_name(value: str) -> str:
    """--scheduler's check: a name :func:`minidiff.schedulers.by_name` accepts (argparse prints the error)."""
    try:
        resolve(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value
COMMANDS = {  # name -> (one line for `minidiff --help`, the description of `minidiff <name> --help`)
    "generate": ("draw an image from a prompt (text to image), optionally controlled by a condition image",
                 "Draw an image from --prompt with classifier-free guidance and write it to --output; with "
                 "--control-image, a ControlNet (--controlnet) makes it follow that condition image."),
    "img2img": ("redraw an image under a prompt (SDEdit)",
                "Noise --image part of the way (--strength) and denoise it under --prompt."),
    "inpaint": ("repaint the white part of a mask under a prompt",
                "Repaint the white part of --mask in --image under --prompt; the black part is kept."),
    "edit": ("edit an image by DDIM inversion under one prompt and resampling under another",
             "Invert --image with DDIM under --source-prompt, then resample it from --start-step under --prompt. "
             "Deterministic (DDIM with eta = 0, whatever the model's scheduler), so it takes no seed or scheduler."),
}
OVERWRITE_RULE = ("an existing --output is refused unless --overwrite is given; an --output naming an input "
                  "(--image, --mask, --control-image) is always refused")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except flags without one (None) and help texts that already state it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_sampling_arguments(sub: argparse.ArgumentParser, name: str) -> None:
    """The flags of ``name`` (generate, img2img, inpaint, edit): each one is used by that command's pipeline."""
    sub.add_argument("--model", help="diffusers folder or single-file checkpoint (default: the built-in model)")
    if name != "generate":
        sub.add_argument("--image", required=True, help="input image file")
    if name == "inpaint":
        sub.add_argument("--mask", required=True, help="mask image file, the size of --image (white = repaint)")
    if name == "edit":
        sub.add_argument("--source-prompt", required=True, help="a description of the input image")
    sub.add_argument("--prompt", required=True, help="what to draw" + (" (the edited image)" if name == "edit" else ""))
    if name != "edit":
        sub.add_argument("--negative-prompt", help="what to steer away from (default: none)")
        sub.add_argument("--prompt-weighting", choices=("compel", "a1111"),
                         help="read weights from the prompt text: compel's syntax (word+, (words)1.3) or "
                              "AUTOMATIC1111's ((word:1.3), [word], prompts past 75 tokens in chunks) "
                              "(default: none, the text as it is)")
    sub.add_argument("--steps", type=int, default=25, help="number of denoising steps (num_inference_steps)")
    sub.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1: no guidance)")
    if name == "img2img":
        sub.add_argument("--strength", type=float, default=0.8, help="how far to noise --image, in [0, 1]")
    if name == "edit":
        sub.add_argument("--start-step", type=int, default=10,
                         help="step of the inverted trajectory to resample from, in [0, --steps - 1]; "
                              "0 redraws from pure inverted noise, higher keeps more of --image")
    if name != "edit":
        sub.add_argument("--scheduler", "--sampler", type=sampler_name, metavar="NAME",
                         help="sampler by the name A1111 and ComfyUI use (default: the model's own): "
                              f"{', '.join(SAMPLERS)}; add Karras, Exponential or Beta for that sigma spacing, "
                              "e.g. 'DPM++ 2M Karras' (case, spaces and hyphens do not matter)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the noise, an integer in [0, 2**64)")
    if name == "generate":
        sub.add_argument("--control-image", help="condition image for a ControlNet (an outline, edge, depth or pose "
                                                 "map; the output takes its size unless --height/--width are given); "
                                                 "the built-in model's outline ControlNet draws the shape inside a "
                                                 "32x32 white-on-black outline")
        sub.add_argument("--controlnet", help="ControlNet folder or single-file .safetensors for --control-image "
                                              "(default with the built-in model: its outline ControlNet)")
        sub.add_argument("--control-scale", type=float, default=1.0,
                         help="weight of the ControlNet's residuals (controlnet_conditioning_scale; 0: no control)")
    if name in ("generate", "inpaint"):
        sub.add_argument("--height", type=int, help="image height, a positive multiple of 8 (default: the model's)")
        sub.add_argument("--width", type=int, help="image width, a positive multiple of 8 (default: the model's)")
    sub.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="a LoRA .safetensors file (diffusers/peft, kohya or attention-processor layout) or a "
                          "folder holding pytorch_lora_weights.safetensors, with its weight (default 1); "
                          "repeat the flag for several (each is an adapter named after its file)")
    sub.add_argument("--attention", choices=ATTENTION_BACKENDS,
                     help="attention kernel for every model: sdpa (fused), math (the formula), chunked (query "
                          "slices, bounded memory) (default: minidiff.ops' default, sdpa)")
    sub.add_argument("--vae-tiling", action="store_true", help="decode (and encode) in tiles to bound VAE memory")
    sub.add_argument("--output", default=f"{name}.png",
                     help=f"image file to write ({', '.join(IMAGE_FORMATS)}); its folder is created if missing")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="minidiff", description=__doc__, epilog=f"Files: {OVERWRITE_RULE}.")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, (summary, description) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter,
                                  epilog=f"Files: {OVERWRITE_RULE}; images are written atomically.")
        add_sampling_arguments(sub, name)
    from minidiff.training.config import add_arguments

    train = commands.add_parser("train", help="train or fine-tune a diffusion model", formatter_class=HelpFormatter,
                                description="Train or fine-tune a UNet on an image folder (or the built-in shapes), "
                                            "or teach a Stable Diffusion model a concept from a few images "
                                            "(--method lora, dreambooth, textual-inversion), or train a ControlNet "
                                            "on images paired with condition images (--method controlnet); the "
                                            "built-in model by default, writing resumable checkpoints to "
                                            "--output-dir.")
    add_arguments(train)
    return parser.parse_args(argv)


# ---- checks made before any model is loaded -----------------------------------------------------------------------
def check_arguments(args: argparse.Namespace) -> None:
    """Ranges of the numeric flags, each error naming the flag and what is accepted."""
    if args.steps < 1:
        raise ValueError(f"--steps (num_inference_steps) must be an integer >= 1, got {args.steps}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    if hasattr(args, "strength") and not 0.0 <= args.strength <= 1.0:
        raise ValueError(f"--strength must be in [0, 1], got {args.strength}")
    if hasattr(args, "start_step") and not 0 <= args.start_step < args.steps:
        raise ValueError(f"--start-step must be in [0, {args.steps - 1}] (below --steps {args.steps}), "
                         f"got {args.start_step}")
    if hasattr(args, "seed") and not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed must be an integer in [0, 2**64), got {args.seed}")
    for flag in ("height", "width"):
        value = getattr(args, flag, None)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--height and --width must be positive multiples of 8, got --{flag} {value}")
    if getattr(args, "controlnet", None) and not args.control_image:
        raise ValueError(f"--controlnet {args.controlnet} needs --control-image: the condition image it reads")
    if hasattr(args, "control_scale") and not math.isfinite(args.control_scale):
        raise ValueError(f"--control-scale must be a finite number, got {args.control_scale}")


def split_lora_flag(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a path that itself exists is taken whole (it may contain ':')."""
    path, colon, scale = value.rpartition(":")
    if not colon or os.path.exists(value):
        return value, 1.0
    try:
        weight = float(scale)
    except ValueError:
        raise ValueError(f"--lora {value}: {scale!r} after the last ':' is not a number; use PATH or PATH:SCALE, "
                         "e.g. --lora style.safetensors:0.8") from None
    if not math.isfinite(weight):
        raise ValueError(f"--lora {value}: the scale must be a finite number, got {scale}")
    return path, weight


def check_loras(values: list[str]) -> list[tuple[str, str, float]]:
    """(adapter name, path, scale) per --lora, each file read and checked (layout, pickles refused) before any
    model is loaded; the name is the file's (or folder's) name, made unique."""
    from minidiff.adapters.lora_formats import detect_format, read_lora_file

    loras, names = [], set()
    for value in values:
        path, scale = split_lora_flag(value)
        try:
            tensors, _, resolved = read_lora_file(path)
            detect_format(list(tensors), f"LoRA file {resolved}")
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"--lora {value}: {error}") from None
        stem = os.path.basename(os.path.normpath(path)).removesuffix(".safetensors").replace(".", "_") or "lora"
        name, number = stem, 2
        while name in names:
            name, number = f"{stem}_{number}", number + 1
        names.add(name)
        loras.append((name, path, scale))
    return loras


def load_loras(pipe, loras: list[tuple[str, str, float]]) -> None:
    """Each --lora file as its own adapter, all active with their scales as adapter weights."""
    for name, path, _ in loras:
        pipe.load_lora_weights(path, adapter_name=name)
    if loras:
        pipe.set_adapters([name for name, _, _ in loras], [scale for _, _, scale in loras])


def input_files(args: argparse.Namespace) -> dict[str, str]:
    """``{flag: path}`` of the command's input images."""
    given = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in ("--image", "--mask", "--control-image")}
    return {flag: path for flag, path in given.items() if path}


def same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_output(path: str, inputs: dict[str, str], overwrite: bool) -> None:
    """Refuse an --output that cannot be written or must not be: wrong extension, a folder, an input, an existing
    file (without --overwrite), under a file, or in a read-only folder."""
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a folder; name an image file, e.g. {os.path.join(path, 'image.png')}")
    extension = os.path.splitext(path)[1].lower()
    if extension not in IMAGE_FORMATS:
        raise ValueError(f"--output {path}: cannot write an image with the extension {extension or '(none)'}; "
                         f"use one of {', '.join(IMAGE_FORMATS)}")
    for flag, input_path in inputs.items():
        if same_file(path, input_path):
            raise ValueError(f"--output {path} is the {flag} file; choose another --output so the input is kept")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise ValueError(f"--output {path} exists and is not a regular file; choose another --output")
        if not overwrite:
            raise ValueError(f"--output {path} already exists; pass --overwrite to replace it, or choose another "
                             "--output")
    folder = os.path.dirname(os.path.realpath(path))  # where save_image writes (through a symlinked --output)
    while not os.path.exists(folder):  # the nearest existing folder: the missing ones are created when saving
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"--output {path}: {folder} is a file, not a folder; choose another --output")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: the folder {folder} is not writable; choose another --output")


# ---- running ------------------------------------------------------------------------------------------------------
def load_controlnet(path: str | None, model: str | None):
    """--controlnet (a folder or an original .safetensors file), or with the built-in model its outline
    ControlNet."""
    from minidiff.models.controlnet import ControlNetModel

    if path is None:
        if model is not None:
            raise ValueError(f"--control-image with --model {model} needs --controlnet: a ControlNet trained for that "
                             "model (the built-in outline ControlNet fits the built-in model only)")
        from minidiff.builtin import builtin_controlnet_folder

        return ControlNetModel.from_pretrained(builtin_controlnet_folder())
    if not os.path.exists(path):
        raise FileNotFoundError(f"--controlnet {path} does not exist; pass a ControlNet folder (config.json + "
                                "weights) or an original .safetensors file")
    return load_from(ControlNetModel, path)


def load_pipeline(pipeline_class, model: str | None):
    """A diffusers folder, a single-file checkpoint, or (no --model) the built-in model."""
    if model is None:
        from minidiff.builtin import builtin_model_folder

        model = builtin_model_folder()
    return load_from(pipeline_class, model)


def load_from(model_class, path: str):
    """``model_class`` (a pipeline or a model) from a diffusers folder, a single-file checkpoint, or a hub id."""
    if os.path.isfile(path):
        if not path.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            raise ValueError(f"{path} is neither a diffusers folder nor a .safetensors/.ckpt checkpoint")
        return model_class.from_single_file(path)
    return model_class.from_pretrained(path)  # a folder, or a hub id: resolved from the local cache or a clear error


def run_pipeline(pipe, args: argparse.Namespace, images: dict[str, PIL.Image.Image]):
    """Call the command's pipeline with exactly the flags that command offers."""
    if args.command == "edit":
        return pipe.edit(images["--image"], args.source_prompt, args.prompt, num_inference_steps=args.steps,
                         start_step=args.start_step, guidance_scale=args.guidance)
    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed))
    if args.prompt_weighting:  # an SD 1.x/2.x option (refused for SDXL models before loading)
        kwargs.update(prompt_weighting=args.prompt_weighting)
    if args.command in ("generate", "inpaint"):
        kwargs.update(height=args.height, width=args.width)
    if "--control-image" in images:
        kwargs.update(image=images["--control-image"], controlnet_conditioning_scale=args.control_scale)
    if args.command == "img2img":
        kwargs.update(image=images["--image"], strength=args.strength)
    if args.command == "inpaint":
        kwargs.update(image=images["--image"], mask_image=images["--mask"])
    return pipe(**kwargs)


def sample(args: argparse.Namespace, timings: list[tuple[str, float]]) -> None:
    """Check every flag and file, then load, sample and save, timing each stage."""
    from minidiff import ops, pipelines, schedulers
    from minidiff.loading.single_file import is_sdxl_model
    from minidiff.pipelines.images import open_image

    check_arguments(args)
    images = {flag: open_image(path, f"{flag} {path}") for flag, path in input_files(args).items()}
    check_output(args.output, input_files(args), args.overwrite)
    loras = check_loras(args.lora)
    pipeline_class = {
        "generate": pipelines.StableDiffusionPipeline,
        "img2img": pipelines.StableDiffusionImg2ImgPipeline,
        "inpaint": pipelines.StableDiffusionInpaintPipeline,
        "edit": pipelines.StableDiffusionDDIMInversionPipeline,
    }[args.command]
    if args.model is not None and is_sdxl_model(args.model):  # an SDXL folder or file: the command's SDXL pipeline
        if getattr(args, "control_image", None):
            raise ValueError(f"--model {args.model} is an SDXL model; --control-image runs SD 1.x/2.x ControlNets "
                             "only")
        if args.command == "edit":
            raise ValueError(f"--model {args.model} is an SDXL model; edit (DDIM inversion) runs SD 1.x/2.x models "
                             "only: use img2img (with --strength) to redraw an image with SDXL")
        if args.prompt_weighting:
            raise ValueError(f"--prompt-weighting is not supported for SDXL models (--model {args.model}); leave it "
                             "out to use the prompt text as it is")
        pipeline_class = {"generate": pipelines.StableDiffusionXLPipeline,
                          "img2img": pipelines.StableDiffusionXLImg2ImgPipeline,
                          "inpaint": pipelines.StableDiffusionXLInpaintPipeline}[args.command]
    with stage("load", timings):
        pipe = load_pipeline(pipeline_class, args.model)
        if getattr(args, "control_image", None):  # the model's components with the ControlNet beside its UNet
            controlnet = load_controlnet(args.controlnet, args.model)
            pipe = pipelines.StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
        load_loras(pipe, loras)
        if getattr(args, "scheduler", None):
            pipe.scheduler = schedulers.by_name(args.scheduler, pipe.scheduler.config)
        if args.vae_tiling:
            pipe.enable_vae_tiling()
    attention = ops.use_backend("attention", args.attention) if args.attention else nullcontext()
    with stage("sample", timings), attention:
        result = run_pipeline(pipe, args, images)
    with stage("save", timings):
        output = os.path.realpath(args.output)  # through a symlink, onto its target
        os.makedirs(os.path.dirname(output), exist_ok=True)
        save_image(result.images[0], output)


def main(argv: list[str] | None = None) -> int:
    """``minidiff ...``: bad flags, files or models end with one line ``minidiff: error: ...`` and exit status 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "train":
        from minidiff.training import main as train_main

        return train_main(args)
    timings: list[tuple[str, float]] = []
    try:
        sample(args, timings)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"minidiff: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    for name, seconds in timings:
        print(f"  {name:<7}{seconds:7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
