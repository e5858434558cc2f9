"""The training loop in one process: the step's maths, schedules, EMA, checkpoints (layout, atomicity, resume),
accumulation, bf16, class conditioning, text fine-tuning, and clear errors for bad options and folders."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel as ReferenceEMA
from safetensors.torch import load_file, save_file
from torch import nn

import minidiff
from minidiff.training import EMAModel, TrainConfig, Trainer, lr_factor, make_optimizer, train, training_step
from minidiff.training import checkpoint
from minidiff.training.data import sample_generators
from minidiff.training.distributed import Distributed
from tests.tiny_components import tiny_pipeline
from tests.training_fixtures import TINY, logged_losses, one_thread, tiny_config, write_image  # noqa: F401


# ---- the step -----------------------------------------------------------------------------------------------------
class Scale(nn.Module):
    """A one-weight "denoiser" that records what it was called with."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, **conditioning):
        self.seen = (x, t, conditioning)
        return SimpleNamespace(sample=x * self.weight)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_step_is_ddpm_algorithm_1(prediction_type):
    scheduler = minidiff.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0 = torch.randn(3, 2, 4, 4)
    model = Scale()
    loss = training_step(model, scheduler, x0, sample_generators(0, 0, range(3)), prediction_type,
                         {"class_labels": torch.tensor([1, 2, 0])}, loss_scale=0.5)
    generators = sample_generators(0, 0, range(3))
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
    noise = torch.cat([torch.randn(1, 2, 4, 4, generator=g) for g in generators])
    abar = scheduler.alphas_cumprod[t].reshape(3, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    expected = ((0.5 * x_t - target) ** 2).mean()
    assert torch.equal(model.seen[1], t) and torch.allclose(model.seen[0], x_t, atol=1e-6)
    assert model.seen[2]["class_labels"].tolist() == [1, 2, 0]
    assert torch.allclose(loss, expected, rtol=1e-6)
    expected_grad = 0.5 * (2 * (0.5 * x_t - target) * x_t).mean()  # d(0.5 * loss)/dw
    assert torch.allclose(model.weight.grad, expected_grad, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_matches_diffusers(schedule):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(schedule if schedule == "linear" or schedule == "cosine" else "constant_with_warmup",
                              optimizer, num_warmup_steps=5, num_training_steps=20)
    for step in range(25):
        assert lr_factor(step, 5, 20, schedule) == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        reference.step()


def test_ema_matches_diffusers_warmup_ema():
    model = nn.Linear(3, 2)
    ours = EMAModel(model, max_decay=0.999, power=0.75)
    theirs = ReferenceEMA(model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        theirs.step(model.parameters())
    for a, b in zip(ours.model.parameters(), theirs.shadow_params):
        assert torch.allclose(a, b, atol=1e-6)
    assert not any(p.requires_grad for p in ours.model.parameters())


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    config = TrainConfig(output_dir="x")
    optimizer = make_optimizer(model.parameters(), config)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors, meta = checkpoint.split_optimizer_state(optimizer.state_dict())
    save_file(tensors, tmp_path / "o.safetensors")
    json.dump(meta, open(tmp_path / "o.json", "w"))
    copy = nn.Linear(4, 3)
    copy.load_state_dict(model.state_dict())
    restored = make_optimizer(copy.parameters(), config)
    restored.load_state_dict(checkpoint.join_optimizer_state(load_file(tmp_path / "o.safetensors"),
                                                             json.load(open(tmp_path / "o.json"))))
    x = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (copy, restored)):
        m(x).pow(2).sum().backward()
        opt.step()
    assert torch.equal(model.weight, copy.weight)


# ---- runs ---------------------------------------------------------------------------------------------------------
def test_checkpoint_layout_and_diffusers_folders(tmp_path):
    losses = train(tiny_config(tmp_path / "run", checkpoints_total_limit=1))
    assert len(losses) == 6 and logged_losses(tmp_path / "run") == losses
    [latest] = checkpoint.list_checkpoints(str(tmp_path / "run"))  # checkpoint-000003 pruned
    assert latest.endswith("checkpoint-000006")
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet_ema",
                 "scheduler/scheduler_config.json", "training_state/optimizer.safetensors",
                 "training_state/rng.safetensors", "training_state/state.json", "loss.png", "samples.png"):
        assert os.path.exists(os.path.join(latest, name)), name
    for folder in (latest, tmp_path / "run"):  # the checkpoint and the exported model are both pipeline folders
        pipe = diffusers.DDPMPipeline.from_pretrained(folder)
        assert pipe.unet.config.sample_size == 8
    with open(os.path.join(latest, "training_state", "state.json")) as handle:
        state = json.load(handle)
    assert state["step"] == 6 and state["losses"] == losses and state["global_batch_size"] == 4


def test_crash_mid_checkpoint_write_keeps_the_last_checkpoint_and_resume_reproduces(tmp_path, monkeypatch):
    uninterrupted = train(tiny_config(tmp_path / "a"))
    real_save = checkpoint.save_safetensors

    def dies_writing_optimizer(tensors, path, *args):
        if "checkpoint-000006" in path and path.endswith("optimizer.safetensors"):
            open(path, "wb").write(b"half a file")
            raise KeyboardInterrupt("killed while writing the checkpoint")
        return real_save(tensors, path, *args)

    monkeypatch.setattr(checkpoint, "save_safetensors", dies_writing_optimizer)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b"))
    monkeypatch.undo()
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path / "b"))] == ["checkpoint-000003"]
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / ".tmp-checkpoint-000006")  # the torn write, ignored
    resumed = train(tiny_config(tmp_path / "b", resume="latest"))
    assert resumed == uninterrupted
    assert logged_losses(tmp_path / "b") == uninterrupted
    assert not os.path.exists(tmp_path / "b" / "checkpoints" / ".tmp-checkpoint-000006")
    a = minidiff.UNet2DModel.from_pretrained(tmp_path / "a", subfolder="unet").state_dict()
    b = minidiff.UNet2DModel.from_pretrained(tmp_path / "b", subfolder="unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    big = train(tiny_config(tmp_path / "big", train_batch_size=4, num_sample_images=0))
    accumulated = train(tiny_config(tmp_path / "acc", train_batch_size=2, gradient_accumulation_steps=2,
                                    num_sample_images=0))
    assert torch.allclose(torch.tensor(big), torch.tensor(accumulated), rtol=1e-5)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    fp32 = train(tiny_config(tmp_path / "fp32", num_sample_images=0))
    bf16 = train(tiny_config(tmp_path / "bf16", mixed_precision="bf16", num_sample_images=0))
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert torch.allclose(torch.tensor(bf16), torch.tensor(fp32), rtol=0.05)
    assert minidiff.UNet2DModel.from_pretrained(tmp_path / "bf16", subfolder="unet").dtype == torch.float32


def test_class_conditional_from_an_image_folder(tmp_path):
    for label in ("cats", "dogs", "owls"):
        for i in range(3):
            write_image(tmp_path / "data" / label / f"{i}.png", size=(12, 9), seed=i)
    train(tiny_config(tmp_path / "run", train_data_dir=str(tmp_path / "data"), class_conditional=True,
                      train_batch_size=3))
    unet = minidiff.UNet2DModel.from_pretrained(tmp_path / "run", subfolder="unet")
    assert unet.config.num_class_embeds == 3
    out = unet(torch.randn(2, 3, 8, 8), 10, class_labels=torch.tensor([0, 2])).sample
    assert out.shape == (2, 3, 8, 8)


def test_a_dataset_object_and_any_alpha_bar_scheduler_for_noising(tmp_path):
    """DDIM's and PNDM's add_noise is DDPM's forward process: same betas, same losses."""
    dataset = [{"pixel_values": torch.rand(3, 8, 8) * 2 - 1, "class_label": i % 2, "caption": ""} for i in range(8)]
    ddpm = train(tiny_config(tmp_path / "ddpm", num_sample_images=0), dataset=dataset)
    for name in ("ddim", "pndm"):
        assert train(tiny_config(tmp_path / name, noise_scheduler=name, num_sample_images=0), dataset=dataset) == ddpm
    with pytest.raises(ValueError, match=r"'pixel_values' are \(3, 8, 8\) tensors .* first has shape \(3, 4, 4\)"):
        train(tiny_config(tmp_path / "bad"), dataset=[{"pixel_values": torch.zeros(3, 4, 4)}])
    with pytest.raises(ValueError, match="needs the number of classes: list has no int attribute num_classes"):
        train(tiny_config(tmp_path / "labels", class_conditional=True), dataset=dataset)


def test_fine_tunes_a_pretrained_pixel_model(tmp_path):
    """The face-to-butterfly recipe: start from a diffusers DDPM folder, keep its schedule, train on new images."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", num_train_timesteps=500)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "faces")
    trainer = Trainer(tiny_config(tmp_path / "run", pretrained_model=str(tmp_path / "faces"), resolution=None),
                      Distributed())
    assert trainer.task.scheduler.config.num_train_timesteps == 500
    assert trainer.task.scheduler.config.beta_schedule == "linear"
    before = trainer.unet.conv_in.weight.detach().clone()
    assert torch.equal(before, unet.conv_in.weight)
    trainer.run()
    assert not torch.equal(trainer.unet.conv_in.weight, before)
    with pytest.raises(ValueError, match="resolution 16 differs from the pretrained UNet's sample_size 8"):
        Trainer(tiny_config(tmp_path / "other", pretrained_model=str(tmp_path / "faces"), resolution=16),
                Distributed())


def test_text_conditioned_fine_tuning_in_latent_space(tmp_path):
    pipe = tiny_pipeline(minidiff.StableDiffusionPipeline)
    pipe.save_pretrained(tmp_path / "sd")
    config = tiny_config(tmp_path / "run", pretrained_model=str(tmp_path / "sd"), resolution=16, caption_dropout=1.0,
                         num_sample_images=2)
    trainer = Trainer(config, Distributed())
    batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a red disc", "a blue triangle"]}
    encoded = trainer.task.encode(batch, sample_generators(0, 0, range(2)))
    latents, conditioning, weights = encoded.x0, encoded.conditioning, encoded.sample_weights
    empty = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert latents.shape == (2, 4, 8, 8) and weights is None
    assert torch.equal(conditioning["input_ids"], empty.expand(2, -1))  # all captions dropped
    losses = trainer.run()
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    exported = minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "run")
    assert type(exported.scheduler) is type(pipe.scheduler)  # trained with DDPM's add_noise, exported with its own
    assert exported.scheduler.config.to_dict() == pipe.scheduler.config.to_dict()
    exported.set_progress_bar_config(disable=True)
    image = exported("a green square", height=16, width=16, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    assert os.path.isfile(tmp_path / "run" / "samples.png")
    assert not os.path.exists(os.path.join(checkpoint.list_checkpoints(str(tmp_path / "run"))[-1], "vae"))


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(train_batch_size=0), "train_batch_size must be an int >= 1"),
    (dict(caption_dropout=1.5), r"caption_dropout must lie in \[0, 1\]"),
    (dict(resume="latest", overwrite=True), "resume and overwrite exclude each other"),
    (dict(attention_levels=3), "attention_levels=3 exceeds the 2 UNet levels"),
    (dict(noise_scheduler="euler"), "noise_scheduler='euler' is not supported; accepted values: 'ddpm'"),
    (dict(prediction_type="sample"), "prediction_type='sample' is not supported"),
    (dict(output_dir=""), "output_dir is required"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY, "output_dir": "out", **options}).check()


def test_output_dir_with_another_run_is_refused_unless_resume_or_overwrite(tmp_path):
    train(tiny_config(tmp_path / "run", max_train_steps=3, num_sample_images=0))
    (tmp_path / "run" / "my_notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="output_dir .*run is not empty .*pass --resume .* or --overwrite"):
        train(tiny_config(tmp_path / "run", max_train_steps=3))
    train(tiny_config(tmp_path / "run", max_train_steps=3, overwrite=True, seed=1, num_sample_images=0))
    assert (tmp_path / "run" / "my_notes.txt").read_text() == "keep me"  # only the run's own outputs go
    assert json.load(open(tmp_path / "run" / "checkpoints" / "checkpoint-000003" / "training_state" / "state.json"))[
        "config"]["seed"] == 1


def test_resume_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from in .*empty"):
        train(tiny_config(tmp_path / "empty", resume="latest"))
    with pytest.raises(FileNotFoundError, match="resume path .*nowhere does not exist"):
        train(tiny_config(tmp_path / "new", resume=str(tmp_path / "nowhere")))
    train(tiny_config(tmp_path / "run", max_train_steps=3, num_sample_images=0))
    with pytest.raises(ValueError, match=r"different training options: learning_rate=0.002 \(checkpoint: 0.001\)"):
        train(tiny_config(tmp_path / "run", max_train_steps=6, resume="latest", learning_rate=2e-3))
    with pytest.raises(ValueError, match=r"global batch 8 \(checkpoint: 4\)"):
        train(tiny_config(tmp_path / "run", max_train_steps=6, resume="latest", train_batch_size=8))


def test_batch_larger_than_the_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"global batch \(64 = .*larger than the dataset \(32 images\)"):
        train(tiny_config(tmp_path / "run", train_batch_size=64))
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from minidiff.cli import main

    assert main(["train", "--output-dir", str(tmp_path / "run"), "--train-data-dir", str(tmp_path / "none")]) == 2
    assert "minidiff: error: train_data_dir " in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--train-data-dir", str(tmp_path / "imgs")]) == 2
    assert "no images in" in capsys.readouterr().err


def test_the_exported_pipeline_keeps_its_sampler_with_the_schedule_options_applied(tmp_path):
    tiny_pipeline(minidiff.StableDiffusionPipeline).save_pretrained(tmp_path / "sd")
    train(tiny_config(tmp_path / "run", pretrained_model=str(tmp_path / "sd"), resolution=16, max_train_steps=1,
                      num_sample_images=0, prediction_type="v_prediction"))
    exported = minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "run")
    assert isinstance(exported.scheduler, minidiff.DDIMScheduler)
    assert exported.scheduler.config.prediction_type == "v_prediction"
