"""ControlNet training (``method="controlnet"``) on a tiny Stable Diffusion folder: image / condition-image pairs
from metadata.jsonl (flipped together, conditions in [0, 1]), only the ControlNet trains and resumes to the
uninterrupted weights, bad folders and options are named. The step-by-step comparison with diffusers is
parity/test_training_controlnet.py; the built-in model's outline ControlNet, trained this way, is
tests/test_builtin_controlnet.py."""

from __future__ import annotations

import json
import os

import PIL.Image
import pytest
import torch

import minidiff
from minidiff.loading.safetensors_io import load_safetensors
from minidiff.training import TrainConfig, Trainer, train
from minidiff.training.data import ImageFolderDataset, load_batch, sample_generators, to_condition_image
from minidiff.training.distributed import Distributed
from tests.tiny_components import tiny_pipeline
from tests.training_fixtures import one_thread, write_image  # noqa: F401

WEIGHTS = "diffusion_pytorch_model.safetensors"


def write_pairs(root, count: int = 4) -> None:
    """``count`` 16x16 images, each with a condition image under conditions/ named by metadata.jsonl."""
    lines = []
    for i in range(count):
        write_image(os.path.join(root, f"{i}.png"), size=(16, 16), seed=i)
        write_image(os.path.join(root, "conditions", f"{i}.png"), size=(16, 16), seed=50 + i)
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}",
                                 "conditioning_image": f"conditions/{i}.png"}))
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``sd``: a tiny seeded Stable Diffusion folder (16x16 images, VAE factor 2); ``pairs``: four pairs."""
    root = tmp_path_factory.mktemp("controlnet-training")
    tiny_pipeline(minidiff.StableDiffusionPipeline).save_pretrained(root / "sd")
    write_pairs(str(root / "pairs"))
    return root


def config(base, output_dir, **overrides) -> TrainConfig:
    options = dict(method="controlnet", pretrained_model=str(base / "sd"), train_data_dir=str(base / "pairs"),
                   resolution=16, train_batch_size=2, max_train_steps=4, checkpointing_steps=2, num_sample_images=2,
                   sample_steps=2, lr_warmup_steps=0, learning_rate=1e-3, lr_scheduler="constant", progress=False)
    return TrainConfig(output_dir=str(output_dir), **{**options, **overrides})


# ---- data ---------------------------------------------------------------------------------------------------------
def test_pairs_give_images_and_conditions_in_0_1_flipped_together(base):
    dataset = ImageFolderDataset(str(base / "pairs"), 16, with_captions=True, with_conditioning=True)
    assert dataset.files == [f"{i}.png" for i in range(4)]  # the condition files are no training images
    with PIL.Image.open(base / "pairs" / "conditions" / "2.png") as image:
        assert torch.equal(dataset[2]["conditioning_pixel_values"], to_condition_image(image, 16))
    assert dataset[2]["caption"] == "caption 2"
    plain = load_batch(dataset, range(4), sample_generators(0, 0, range(4)), random_flip=False)
    flipped = load_batch(dataset, range(4), sample_generators(0, 0, range(4)), random_flip=True)
    conditions = plain["conditioning_pixel_values"]  # (4, 3, 16, 16)
    assert conditions.min() >= 0 and conditions.max() <= 1 and conditions.max() > 0.9
    turned = [not torch.equal(flipped["pixel_values"][i], plain["pixel_values"][i]) for i in range(4)]
    assert any(turned) and not all(turned)  # seed 0's draws flip some of the four
    for i, turn in enumerate(turned):
        expected = conditions[i].flip(-1) if turn else conditions[i]
        assert torch.equal(flipped["conditioning_pixel_values"][i], expected)


def test_controlnet_runs_do_not_flip_unless_asked():
    assert not TrainConfig(output_dir="x", method="controlnet").flips
    assert TrainConfig(output_dir="x", method="controlnet", random_flip=True).flips
    assert TrainConfig(output_dir="x").flips


def drop_metadata(root):
    os.remove(root / "metadata.jsonl")


def unpaired_image(root):
    write_image(str(root / "extra.png"), size=(16, 16))


def missing_condition(root):
    os.remove(root / "conditions" / "1.png")


@pytest.mark.parametrize("spoil, error, match", [
    (drop_metadata, FileNotFoundError, "metadata.jsonl, which does not exist; write one line per image"),
    (unpaired_image, ValueError, r"1 image\(s\) .* have no conditioning_image .*extra.png"),
    (missing_condition, FileNotFoundError, r"conditions/1.png of 1.png is not a file"),
])
def test_bad_pair_folders_are_named(tmp_path, spoil, error, match):
    write_pairs(str(tmp_path))
    spoil(tmp_path)
    with pytest.raises(error, match=match):
        ImageFolderDataset(str(tmp_path), 16, with_captions=True, with_conditioning=True)


# ---- options ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, error, match", [
    (dict(use_ema=True), ValueError, "trains a ControlNet beside the frozen UNet"),
    (dict(class_conditional=True), ValueError, "class_conditional applies to pixel-space training"),
    (dict(conditioning_embedding_out_channels=(16, 0)), ValueError, "sequence of ints >= 1"),
    (dict(conditioning_embedding_out_channels=(16,), controlnet_model="cn"), ValueError, "give one of the two"),
    (dict(method="lora", controlnet_model="cn"), ValueError, "controlnet_model applies to method controlnet"),
    (dict(conditioning_embedding_out_channels=(16, 32, 64)), ValueError,
     "shrink the condition image by 4 .* the VAE shrinks the image by 2: give 2 entries"),
    (dict(controlnet_model="nowhere"), FileNotFoundError, "controlnet_model nowhere is not a ControlNet folder"),
    (dict(train_data_dir=None), ValueError, "needs your images and their condition images"),
])
def test_bad_controlnet_options_are_refused(base, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train(config(base, tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / WEIGHTS).exists()


def test_a_controlnet_of_another_unet_is_refused(base, tmp_path):
    wider = minidiff.UNet2DConditionModel(**{**tiny_pipeline(minidiff.StableDiffusionPipeline).unet.config,
                                             "block_out_channels": (16, 32)})
    other = minidiff.ControlNetModel.from_unet(wider, conditioning_embedding_out_channels=(16, 32))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="channels"):
        train(config(base, tmp_path / "run", controlnet_model=str(tmp_path / "other")))


# ---- training -----------------------------------------------------------------------------------------------------
def test_only_the_controlnet_trains_and_a_resumed_run_ends_where_the_whole_one_does(base, tmp_path):
    trainer = Trainer(config(base, tmp_path / "probe"), Distributed())
    grads = {name for name, p in trainer.task.denoiser.named_parameters() if p.requires_grad}
    assert grads and all(name.startswith("controlnet.") for name in grads)
    assert grads == {f"controlnet.{n}" for n, _ in trainer.task.controlnet.named_parameters()}

    whole = train(config(base, tmp_path / "whole"))
    train(config(base, tmp_path / "halted", max_train_steps=2))
    resumed = train(config(base, tmp_path / "halted", resume="latest"))
    assert resumed == whole  # bit for bit (the new condition encoder's init is seeded too)
    ours, reference = (load_safetensors(str(tmp_path / run / WEIGHTS)) for run in ("halted", "whole"))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    trained = minidiff.ControlNetModel.from_pretrained(tmp_path / "whole")
    assert trained.controlnet_mid_block.weight.abs().max() > 0  # the zero convolution moved
    unet = minidiff.UNet2DConditionModel.from_pretrained(base / "sd" / "unet")
    frozen = minidiff.StableDiffusionPipeline.from_pretrained(base / "sd").unet
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), frozen.state_dict().values()))

    continued = train(config(base, tmp_path / "continued", controlnet_model=str(tmp_path / "whole"),
                             max_train_steps=1))
    assert continued[0] != whole[0]  # it starts from the trained ControlNet, not a new copy
