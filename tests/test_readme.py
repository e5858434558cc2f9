"""The README is code too: every code name it mentions exists, and every Python snippet in it runs.

What counts as a code name (the extraction rules; README.md is read as markdown):
- *inline code* is every `...` span outside fenced blocks; *python code* is every ```python block with its string
  literals removed (its comments stay: they name API too); *bash lines* are the lines of ```bash blocks.
1. Dotted names (``DOTTED``: ``a.b`` or longer, not preceded by a dot) in inline and python code resolve by their
   first part: ``minidiff`` (import the longest module prefix, then getattr the rest), a public minidiff name,
   ``ops`` (= minidiff.ops), a README example variable (``readme_variables``: e.g. ``pipe`` is the loaded pipeline),
   or any other importable module (``torch``, ``copy``, ``scripts``...). A name ending in a file extension is a path.
2. Paths: inline-code words containing ``/`` or ending in a file extension, and the targets of markdown links and
   images (``![...](docs/x.png)``), exist relative to the repo root; a bare file name (``settings.py``) exists
   somewhere in the repo.
3. Commands: ``make T`` (inline or bash lines) is a Makefile target; ``-m M`` an importable module;
   ``minidiff S --flag`` a subcommand whose ``--help`` shows ``--flag``; a lone ``--flag`` an option of some minidiff
   subcommand or of ``python -m benchmarks``; ``python -m benchmarks`` / ``python script.py`` flags appear in that
   source. (The CLI examples in bash blocks run in tests/test_cli.py.)
4. Identifiers: a one-word inline span or a CamelCase word in inline code or python code (comments aside) is a
   minidiff name (public, or in minidiff.models.modeling, minidiff.ops or minidiff.training), a pipeline component,
   an attention backend or a minidiff subcommand.
5. ``from minidiff... import a, b`` lines in python code: each name is importable.
Words that name something outside this project, placeholders and outputs are listed in NOT_CHECKED with the reason.

The snippets run offline on the built-in model, as a user pasting them in order would (``pipe`` is the pipeline the
first ones load): the placeholder folders and checkpoint files become the built-in model folder, a tiny pixel-space
folder and a single file saved from the built-in model; placeholder inputs (``init_image``, ``mask``, ``image``,
``my_attention``) are given; step counts are cut to 2 (``start_step`` to 1). Outputs go to tmp_path.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import copy
import functools
import importlib
import importlib.util
import io
import os
import re
from dataclasses import dataclass, fields, is_dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

import minidiff
from minidiff import ops
from minidiff.builtin import builtin_model_folder, load_builtin_pipeline
from minidiff.loading.single_file import save_single_file
from minidiff.pipelines.inversion import InversionOutput
from tests.tiny_components import tiny_sdxl_components
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: one torch thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

DOTTED = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
CAMEL = re.compile(r"(?<![\w.])[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*")
FILE_EXTENSIONS = ("py", "md", "png", "json", "jsonl", "safetensors", "ckpt", "gz", "txt", "toml")
PATH_WORD = re.compile(r"(?:[\w.-]+/)+[\w.-]*|[\w-][\w.-]*\.(?:" + "|".join(FILE_EXTENSIONS) + ")")
LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")  # ![alt](docs/x.png), [text](path)
ONE_WORD = re.compile(r"[A-Za-z_]\w*")

NOT_CHECKED = {
    "diffusers": "diffusers' own API; importing its pipelines takes ~14 s (parity/test_builtin_model.py uses it)",
    "to_k.bias": "a state_dict key suffix, not a Python name",
    "np": "an output_type value",
    "quad": "scipy.integrate.quad, named in prose",
    "load_inline": "torch.utils.cpp_extension.load_inline, named in prose",
    "True": "a Python constant", "False": "a Python constant", "None": "a Python constant",
    ".venv/bin/python": "created by make on first use", "generated.png": "written by `make generate`",
    "parity-report.md": "written by `make report`", "runs/shapes": "an output folder of the training script",
    "-k": "a pytest flag passed through by `python -m parity`",
    "emb_params": "the tensor's key in A1111 embedding files", "lora_scale": "an argument of pipe.fuse_lora",
    "init_image": "a user variable in the examples", "mask": "a user variable in the examples",
    "name.txt": "a caption file's name pattern (beside name.png)",
    "pytorch_lora_weights.safetensors": "written by `minidiff train --method lora`",
    "learned_embeds.safetensors": "written by `minidiff train --method textual-inversion`",
    "train_text_to_image_lora.py": "a diffusers example script", "train_dreambooth.py": "a diffusers example script",
    "textual_inversion.py": "a diffusers example script", "train_controlnet.py": "a diffusers example script",
    "metadata.jsonl": "the user's image folder's captions and condition images (Hugging Face imagefolder)",
}


@dataclass(frozen=True)
class Name:
    kind: str  # dotted, path, make, module, command, flag, identifier, import
    text: str
    command: str = ""  # for flags: the command they belong to ("" = any minidiff subcommand or benchmarks)


# ---- reading the README ------------------------------------------------------------------------------------------
def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def inline_spans(text: str) -> list[str]:
    outside = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", outside)]


def without_strings(code: str) -> str:
    return re.sub(r"\"[^\"\n]*\"|'[^'\n]*'", '""', code)


def python_snippets(text: str) -> list[str]:
    return [body for language, body in fenced_blocks(text) if language == "python"]


def names_in_readme(text: str) -> list[Name]:
    """Every code name of the README, by the rules in the module docstring."""
    found: list[Name] = []
    codes = [without_strings(code) for code in python_snippets(text)]
    for span in inline_spans(text):
        found += names_in_span(span)
    found += [Name("path", target) for target in LINK_TARGET.findall(text) if "://" not in target]
    for code in codes:
        found += [Name("dotted", d) for d in DOTTED.findall(code) if d.rsplit(".", 1)[-1] not in FILE_EXTENSIONS]
        found += [Name("identifier", c) for c in CAMEL.findall(re.sub(r"#.*", "", code))]
        for module, imported in re.findall(r"^from (minidiff[\w.]*) import (.+)$", code, flags=re.M):
            found += [Name("import", f"{module}:{n.strip()}") for n in imported.split(",")]
    for language, body in fenced_blocks(text):
        if language == "bash":
            found += [Name("make", line.split()[1]) for line in body.splitlines() if line.startswith("make ")]
    return list(dict.fromkeys(found))


def names_in_span(span: str) -> list[Name]:
    words = span.split()
    found = [Name("path", w.rstrip(".,;:)")) for w in words if PATH_WORD.fullmatch(w.rstrip(".,;:)"))]
    found += [Name("dotted", d) for d in DOTTED.findall(span) if d.rsplit(".", 1)[-1] not in FILE_EXTENSIONS]
    found += [Name("identifier", c) for c in CAMEL.findall(span)]
    if ONE_WORD.fullmatch(span):
        found.append(Name("identifier", span))
    if span.startswith("--") and len(words) == 1:
        found.append(Name("flag", span))
    if "make" in words:
        found.append(Name("make", words[words.index("make") + 1]))
    if "-m" in words:
        found.append(Name("module", words[words.index("-m") + 1]))
    command = command_of(words)
    if command:
        found += [Name("command", command)] if command.startswith("minidiff ") else []
        found += [Name("flag", w, command) for w in words if w.startswith("--")]
    return found


def command_of(words: list[str]) -> str:
    """``minidiff S``, ``python -m benchmarks`` or ``python path.py`` for a span that runs one, else ""."""
    if len(words) >= 2 and words[0] == "minidiff" and not words[1].startswith("-"):
        return f"minidiff {words[1]}"
    if len(words) >= 3 and words[:3] == ["python", "-m", "benchmarks"]:
        return "python -m benchmarks"
    if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
        return f"python {words[1]}"
    return ""


# ---- checking one name -------------------------------------------------------------------------------------------
def has_attribute(obj, name: str) -> bool:
    """An attribute, or a dataclass field (fields without a default are not class attributes)."""
    return hasattr(obj, name) or (is_dataclass(obj) and name in {f.name for f in fields(obj)})


def resolve_dotted(text: str, variables: dict):
    """The object ``text`` names, or raise (ImportError / AttributeError / KeyError) saying where it stops."""
    parts = text.split(".")
    if parts[0] in variables:
        obj, rest = variables[parts[0]], parts[1:]
    elif parts[0] == "ops":
        obj, rest = ops, parts[1:]
    elif parts[0] in minidiff.__all__:
        obj, rest = getattr(minidiff, parts[0]), parts[1:]
    else:
        obj, rest = longest_module(parts)
    for part in rest:
        if not has_attribute(obj, part):
            raise AttributeError(f"{obj!r} has no attribute {part!r}")
        obj = getattr(obj, part, None)
    return obj


def longest_module(parts: list[str]):
    """Import the longest importable prefix of ``parts``; return it and the parts left to getattr."""
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            if importlib.util.find_spec(name) is not None:
                return importlib.import_module(name), parts[end:]
        except ModuleNotFoundError:
            pass
    raise ImportError(f"no module {parts[0]!r} (and not a README variable)")


def identifier_exists(word: str) -> bool:
    from minidiff import training
    from minidiff.models import modeling

    return (
        any(hasattr(module, word) for module in (minidiff, modeling, ops, training))
        or word in minidiff.StableDiffusionPipeline.component_names
        or word in ops.available_backends("attention")
        or (word.islower() and bool(minidiff_help(word)))  # a subcommand: `edit`
    )


@functools.lru_cache(maxsize=None)
def repo_files() -> frozenset[str]:
    names = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [s for s in subfolders if not s.startswith(".") and s != "__pycache__"]
        names.update(files)
    return frozenset(names)


def path_exists(path: str) -> bool:
    if "/" in path:
        return os.path.exists(os.path.join(ROOT, path))
    return path in repo_files()


def make_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as handle:
        return set(re.findall(r"^([\w-]+):", handle.read(), flags=re.M))


@functools.lru_cache(maxsize=None)
def minidiff_help(subcommand: str) -> str:
    """What ``minidiff SUBCOMMAND --help`` prints (in-process), or "" if there is no such subcommand."""
    from minidiff import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exit:
        cli.parse_args([subcommand, "--help"])
    return out.getvalue() if exit.value.code == 0 else ""


def source_of(command: str) -> str:
    path = "benchmarks/__main__.py" if command == "python -m benchmarks" else command.split()[1]
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def flag_exists(flag: str, command: str) -> bool:
    if command.startswith("minidiff "):
        return flag in minidiff_help(command.split()[1])
    if command:
        return f'"{flag}"' in source_of(command)
    subcommands = ("generate", "img2img", "inpaint", "edit", "train")
    return any(flag in minidiff_help(s) for s in subcommands) or f'"{flag}"' in source_of("python -m benchmarks")


def problem(name: Name, variables: dict) -> str | None:
    """None if ``name`` exists, else what is wrong."""
    try:
        if name.kind == "dotted":
            resolve_dotted(name.text, variables)
        elif name.kind == "import":
            module, attribute = name.text.split(":")
            getattr(importlib.import_module(module), attribute)
        elif name.kind == "path" and not path_exists(name.text):
            return f"no file or folder {name.text!r} in the repository"
        elif name.kind == "make" and name.text not in make_targets():
            return f"no Makefile target {name.text!r}"
        elif name.kind == "module" and importlib.util.find_spec(name.text) is None:
            return f"no module {name.text!r}"
        elif name.kind == "command" and not minidiff_help(name.text.split()[1]):
            return f"{name.text!r} is not a minidiff subcommand"
        elif name.kind == "flag" and not flag_exists(name.text, name.command):
            return f"{name.command or 'no command'} has no option {name.text}"
        elif name.kind == "identifier" and not identifier_exists(name.text):
            return f"{name.text!r} is not a minidiff name, pipeline component, attention backend or subcommand"
    except (ImportError, AttributeError) as error:
        return f"{name.text}: {error}"
    return None


def checked(names: list[Name]) -> list[Name]:
    return [n for n in names if n.text not in NOT_CHECKED and n.text.split(".")[0] not in NOT_CHECKED]


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def readme() -> str:
    with open(README, encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def builtin_pipe():
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ddpm_pipeline():
    torch.manual_seed(0)
    unet = minidiff.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return minidiff.DDPMPipeline(unet=unet.eval(), scheduler=minidiff.DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture(scope="module")
def readme_variables(builtin_pipe) -> dict:
    """The objects the README's example variables stand for (for rule 1)."""
    from minidiff.pipelines import StableDiffusionDDIMInversionPipeline as Inversion

    return {"pipe": builtin_pipe, "unet": builtin_pipe.unet, "editor": Inversion(**builtin_pipe.components),
            "inverted": InversionOutput, "ddpm": tiny_ddpm_pipeline(),
            "ddim": minidiff.DDIMPipeline(**tiny_ddpm_pipeline().components),
            "turbo": minidiff.StableDiffusionXLPipeline(**tiny_sdxl_components()), "image": PIL.Image.new("RGB", (8, 8))}


# ---- rule tests --------------------------------------------------------------------------------------------------
def test_every_code_name_in_the_readme_exists(readme, readme_variables):
    names = checked(names_in_readme(readme))
    problems = [p for p in (problem(n, readme_variables) for n in names) if p]
    assert not problems, "README names that do not exist:\n" + "\n".join(problems)
    kinds = {n.kind for n in names}
    assert len(names) >= 60 and kinds == {"dotted", "path", "make", "module", "command", "flag", "identifier", "import"}


def test_the_checker_catches_wrong_names(readme_variables):
    text = (
        "Use `minidiff.pipelines.guidance.loss_guided_step`, `pipe.no_such_method`, `docs/missing.png`,\n"
        "`make deploy`, `python -m scripts.builtin.nothing`, `minidiff paint --prompt x`,\n"
        "`minidiff generate --colour`, "
        "`--no-such-flag`, `StableDiffusion3Pipeline`.\n```python\nfrom minidiff import NoSuchPipeline\n```\n"
    )
    found = [p for p in (problem(n, readme_variables) for n in checked(names_in_readme(text))) if p]
    for fragment in ("loss_guided_step", "no_such_method", "docs/missing.png", "'deploy'", "scripts.builtin.nothing",
                     "'minidiff paint'", "--colour", "--no-such-flag", "StableDiffusion3Pipeline", "NoSuchPipeline"):
        assert any(fragment in p for p in found), f"{fragment} not reported; reported: {found}"


def test_the_extraction_sees_each_kind_of_name():
    text = "`minidiff.builtin.vocabulary()` `tests/test_pipelines.py` `settings.py` `ModelMixin` `sdpa`\n"
    texts = {(n.kind, n.text) for n in names_in_readme(text)}
    assert {("dotted", "minidiff.builtin.vocabulary"), ("path", "tests/test_pipelines.py"), ("path", "settings.py"),
            ("identifier", "ModelMixin"), ("identifier", "sdpa")} <= texts


# ---- running the snippets ----------------------------------------------------------------------------------------
NOT_RUNNABLE: dict[str, str] = {}  # a distinctive line of the snippet -> why it cannot run offline here

STEP_COUNTS = {r"num_inference_steps=\d+": "num_inference_steps=2", r"start_step=\d+": "start_step=1"}


def offline(code: str, folders: dict[str, str], single_file: str) -> str:
    """The snippet with placeholder folders, checkpoint files and step counts replaced (see module docstring)."""
    for placeholder, folder in folders.items():
        code = code.replace(f'"{placeholder}"', repr(folder))
    code = re.sub(r'(load_single_file|from_single_file)\("[^"]+\.safetensors"',
                  lambda m: f"{m.group(1)}({single_file!r}, config={builtin_model_folder()!r}", code)
    for pattern, replacement in STEP_COUNTS.items():
        code = re.sub(pattern, replacement, code)
    return code


def scene() -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A red circle on blue (32x32, the built-in model's size) and a mask of its left half."""
    image = PIL.Image.new("RGB", (32, 32), (0, 0, 255))
    PIL.ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=(255, 0, 0))
    mask = PIL.Image.new("L", (32, 32), 0)
    PIL.ImageDraw.Draw(mask).rectangle((0, 0, 15, 31), fill=255)
    return image, mask


def my_attention(q, k, v, *, scale=None, upcast=False, mask=None):
    """A user kernel: the attention formula written out."""
    return ops.math_attention(q, k, v, scale=scale, upcast=upcast, mask=mask)


def assigned_names(code: str) -> set[str]:
    tree = ast.parse(code)
    return {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}


def pil_images(values) -> list[PIL.Image.Image]:
    images = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        images += [item for item in items if isinstance(item, PIL.Image.Image)]
    return images


@contextlib.contextmanager
def restored_attention_choices(models):
    """A snippet may register a backend, change the default or slice a shared model's attention: undo it."""
    before, default = set(ops.available_backends("attention")), ops.current_backend("attention")
    try:
        yield
    finally:
        for name in set(ops.available_backends("attention")) - before:
            ops.unregister_backend("attention", name)
        ops.set_backend("attention", default)
        for model in models:
            model.disable_attention_slicing()


def runnable_snippets() -> list[str]:
    with open(README, encoding="utf-8") as handle:
        return [code for code in python_snippets(handle.read()) if not any(key in code for key in NOT_RUNNABLE)]


def test_every_snippet_is_run_or_listed(readme):
    snippets = python_snippets(readme)
    listed = [key for key in NOT_RUNNABLE if sum(key in s for s in snippets) == 1]
    assert listed == list(NOT_RUNNABLE), "each NOT_RUNNABLE key must name exactly one README snippet"
    assert len(runnable_snippets()) + len(NOT_RUNNABLE) == len(snippets) >= 7


@pytest.fixture(scope="module")
def placeholder_files(builtin_pipe, tmp_path_factory) -> tuple[dict[str, str], str]:
    """The folders that stand for the README's placeholder folders (the SDXL ones: tiny SDXL pipelines), and a tiny
    single-file checkpoint."""
    folder = tmp_path_factory.mktemp("readme_files")
    single_file = str(folder / "tiny.safetensors")
    save_single_file(single_file, unet=builtin_pipe.unet, vae=builtin_pipe.vae, text_encoder=builtin_pipe.text_encoder)
    tiny_ddpm_pipeline().save_pretrained(folder / "ddpm")
    minidiff.StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder / "sdxl")
    minidiff.StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_components(refiner=True, seed=1),
                                              requires_aesthetics_score=True).save_pretrained(folder / "refiner")
    for name, pipeline_class, channels in (("pix2pix", minidiff.StableDiffusionInstructPix2PixPipeline, 8),
                                           ("depth", minidiff.StableDiffusionDepth2ImgPipeline, 5)):
        torch.manual_seed(0)  # a random UNet with the extra input channels beside the built-in components
        unet = minidiff.UNet2DConditionModel.from_config(builtin_pipe.unet.config, in_channels=channels)
        pipeline_class(**{**builtin_pipe.components, "unet": unet}).save_pretrained(folder / name)
    folders = {"path/to/stable-diffusion-v1-5": builtin_model_folder(), "path/to/sd-folder": builtin_model_folder(),
               "path/to/instruct-pix2pix": str(folder / "pix2pix"), "path/to/sd-2-depth": str(folder / "depth"),
               "runs/shapes": str(folder / "ddpm"), "path/to/sdxl-base": str(folder / "sdxl"),
               "path/to/sdxl-turbo": str(folder / "sdxl"), "path/to/sdxl-refiner": str(folder / "refiner")}
    return folders, single_file


def snippet_id(code: str) -> str:
    """The snippet's first ``from minidiff... import`` line, e.g. ``minidiff import DDPMPipeline, DDIMPipeline``
    (or, for a snippet that imports nothing from minidiff, its first line of code)."""
    lines = [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
    return next((line[5:] for line in lines if line.startswith("from minidiff")), lines[0])


@pytest.mark.parametrize("code", runnable_snippets(), ids=snippet_id)
def test_readme_snippet_runs_offline(code, builtin_pipe, placeholder_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the snippet writes land here
    folders, single_file = placeholder_files
    image, mask = scene()
    # `pipe` as the first snippets load it: the built-in models (shared) with a scheduler of its own
    components = {**builtin_pipe.components, "scheduler": copy.deepcopy(builtin_pipe.scheduler)}
    pipe = minidiff.StableDiffusionPipeline(**components)
    namespace = {"pipe": pipe, "init_image": image, "image": image, "mask": mask, "my_attention": my_attention}
    models = (pipe.unet, pipe.vae, pipe.text_encoder)
    with restored_attention_choices(models), contextlib.redirect_stderr(io.StringIO()):  # stderr: progress bars
        exec(compile(offline(code, folders, single_file), "README snippet", "exec"), namespace)
    assigned = assigned_names(code)
    assert assigned and assigned <= set(namespace)
    for picture in pil_images(namespace[name] for name in assigned):
        pixels = np.asarray(picture)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.min() < pixels.max()  # not blank


def test_deep_copied_pipelines_sample_in_parallel_threads(builtin_pipe):
    """The README's advice for threads: each thread samples with its own ``copy.deepcopy(pipe)``."""
    prompts = ["a red circle on a blue background", "a small yellow square in the top left"]

    def draw(pipe, prompt):
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=3, generator=generator, output_type="np").images

    alone = [draw(builtin_pipe, prompt) for prompt in prompts]
    copies = [copy.deepcopy(builtin_pipe) for _ in prompts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(draw, copies, prompts))
    for one, other in zip(alone, together):
        np.testing.assert_array_equal(one, other)
