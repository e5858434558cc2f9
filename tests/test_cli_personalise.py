"""`minidiff train --method lora|dreambooth|textual-inversion`: the help lists the methods and the defaults; a run
prints what trains (the trainable weight count), a progress bar with an ETA, and a final line naming the output
file and its size; bad input exits with status 2 and one line, before anything is written."""

from __future__ import annotations

import os
import re

import pytest
import torch

import minidiff
from minidiff import cli
from minidiff.builtin import builtin_model_folder
from minidiff.loading.safetensors_io import load_safetensors
from tests.training_fixtures import one_thread, write_image, write_personalise_folders  # noqa: F401

SHORT = ["--max-train-steps", "2", "--train-batch-size", "2", "--lr-warmup-steps", "0", "--num-sample-images", "0"]
TI = ["--method", "textual-inversion", "--placeholder-token", "<sks>", "--initializer-token", "toy",
      "--prompt", "a photo of <sks>"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny Stable Diffusion folder with its 16x16 images, and 32x32 images for the built-in model."""
    root = tmp_path_factory.mktemp("cli_personalise")
    write_personalise_folders(root)
    for i in range(4):
        write_image(str(root / "images32" / f"{i}.png"), size=(32, 32), seed=i)
    return root


def tiny(base) -> list[str]:
    """A LoRA run on the tiny model (later flags override these)."""
    return ["--method", "lora", "--pretrained-model", str(base / "sd"), "--images", str(base / "images"),
            "--resolution", "16", "--prompt", "a photo of sks"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["train", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_methods_and_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "--method {full,lora,dreambooth,textual-inversion,controlnet}" in text
    for flag, default in [("--method", "full"), ("--lora-rank", "4"), ("--num-vectors", "1"),
                          ("--prior-loss-weight", "1.0"), ("--num-class-images", "100"),
                          ("--upscale-small-images", "False"), ("--gradient-checkpointing", "False")]:
        assert re.search(rf"{flag}\b.*?\(default: {re.escape(default)}\)", text), flag
    for words in ("--images TRAIN_DATA_DIR", "--prompt INSTANCE_PROMPT", "the built-in model", "alpha = r",
                  "--placeholder-token", "--initializer-token", "--class-prompt", "--use-lora", "to_out.0",
                  "--controlnet-model", "--conditioning-embedding-out-channels", "conditioning_image"):
        assert words in text, words


def test_lora_on_the_built_in_model_prints_the_weight_count_progress_and_the_output_file(base, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "--method", "lora", "--images", str(base / "images32"), "--prompt",
                             "a photo of sks", "--output-dir", str(out_dir), *SHORT)
    assert code == 0, err
    first, last = out.strip().splitlines()
    path = out_dir / "pytorch_lora_weights.safetensors"
    weights = load_safetensors(str(path))
    count = sum(tensor.numel() for tensor in weights.values())
    assert first.startswith(f"training {count:,} LoRA weights (rank 4, ")
    size = f"{os.path.getsize(path) / 1024:.1f} KiB"
    assert re.fullmatch(rf"trained 2 steps: loss \d\.\d{{4}} -> \d\.\d{{4}}; LoRA weights in {re.escape(str(path))} "
                        rf"\({size}\); load them with pipe\.load_lora_weights", last), last
    assert re.search(r"2/2 \[\d\d:\d\d<\d\d:\d\d", err), err  # the progress bar: elapsed < remaining (ETA)
    assert (out_dir / "loss.png").is_file()
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(builtin_model_folder())
    pipe.load_lora_weights(str(out_dir))  # the file is one the pipeline reads


@pytest.mark.parametrize("args, output, says", [
    (TI, "learned_embeds.safetensors", r"embedding of <sks> in {path} \(\d+\.\d KiB\); load it with "
                                       r"pipe\.load_textual_inversion"),
    (["--method", "dreambooth", "--use-lora", "--with-prior-preservation", "--class-prompt", "a photo of a shape",
      "--num-class-images", "2", "--sample-steps", "2"], "pytorch_lora_weights.safetensors",
     r"LoRA weights in {path} \(\d+\.\d KiB\)"),
    (["--method", "dreambooth", "--no-use-ema"], "", r"model in {path}"),
], ids=["textual-inversion", "dreambooth-lora-prior", "dreambooth-full"])
def test_each_method_names_its_output(base, tmp_path, capsys, args, output, says):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, *tiny(base), *SHORT, "--output-dir", str(out_dir), "--no-progress", *args)
    assert code == 0, err
    path = os.path.join(str(out_dir), output) if output else str(out_dir)
    assert os.path.exists(path)
    assert re.search(says.format(path=re.escape(path)), out.strip().splitlines()[-1]), out


@pytest.mark.parametrize("args, problem", [
    (["--images", "EMPTY"], r"no images in .*empty \(looked for \.png"),
    (["--lora-rank", "0"], r"lora_rank must be an int >= 1, got 0"),
    (["--lora-rank", "-1"], r"lora_rank must be an int >= 1, got -1"),
    ([*TI[:-4], "--initializer-token", "dog house", "--prompt", "a <sks>"],
     r"initializer_token 'dog house' is 2 tokens"),
    ([*TI[:2], "--placeholder-token", "dog", "--initializer-token", "toy", "--prompt", "a dog"],
     r"placeholder_token 'dog': 'dog' is already in the tokenizer's vocabulary"),
    (["--resolution", "32"], r"smaller than the training resolution 32: .*--upscale-small-images"),
    (["--method", "dreambooth", "--with-prior-preservation"], r"with_prior_preservation needs class_prompt"),
    (["--use-ema"], r"use_ema keeps an average of the whole UNet"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(base, tmp_path, capsys, args, problem):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if arg == "EMPTY" else arg for arg in args]
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, *tiny(base), *SHORT, "--output-dir", str(out_dir), *args)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("minidiff: error: ") and re.search(problem, err), err
    assert out == "" and not out_dir.exists()


def test_an_unknown_method_is_a_usage_error(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(tmp_path / "run"), "--method", "hypernetwork"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "argument --method: invalid choice: 'hypernetwork'" in last and "textual-inversion" in last
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_gives_the_same_run(base, tmp_path, capsys):
    """--gradient-checkpointing (UNet and trained text encoder) changes memory and time, not the losses or weights."""
    runs = {}
    for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        out_dir = tmp_path / flag
        code, _, err = run_cli(capsys, *tiny(base), *SHORT, "--output-dir", str(out_dir), "--no-progress",
                               "--train-text-encoder", flag)
        assert code == 0, err
        runs[flag] = load_safetensors(str(out_dir / "pytorch_lora_weights.safetensors"))
    plain, checkpointed = runs.values()
    assert plain.keys() == checkpointed.keys() and any(key.startswith("text_encoder.") for key in plain)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-6, atol=1e-9)
