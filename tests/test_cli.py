"""The command line: every flag works or is not offered, output files are never destroyed, bad flags and files stop
with one line before any model is loaded, every default is in --help, and the README's examples run as pasted.

A few cases run the real ``minidiff`` command in a subprocess (``python -m minidiff.cli``: ~3 s each for imports);
the rest call ``minidiff.cli.main`` in-process on the built-in model with few steps."""

from __future__ import annotations

import errno
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from minidiff import StableDiffusionPipeline, cli, ops
from minidiff.fileio import atomic_write
from tests.tiny_components import tiny_pipeline
from tests.training_fixtures import one_thread, subprocess_env  # noqa: F401  (one_thread: autouse fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle on a blue background"


def run_command(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The real ``minidiff`` command line, in a child process."""
    return subprocess.run([sys.executable, "-m", "minidiff.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**subprocess_env(), "TQDM_DISABLE": "1", "COLUMNS": "200"}, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(("minidiff: error:", "minidiff ")), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def write_png(path, colour=(200, 30, 30), size=(32, 32)) -> bytes:
    PIL.Image.new("RGB", size, colour).save(path)
    with open(path, "rb") as handle:
        return handle.read()


def read_bytes(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: the checks under test must stop the command before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag or file was refused")
    monkeypatch.setattr(cli, "load_pipeline", refuse)


@pytest.fixture
def files(tmp_path):
    """An input image, a mask and an existing output, with their bytes."""
    image, mask, existing = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "existing.png"
    mask_pixels = np.zeros((32, 32), np.uint8)
    mask_pixels[:, :16] = 255
    PIL.Image.fromarray(mask_pixels).save(mask)
    return dict(image=str(image), image_bytes=write_png(image), mask=str(mask), existing=str(existing),
                existing_bytes=write_png(existing, colour=(1, 2, 3)))


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_pipeline(StableDiffusionPipeline).save_pretrained(str(folder))
    return folder


# ---- the real command (subprocess) --------------------------------------------------------------------------------
def test_command_refuses_to_overwrite_an_existing_output(files):
    result = run_command("generate", "--prompt", PROMPT, "--output", files["existing"])
    assert_one_line_error(result, f"--output {files['existing']} already exists; pass --overwrite")
    assert read_bytes(files["existing"]) == files["existing_bytes"]


def test_command_refuses_an_output_that_is_its_own_input_even_with_overwrite(files):
    result = run_command("img2img", "--image", files["image"], "--output", files["image"], "--overwrite",
                         "--prompt", PROMPT)
    assert_one_line_error(result, "is the --image file; choose another --output")
    assert read_bytes(files["image"]) == files["image_bytes"]


def test_command_overwrite_replaces_the_output(files):
    result = run_command("generate", "--prompt", PROMPT, "--steps", "2", "--output", files["existing"], "--overwrite")
    assert result.returncode == 0, result.stderr
    assert f"wrote {files['existing']}" in result.stdout
    assert read_bytes(files["existing"]) != files["existing_bytes"]
    with PIL.Image.open(files["existing"]) as image:
        assert image.size == (32, 32)
    assert not [name for name in os.listdir(os.path.dirname(files["existing"])) if name.endswith(".tmp")]


def test_command_refuses_a_bad_extension_before_loading_the_model(tmp_path):
    result = run_command("generate", "--prompt", PROMPT, "--output", str(tmp_path / "x.txt"))
    assert_one_line_error(result, "cannot write an image with the extension .txt; use one of .png, .jpg")
    assert "wrote" not in result.stdout and not (tmp_path / "x.txt").exists()


@pytest.mark.slow  # also checked in-process below
def test_command_refuses_an_input_that_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    result = run_command("img2img", "--image", str(tmp_path / "notes.png"), "--prompt", PROMPT,
                         "--output", str(tmp_path / "out.png"))
    assert_one_line_error(result, f"--image {tmp_path / 'notes.png'} is not an image file")


def test_command_no_longer_offers_ignored_flags(tmp_path, files):
    result = run_command("img2img", "--image", files["image"], "--prompt", PROMPT, "--height", "64",
                         "--output", str(tmp_path / "out.png"))
    assert result.returncode == 2 and "unrecognized arguments: --height 64" in result.stderr


def test_command_reports_a_broken_model_folder_in_one_line(tmp_path, tiny_model_folder):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_folder, broken)
    (broken / "model_index.json").write_text("{not json")
    result = run_command("generate", "--model", str(broken), "--prompt", PROMPT, "--output", str(tmp_path / "o.png"))
    assert_one_line_error(result, "model_index.json")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow  # the flags are checked in-process below
def test_command_edit_runs_with_chunked_attention_and_vae_tiling(tmp_path, files):
    output = tmp_path / "edited.png"
    result = run_command("edit", "--image", files["image"], "--source-prompt", PROMPT, "--prompt",
                         "a yellow circle on a blue background", "--steps", "3", "--start-step", "1",
                         "--attention", "chunked", "--vae-tiling", "--output", str(output))
    assert result.returncode == 0, result.stderr
    with PIL.Image.open(output) as image:
        assert image.size == (32, 32)


# ---- help and flags (in-process) ----------------------------------------------------------------------------------
def test_top_level_help_lists_every_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    summaries = {**{name: summary for name, (summary, _) in cli.COMMANDS.items()}, "train": "train or fine-tune"}
    assert list(summaries) == ["generate", "img2img", "inpaint", "edit", "train"]
    for name, summary in summaries.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(summary)}", out, re.M), out
    assert "--overwrite" in out


def help_text(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping (argparse breaks lines at hyphens too)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces


@pytest.mark.parametrize("command, defaults", [
    ("generate", ["--steps STEPS number of denoising steps (num_inference_steps) (default: 25)", "(default: 7.5)",
                  "(default: 0)", "(default: generate.png)", "(default: the model's)", "(default: the model's own)",
                  "(default: the built-in model)", "(default: False)"]),
    ("img2img", ["(default: 25)", "(default: 7.5)", "(default: 0.8)", "(default: 0)", "(default: img2img.png)"]),
    ("inpaint", ["(default: 25)", "(default: 7.5)", "(default: 0)", "(default: inpaint.png)",
                 "(default: the model's)"]),
    ("edit", ["(default: 25)", "(default: 7.5)", "(default: 10)", "(default: edit.png)"]),
    ("train", ["(default: 1024)"]),
])
def test_every_subcommand_help_describes_it_and_shows_defaults(capsys, monkeypatch, command, defaults):
    text = help_text(capsys, monkeypatch, command)
    assert cli.COMMANDS.get(command, ("", "Train or fine-tune"))[-1].split(".")[0] in text
    for default in defaults:
        assert default in text, default


@pytest.mark.parametrize("command, flag", [
    ("img2img", ["--height", "64"]), ("img2img", ["--width", "64"]), ("edit", ["--negative-prompt", "blurry"]),
    ("edit", ["--seed", "1"]), ("edit", ["--scheduler", "ddim"]), ("edit", ["--height", "64"]),
])
def test_flags_a_command_would_ignore_are_not_offered(capsys, files, command, flag):
    extra = ["--source-prompt", PROMPT] if command == "edit" else []
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--image", files["image"], "--prompt", PROMPT, *extra, *flag])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


def run_in_process(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["generate", "--steps", "0"], "--steps (num_inference_steps) must be an integer >= 1, got 0"),
    (["generate", "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["generate", "--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["generate", "--height", "36"], "--height and --width must be positive multiples of 8, got --height 36"),
    (["generate", "--width", "0"], "positive multiples of 8, got --width 0"),
    (["inpaint", "--height", "-8", "--image", "{image}", "--mask", "{mask}"], "got --height -8"),
    (["generate", "--seed", "-1"], r"--seed must be an integer in [0, 2**64), got -1"),
    (["generate", "--seed", str(2**64)], r"--seed must be an integer in [0, 2**64)"),
    (["img2img", "--image", "{image}", "--strength", "1.5"], "--strength must be in [0, 1], got 1.5"),
    (["img2img", "--image", "{image}", "--strength", "nan"], "--strength must be in [0, 1], got nan"),
    (["edit", "--image", "{image}", "--source-prompt", "x", "--start-step", "25"],
     "--start-step must be in [0, 24] (below --steps 25), got 25"),
    (["edit", "--image", "{image}", "--source-prompt", "x", "--start-step", "-1"], "--start-step must be in [0, 24]"),
])
def test_out_of_range_flags_stop_before_loading(capsys, no_model, files, tmp_path, args, message):
    args = [a.format(**files) for a in args]
    code, err = run_in_process(capsys, *args, "--prompt", PROMPT, "--output", str(tmp_path / "o.png"))
    assert code == 2 and err.startswith("minidiff: error: --") and message in err, err


# ---- input files --------------------------------------------------------------------------------------------------
def truncated_png(path) -> None:
    full = path.parent / "full.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(full)
    path.write_bytes(full.read_bytes()[:120])


@pytest.mark.parametrize("flag", ["--image", "--mask"])
@pytest.mark.parametrize("make, message", [
    (lambda path: None, "{flag} {path}: no such file"),
    (lambda path: path.mkdir(), "{flag} {path} is a folder; pass an image file"),
    (lambda path: path.write_text("hello"), "{flag} {path} is not an image file Pillow can read"),
    (truncated_png, "{flag} {path} cannot be read: image file is truncated"),
])
def test_bad_input_files_stop_before_loading(capsys, no_model, files, tmp_path, flag, make, message):
    bad = tmp_path / "bad.png"
    make(bad)
    inputs = {"--image": files["image"], "--mask": files["mask"], flag: str(bad)}
    code, err = run_in_process(capsys, "inpaint", "--image", inputs["--image"], "--mask", inputs["--mask"],
                               "--prompt", PROMPT, "--output", str(tmp_path / "o.png"))
    assert code == 2 and "minidiff: error: " + message.format(flag=flag, path=bad) in err


def test_an_unreadable_input_stops_before_loading(capsys, monkeypatch, no_model, files, tmp_path):
    def denied(path, *args, **kwargs):  # what open() raises for a file without read permission (root reads any)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(PIL.Image, "open", denied)
    code, err = run_in_process(capsys, "img2img", "--image", files["image"], "--prompt", PROMPT,
                               "--output", str(tmp_path / "o.png"))
    assert code == 2 and f"--image {files['image']} cannot be read: permission denied" in err


# ---- the output file ----------------------------------------------------------------------------------------------
def output_cases(tmp_path, files) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "a-file.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    os.link(files["image"], tmp_path / "hard-link.png")
    os.symlink(files["mask"], tmp_path / "sym-link.png")
    os.mkfifo(tmp_path / "fifo.png")
    return {
        "existing": ([files["existing"]], "already exists; pass --overwrite to replace it, or choose another --output"),
        "same as --image": ([files["image"], "--overwrite"], "is the --image file; choose another --output"),
        "same as --mask": ([files["mask"], "--overwrite"], "is the --mask file"),
        "hard link to --image": ([str(tmp_path / "hard-link.png"), "--overwrite"], "is the --image file"),
        "symlink to --mask": ([str(tmp_path / "sym-link.png"), "--overwrite"], "is the --mask file"),
        "no extension": ([str(tmp_path / "out")], "cannot write an image with the extension (none)"),
        "text extension": ([str(tmp_path / "x.txt")], "extension .txt; use one of .png, .jpg, .jpeg, .webp"),
        "under a file": ([str(tmp_path / "a-file.png" / "b.png")],
                         f"{tmp_path / 'a-file.png'} is a file, not a folder"),
        "under a file, deeper": ([str(tmp_path / "a-file.png" / "c" / "b.png")], "a-file.png is a file, not a folder"),
        "a folder": ([str(tmp_path / "folder.png")], "is a folder; name an image file, e.g."),
        "a fifo": ([str(tmp_path / "fifo.png"), "--overwrite"], "exists and is not a regular file"),
    }


CASES = ["existing", "same as --image", "same as --mask", "hard link to --image", "symlink to --mask", "no extension",
         "text extension", "under a file", "under a file, deeper", "a folder", "a fifo"]


@pytest.mark.skipif(os.name != "posix", reason="hard links, symlinks and fifos")
@pytest.mark.parametrize("case", CASES)
def test_bad_outputs_stop_before_loading_and_touch_nothing(capsys, no_model, files, tmp_path, case):
    output, message = output_cases(tmp_path, files)[case]
    before = {name: read_bytes(tmp_path / name) for name in ("in.png", "mask.png", "existing.png")}
    code, err = run_in_process(capsys, "inpaint", "--image", files["image"], "--mask", files["mask"],
                               "--prompt", PROMPT, "--output", *output)
    assert code == 2 and err.startswith(f"minidiff: error: --output {output[0]}") and message in err, err
    assert {name: read_bytes(tmp_path / name) for name in before} == before


def test_a_read_only_folder_stops_before_loading(capsys, no_model, tmp_path, monkeypatch):
    """Root ignores permissions, so the folder's write bit is what os.access reports (faked here)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path) and real_access(path, mode))
    code, err = run_in_process(capsys, "generate", "--prompt", PROMPT, "--output", str(tmp_path / "sub" / "o.png"))
    assert code == 2 and f"the folder {tmp_path} is not writable; choose another --output" in err
    assert not (tmp_path / "sub").exists()


def test_a_full_disk_leaves_the_existing_file_untouched(capsys, files, monkeypatch):
    """PIL writes 4 KiB and the disk fills up: the error says so in one line and the old file is byte-identical."""
    def fill_the_disk(image, handle, format=None, **kwargs):
        handle.write(b"\x89PNG" * 1024)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(PIL.Image.Image, "save", fill_the_disk)
    code, err = run_in_process(capsys, "generate", "--prompt", PROMPT, "--steps", "1", "--output", files["existing"],
                               "--overwrite")
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"minidiff: error: no space left on device writing {files['existing']}; "
                           "the existing file is untouched")
    assert read_bytes(files["existing"]) == files["existing_bytes"]
    assert sorted(os.listdir(os.path.dirname(files["existing"]))) == ["existing.png", "in.png", "mask.png"]


def test_atomic_write_keeps_the_target_and_its_mode_and_cleans_up(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)

    def fail(handle):
        handle.write(b"half")
        raise ValueError("the writer broke")
    with pytest.raises(ValueError, match="the writer broke"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]
    atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new" and os.stat(target).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["file.bin"]


def test_output_folders_are_created_and_png_jpeg_written(capsys, tmp_path):
    for name in ("new/sub/out.png", "out.JPG"):
        assert cli.main(["generate", "--prompt", PROMPT, "--steps", "1", "--output", str(tmp_path / name)]) == 0
        with PIL.Image.open(tmp_path / name) as image:
            assert image.format == ("PNG" if name.endswith(".png") else "JPEG") and image.size == (32, 32)


# ---- --attention and --vae-tiling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["math", "chunked"])
def test_attention_flag_serves_every_attention_call(capsys, tmp_path, monkeypatch, backend):
    attention_module = importlib.import_module("minidiff.ops.attention")  # the module, not ops.attention (the op)
    used, real_dispatch = [], attention_module.dispatch

    def spy(op, choice, *args, **kwargs):
        used.append(ops.current_backend(op, choice))
        return real_dispatch(op, choice, *args, **kwargs)
    monkeypatch.setattr(attention_module, "dispatch", spy)
    assert cli.main(["generate", "--prompt", PROMPT, "--steps", "1", "--attention", backend,
                     "--output", str(tmp_path / "o.png")]) == 0
    assert used and set(used) == {backend}  # UNet, VAE and text encoder alike
    assert ops.current_backend("attention") == "sdpa"  # the choice ends with the command


def test_vae_tiling_flag_decodes_in_tiles(capsys, tmp_path, monkeypatch):
    from minidiff.models import vae as vae_module

    tiled, real_run_tiled = [], vae_module.run_tiled
    monkeypatch.setattr(vae_module, "run_tiled", lambda *a, **k: tiled.append(1) or real_run_tiled(*a, **k))
    args = ["generate", "--prompt", PROMPT, "--steps", "1", "--height", "64", "--width", "64"]
    assert cli.main([*args, "--output", str(tmp_path / "whole.png")]) == 0 and not tiled
    assert cli.main([*args, "--vae-tiling", "--output", str(tmp_path / "tiled.png")]) == 0 and tiled
    with PIL.Image.open(tmp_path / "tiled.png") as image:
        assert image.size == (64, 64)



def test_prompt_weighting_flag_reaches_the_pipeline(capsys, tmp_path):
    """--prompt-weighting a1111 reads the weights: the image differs from the same text taken as it is."""
    args = ["generate", "--prompt", "a (red:1.8) circle", "--steps", "1"]
    assert cli.main([*args, "--output", str(tmp_path / "plain.png")]) == 0
    assert cli.main([*args, "--prompt-weighting", "a1111", "--output", str(tmp_path / "weighted.png")]) == 0
    assert read_bytes(tmp_path / "plain.png") != read_bytes(tmp_path / "weighted.png")
    code, message = run_in_process(capsys, *args, "--prompt-weighting", "a1111", "--prompt", "a (red circle",
                                   "--output", str(tmp_path / "broken.png"))
    assert code == 2 and "unbalanced brackets: '(' is never closed at character 2" in message


# ---- --scheduler by name -------------------------------------------------------------------------------------------
def test_scheduler_flag_takes_sampler_names(capsys, tmp_path, monkeypatch):
    """"DPM++ 2M Karras" in any spelling reaches the pipeline as that scheduler, on the model's own schedule."""
    used = []
    real_run = cli.run_pipeline
    monkeypatch.setattr(cli, "run_pipeline", lambda pipe, *a: used.append(pipe.scheduler) or real_run(pipe, *a))
    for spelling in ("DPM++ 2M Karras", "dpm++-2m-karras"):
        assert cli.main(["generate", "--prompt", PROMPT, "--steps", "2", "--scheduler", spelling,
                         "--output", str(tmp_path / "o.png"), "--overwrite"]) == 0
    assert [type(s).__name__ for s in used] == ["DPMSolverMultistepScheduler"] * 2
    assert all(s.config.use_karras_sigmas and s.config.beta_schedule == "scaled_linear" for s in used)


def test_a_misspelt_sampler_stops_before_loading_with_the_nearest_name(capsys, no_model, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", PROMPT, "--scheduler", "Eulr a", "--output", str(tmp_path / "o.png")])
    code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 2 and "minidiff generate: error: argument --scheduler/--sampler: unknown sampler 'Eulr a'; did you mean " \
        "'Euler a'" in err and "Accepted: Euler, Euler Karras" in err, err


def test_generate_help_lists_the_sampler_names(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in ("Euler a", "DPM++ 2M SDE", "UniPC", "LCM", "DPM2 a", "PLMS"):
        assert name in help_text


# ---- the README's examples ----------------------------------------------------------------------------------------
def readme_builtin_commands() -> list[str]:
    """The commands of the bash block in the README's "The built-in model" section, continuation lines joined."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme.split("## The built-in model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_builtin_examples_run_as_pasted(capsys, tmp_path, monkeypatch):
    """From a clone's root (docs/left-half.png and docs/outline-triangle.png are shipped), in order: each writes its
    own file and none fails."""
    (tmp_path / "docs").mkdir()
    for name in ("left-half.png", "outline-triangle.png"):
        shutil.copy(os.path.join(REPO, "docs", name), tmp_path / "docs")
    monkeypatch.chdir(tmp_path)
    commands = readme_builtin_commands()
    assert [shlex.split(c)[1] for c in commands] == ["generate", "generate", "img2img", "inpaint", "edit", "generate"]
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "minidiff"
        assert cli.main(words[1:]) == 0, (command, capsys.readouterr().err)
        output = words[words.index("--output") + 1]
        with PIL.Image.open(output) as image:
            assert image.size == (32, 32)


def test_readme_mask_is_the_white_left_half():
    with PIL.Image.open(os.path.join(REPO, "docs", "left-half.png")) as mask:
        pixels = np.asarray(mask.convert("L"))
    assert pixels.shape == (32, 32) and (pixels[:, :16] == 255).all() and (pixels[:, 16:] == 0).all()
    assert any("--mask docs/left-half.png" in command for command in readme_builtin_commands())
