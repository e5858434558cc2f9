"""Bad input to the personalisation methods (issue 14): image folders, tokens, LoRA options, resuming with another
method or base model, and the method options' own checks. Each case raises ValueError/FileNotFoundError naming the
problem and the fix, and leaves output_dir as it was: not created for a new run, byte for byte the same for a run
that is resumed or started over in it."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

import minidiff
from minidiff.training import train
from tests.tiny_components import tiny_components
from tests.training_fixtures import one_thread, personalise_config, write_image, write_personalise_folders  # noqa: F401

TEXTUAL_INVERSION = dict(method="textual-inversion", placeholder_token="<sks>", initializer_token="toy",
                         instance_prompt="a photo of <sks>")
PRIOR = dict(method="dreambooth", with_prior_preservation=True, class_prompt="a photo of a shape")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny model and images, plus a finished 2-step LoRA run (checkpoint-000002) to resume or start over."""
    root = tmp_path_factory.mktemp("personalise")
    write_personalise_folders(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(personalise_config(root, root / "finished"))
    torch.set_num_threads(threads)
    return root


def contents(folder) -> dict[str, bytes] | None:
    """Every file under ``folder`` by relative path (None if the folder does not exist)."""
    if not os.path.isdir(folder):
        return None
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(pathlib.Path(folder).rglob("*"))
            if path.is_file()}


def assert_refused(config, error: type[Exception], match: str) -> None:
    """``train(config)`` raises ``error`` matching ``match`` and output_dir is left exactly as it was."""
    before = contents(config.output_dir)
    with pytest.raises(error, match=match):
        train(config)
    assert contents(config.output_dir) == before


def image_folder(root, name: str, count: int = 4, size=(16, 16)) -> str:
    folder = root / name
    for i in range(count):
        write_image(str(folder / f"{i}.png"), size=size, seed=i)
    return str(folder)


# ---- the image folder ---------------------------------------------------------------------------------------------
def test_an_empty_image_folder_names_the_folder_and_the_accepted_files(base, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert_refused(personalise_config(base, tmp_path / "run", train_data_dir=str(tmp_path / "empty")), ValueError,
                   r"no images in .*empty \(looked for \.png, \.jpg, \.jpeg.* files, recursively\)")


def test_a_missing_image_folder_is_named(base, tmp_path):
    assert_refused(personalise_config(base, tmp_path / "run", train_data_dir=str(tmp_path / "nowhere")),
                   FileNotFoundError, r"train_data_dir .*nowhere does not exist")


def test_an_unreadable_image_is_named_with_the_fix(base, tmp_path):
    folder = image_folder(tmp_path, "images")
    pathlib.Path(folder, "broken.png").write_bytes(b"this is not a PNG file")
    assert_refused(personalise_config(base, tmp_path / "run", train_data_dir=folder), ValueError,
                   r"cannot read image file .*broken\.png.*(remove|replace|delete)")


def test_a_truncated_image_is_named_before_anything_is_written(base, tmp_path):
    """The header reads, the pixels do not: found before training starts, not at the step that first draws it."""
    folder = image_folder(tmp_path, "images")
    data = pathlib.Path(folder, "3.png").read_bytes()
    pathlib.Path(folder, "3.png").write_bytes(data[:len(data) // 3])
    assert_refused(personalise_config(base, tmp_path / "run", train_data_dir=folder, max_train_steps=4), ValueError,
                   r"image file .*3\.png")


def test_images_smaller_than_the_resolution_name_upscale_small_images(base, tmp_path):
    folder = image_folder(tmp_path, "small", size=(12, 20))
    assert_refused(personalise_config(base, tmp_path / "run", train_data_dir=folder), ValueError,
                   r"image .*0\.png is 12x20, smaller than the training resolution 16: use larger images, a smaller "
                   r"--resolution, or --upscale-small-images")


def test_with_upscale_small_images_small_images_train(base, tmp_path):
    folder = image_folder(tmp_path, "small", size=(12, 20))
    losses = train(personalise_config(base, tmp_path / "run", train_data_dir=folder, upscale_small_images=True))
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_textual_inversion_captions_must_name_the_placeholder(base, tmp_path):
    assert_refused(personalise_config(base, tmp_path / "run", **{**TEXTUAL_INVERSION, "instance_prompt": "a photo"}),
                   ValueError, r"caption 'a photo' of image 0 \(0\.png\) does not name placeholder_token '<sks>'.*"
                               r"--prompt 'a photo of <sks>'")


# ---- tokens ---------------------------------------------------------------------------------------------------------
def test_an_initializer_token_of_several_tokens_is_refused(base, tmp_path):
    config = personalise_config(base, tmp_path / "run", **{**TEXTUAL_INVERSION, "initializer_token": "dog house"})
    assert_refused(config, ValueError, r"initializer_token 'dog house' is 2 tokens \(\['dog</w>', 'house</w>'\]\); "
                                       r"it must be a single token: pick one word")


@pytest.mark.parametrize("placeholder", ["dog", "Dog"])
def test_a_placeholder_token_already_in_the_vocabulary_is_refused(base, tmp_path, placeholder):
    config = personalise_config(base, tmp_path / "run", **{**TEXTUAL_INVERSION, "placeholder_token": placeholder,
                                                           "instance_prompt": f"a photo of {placeholder}"})
    assert_refused(config, ValueError, rf"placeholder_token '{placeholder}': .* is already in the tokenizer's "
                                       r"vocabulary; choose a new token such as '<my-concept>'")


# ---- the options' own checks (made before any model is loaded) ------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(lora_rank=0), r"lora_rank must be an int >= 1, got 0"),
    (dict(lora_rank=-3), r"lora_rank must be an int >= 1, got -3"),
    (dict(lora_alpha=0.0), r"lora_alpha must lie in \(0, inf\) \(or None for alpha = rank\)"),
    (dict(lora_target_modules=()), r"lora_target_modules must be a non-empty sequence of module names \(e\.g\. to_k"),
    (dict(method="hypernetwork"), r"method='hypernetwork' is not supported; accepted values: 'full', 'lora', "
                                  r"'dreambooth', 'textual-inversion'"),
    (dict(method="dreambooth", with_prior_preservation=True), r"with_prior_preservation needs class_prompt: .*e\.g\."),
    (dict(with_prior_preservation=True, class_prompt="a shape"), r"with_prior_preservation applies to method "
                                                                 r"dreambooth, not 'lora'"),
    (dict(method="dreambooth", use_lora=True, with_prior_preservation=True, class_prompt="a shape",
          prior_loss_weight=-0.5), r"prior_loss_weight must lie in \[0, inf\)"),
    (dict(PRIOR, num_class_images=0), r"num_class_images must be an int >= 1, got 0"),
    (dict(PRIOR, prior_target="teacher"), r"prior_target='teacher' is not supported; accepted values: 'noise', "
                                          r"'frozen-model'"),
    (dict(method="dreambooth", prior_target="frozen-model"), r"prior_target 'frozen-model' is the target of prior "
                                                             r"preservation's class images: add "
                                                             r"with_prior_preservation"),
    (dict(PRIOR, prior_guidance_scale=5.0), r"prior_guidance_scale applies to prior_target 'frozen-model' "
                                            r"\(--prior-target frozen-model\), not 'noise'"),
    (dict(PRIOR, prior_target="frozen-model", prior_guidance_scale=-1.0),
     r"prior_guidance_scale must lie in \[0, inf\)"),
    (dict(method="textual-inversion", instance_prompt="a <sks>"), r"textual-inversion needs placeholder_token and "
                                                                  r"initializer_token, e\.g\. --placeholder-token"),
    (dict(method="textual-inversion", placeholder_token="<sks>", instance_prompt="a <sks>"),
     r"textual-inversion needs initializer_token, e\.g\."),
    (dict(TEXTUAL_INVERSION, num_vectors=0), r"num_vectors must be an int >= 1, got 0"),
    (dict(placeholder_token="<sks>"), r"placeholder_token applies to method textual-inversion, not 'lora'"),
    (dict(TEXTUAL_INVERSION, train_text_encoder=True), r"train_text_encoder applies to method lora \(or dreambooth "
                                                       r"with use_lora\), not 'textual-inversion'"),
    (dict(use_lora=True), r"use_lora applies to method dreambooth, not 'lora'"),
    (dict(use_ema=True), r"use_ema keeps an average of the whole UNet; method 'lora' trains only added weights: "
                         r"leave use_ema off \(--no-use-ema\)"),
    (dict(method="dreambooth", use_lora=True, use_ema=True), r"method 'dreambooth' with use_lora trains only added "
                                                             r"weights: leave use_ema off"),
    (dict(TEXTUAL_INVERSION, use_ema=True), r"method 'textual-inversion' trains only added weights"),
    (dict(instance_prompt="  "), r"instance_prompt must be a non-empty string or None"),
    (dict(class_conditional=True), r"class_conditional applies to pixel-space training"),
])
def test_bad_method_options_are_refused(base, tmp_path, overrides, match):
    assert_refused(personalise_config(base, tmp_path / "run", **overrides), ValueError, match)


def test_lora_target_modules_that_match_nothing_are_refused(base, tmp_path):
    assert_refused(personalise_config(base, tmp_path / "run", lora_target_modules=("to_z",)), ValueError,
                   r"no Linear/Conv2d module of UNet2DConditionModel matches target_modules \['to_z'\]; e\.g\. to_q")


def test_a_method_on_a_unet_folder_asks_for_a_stable_diffusion_folder(base, tmp_path):
    unet = minidiff.UNet2DModel(block_out_channels=(8, 16), norm_num_groups=4, sample_size=16,
                                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unet.save_pretrained(tmp_path / "pixel_unet")
    assert_refused(personalise_config(base, tmp_path / "run", pretrained_model=str(tmp_path / "pixel_unet")),
                   ValueError, r"method 'lora' personalises a Stable Diffusion pipeline, but pretrained_model .* is a "
                               r"UNet2DModel folder; pass a Stable Diffusion folder")


# ---- resume and start over ------------------------------------------------------------------------------------------
@pytest.fixture
def finished(base, tmp_path):
    """A private copy of the finished LoRA run."""
    return pathlib.Path(shutil.copytree(base / "finished", tmp_path / "run"))


@pytest.mark.parametrize("overrides, shown", [
    (TEXTUAL_INVERSION, r"method='textual-inversion' \(checkpoint: 'lora'\)"),
    (dict(method="dreambooth", use_lora=True), r"method='dreambooth' \(checkpoint: 'lora'\); use_lora=True"),
    (dict(method="full", use_ema=False), r"method='full' \(checkpoint: 'lora'\)"),
    (dict(lora_rank=8), r"lora_rank=8 \(checkpoint: 4\)"),
])
def test_resume_with_a_different_method_is_refused(base, finished, overrides, shown):
    config = personalise_config(base, finished, resume="latest", **overrides)
    assert_refused(config, ValueError, rf"cannot resume from .*checkpoint-000002 with different training options: "
                                       rf"{shown}.*give the others as the checkpoint has them, or start a new run")


def test_resume_from_a_different_base_model_is_refused(base, tmp_path):
    """Same folder path, other weights: the fingerprint of the base model tells them apart."""
    shutil.copytree(base / "sd", tmp_path / "sd")
    shutil.copytree(base / "images", tmp_path / "images")
    train(personalise_config(tmp_path, tmp_path / "run"))
    tiny_components(seed=1)["unet"].save_pretrained(tmp_path / "sd" / "unet")
    assert_refused(personalise_config(tmp_path, tmp_path / "run", resume="latest"), ValueError,
                   r"base model .*sd \(fingerprint [0-9a-f]{16}; the checkpoint was trained from .*sd, fingerprint "
                   r"[0-9a-f]{16}\): its weights differ.*or start a new run")


def test_resume_from_another_base_model_folder_names_both(base, finished, tmp_path):
    tiny_components(seed=1)["unet"].save_pretrained(tmp_path / "other" / "unet")
    shutil.copytree(base / "sd", tmp_path / "other", dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
    assert_refused(personalise_config(base, finished, resume="latest", pretrained_model=str(tmp_path / "other")),
                   ValueError, r"pretrained_model='.*other' \(checkpoint: '.*sd'\); base model .*other .*its weights "
                               r"differ")


@pytest.mark.parametrize("overrides, match", [
    (dict(TEXTUAL_INVERSION, initializer_token="dog house"), r"initializer_token 'dog house' is 2 tokens"),
    (dict(train_data_dir="EMPTY"), r"no images in"),
    (dict(lora_target_modules=("to_z",)), r"matches target_modules \['to_z'\]"),
])
def test_starting_over_with_bad_input_keeps_the_previous_run(base, finished, tmp_path, overrides, match):
    """--overwrite deletes the previous run's outputs only once the new run is known to start."""
    (tmp_path / "empty").mkdir()
    overrides = {k: str(tmp_path / "empty") if v == "EMPTY" else v for k, v in overrides.items()}
    assert_refused(personalise_config(base, finished, overwrite=True, **overrides), ValueError, match)


# ---- found in review ----------------------------------------------------------------------------------------------
def test_a_class_data_dir_that_is_a_file_is_refused_before_overwrite_deletes_the_old_run(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base / "finished", run)
    (tmp_path / "a-file").write_text("not a folder")
    assert_refused(personalise_config(base, run, overwrite=True, class_data_dir=str(tmp_path / "a-file"), **PRIOR),
                   ValueError, r"class_data_dir .*a-file is a file; pass a folder")


def test_class_images_already_in_the_folder_count_whatever_their_names(base, tmp_path):
    classes = image_folder(tmp_path, "classes", count=3)
    train(personalise_config(base, tmp_path / "run", class_data_dir=classes, num_class_images=3, **PRIOR))
    assert sorted(os.listdir(classes)) == ["0.png", "1.png", "2.png"]  # none drawn: train_dreambooth.py's count


@pytest.mark.parametrize("options", [dict(method="dreambooth"), TEXTUAL_INVERSION, dict(method="lora")])
def test_an_instance_prompt_without_images_is_refused(base, tmp_path, options):
    config = personalise_config(base, tmp_path / "run", **options)
    config.train_data_dir = None
    assert_refused(config, ValueError, r"needs your images: pass train_data_dir \(--images DIR\)")


def test_a_placeholder_that_is_a_whole_clip_word_is_refused(base, tmp_path):
    assert_refused(personalise_config(base, tmp_path / "run", **dict(TEXTUAL_INVERSION, placeholder_token="sks",
                                                                        instance_prompt="a photo of sks")),
                   ValueError, r"'sks' is already in the tokenizer's vocabulary")


def test_the_base_fingerprint_ignores_the_runs_checkpoints(tmp_path):
    from minidiff.builtin import builtin_model_folder
    from minidiff.training.methods import fingerprint

    shutil.copytree(builtin_model_folder(), tmp_path / "model")
    before = fingerprint(str(tmp_path / "model"))
    write_image(str(tmp_path / "model" / "checkpoints" / "checkpoint-000001" / "x.png"))
    (tmp_path / "model" / "checkpoints" / "checkpoint-000001" / "state.json").write_text("{}")
    assert fingerprint(str(tmp_path / "model")) == before
    (tmp_path / "model" / "unet" / "config.json").write_text("{}")
    assert fingerprint(str(tmp_path / "model")) != before


def test_use_ema_left_unset_follows_the_method_through_dataclasses_replace():
    import dataclasses

    from minidiff.training import TrainConfig

    full = TrainConfig(output_dir="x")
    assert full.keeps_ema and not dataclasses.replace(full, method="lora").check().keeps_ema
    assert not TrainConfig(output_dir="x", method="dreambooth").keeps_ema  # train_dreambooth.py keeps no EMA
