"""Bad input to training (issue 11): damaged or inconsistent checkpoints, the log on resume, a full disk while
writing a checkpoint, and bad options and data. Each case is a one-line error naming the file, field or option;
nothing already written is lost. One finished 4-step run (checkpoints at steps 2 and 4) is copied for each case."""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minidiff
from minidiff.training import TrainConfig, Trainer, checkpoint, train
from minidiff.training.distributed import Distributed
from tests.tiny_components import tiny_pipeline
from tests.training_fixtures import TINY, one_thread, tiny_config, write_image  # noqa: F401

RUN = dict(max_train_steps=4, checkpointing_steps=2, num_sample_images=0)
CKPT2, CKPT4 = "checkpoint-000002", "checkpoint-000004"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(folder, **RUN))
    torch.set_num_threads(threads)
    return folder


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run."""
    return pathlib.Path(shutil.copytree(finished_run, tmp_path / "run"))


def state_path(run, name=CKPT4):
    return run / "checkpoints" / name / "training_state" / "state.json"


def edit_state(run, change, name=CKPT4):
    state = json.loads(state_path(run, name).read_text())
    change(state)
    state_path(run, name).write_text(json.dumps(state))


def resume(run, **options):
    return train(tiny_config(run, **{**RUN, "resume": "latest", **options}))


def log_bytes(run):
    return (run / "train_log.jsonl").read_bytes()


# ---- state.json: refuse an inconsistent or malformed state, name the field and the intact checkpoint -------------
def test_losses_shorter_than_step_is_refused_and_the_log_is_untouched(run):
    edit_state(run, lambda s: s.update(losses=s["losses"][:1]))
    before = log_bytes(run)
    with pytest.raises(ValueError, match=rf"state.json in .*{CKPT4}: 'losses' has 1 entries but 'step' is 4; the "
                                         r"checkpoint is inconsistent; resume from the newest intact checkpoint with "
                                         rf"--resume .*{CKPT2}$"):
        resume(run, max_train_steps=6)
    assert log_bytes(run) == before and len(before.splitlines()) == 4


def _delete(key):
    return lambda state: state.pop(key)


def _set(key, value):
    return lambda state: state.update({key: value})


@pytest.mark.parametrize("change, match", [
    (_delete("config"), "'config' is missing"),
    (_delete("losses"), "'losses' is missing"),
    (_delete("optimizer"), "'optimizer' is missing"),
    (_delete("step"), "'step' is missing"),
    (_set("step", "4"), r"'step' must be an int >= 0, got '4' \(str\)"),
    (_set("step", -1), r"'step' must be an int >= 0, got -1 \(int\)"),
    (_set("step", True), r"'step' must be an int >= 0, got True \(bool\)"),
    (_set("step", 4.0), r"'step' must be an int >= 0, got 4.0 \(float\)"),
    (_set("losses", "0.1,0.2"), "'losses' must be a list, got str"),
    (_set("losses", [0.1, "x", 0.3, 0.4]), "'losses' must hold numbers only"),
    (_set("config", [1]), "'config' must be an object, got list"),
    (_set("ema_updates", "4"), "'ema_updates' must be an int, got str"),
    (_set("ema_updates", 9), r"'ema_updates' must lie in \[0, step=4\], got 9"),
    (_set("global_batch_size", 0), "'global_batch_size' must be >= 1, got 0"),
    (_set("optimizer", {"param_groups": 3}), "'optimizer' must be an object with 'param_groups'"),
    (_set("optimizer", {"param_groups": [{"params": ["a"]}], "scalars": {}}),
     r"'optimizer.param_groups\[0\]' must be an object whose 'params' is a list of ints"),
])
def test_malformed_state_json_names_the_field(run, change, match):
    edit_state(run, change)
    with pytest.raises(ValueError, match=rf"state.json in .*{CKPT4}: {match}.*newest intact checkpoint with --resume "
                                         rf".*{CKPT2}$"):
        resume(run, max_train_steps=6)


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a list, not an object"),
                                         ("\xff\xfe", "is not valid JSON")])
def test_state_json_that_is_not_an_object_names_the_path(run, text, match):
    state_path(run).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"(state.json in .*{CKPT4}: |{CKPT4}.*state.json ){match}.*--resume "
                                         rf".*{CKPT2}"):
        resume(run, max_train_steps=6)


@pytest.mark.parametrize("damage, error, match", [
    (lambda c: os.remove(c / "training_state" / "state.json"), FileNotFoundError, r"state.json is missing"),
    (lambda c: os.remove(c / "training_state" / "optimizer.safetensors"), FileNotFoundError,
     "optimizer.safetensors is missing"),
    (lambda c: os.truncate(c / "unet" / "diffusion_pytorch_model.safetensors", 1000), ValueError,
     r"diffusion_pytorch_model.safetensors is not a readable safetensors file \(truncated"),
    (lambda c: os.truncate(c / "training_state" / "rng.safetensors", 100), ValueError,
     "rng.safetensors is not a readable safetensors file"),
])
def test_a_damaged_newest_checkpoint_names_the_last_intact_one(run, damage, error, match):
    damage(run / "checkpoints" / CKPT4)
    for resume_from in ("latest", str(run), str(run / "checkpoints" / CKPT4)):  # latest, the run, the checkpoint
        with pytest.raises(error, match=rf"{CKPT4}.*{match}.*; resume from the newest intact checkpoint with "
                                        rf"--resume .*{CKPT2}$"):
            resume(run, max_train_steps=6, resume=resume_from)


def test_no_intact_checkpoint_left_says_start_over(run):
    for name in (CKPT2, CKPT4):
        os.truncate(run / "checkpoints" / name / "training_state" / "optimizer.safetensors", 10)
    with pytest.raises(ValueError, match="no other intact checkpoint is left in .*run; start over with --overwrite"):
        resume(run, max_train_steps=6)


def test_resuming_from_the_named_intact_checkpoint_works(run):
    os.remove(state_path(run))
    losses = resume(run, resume=str(run / "checkpoints" / CKPT2))
    assert len(losses) == 4 and len(log_bytes(run).splitlines()) == 4


@pytest.mark.parametrize("rng, match", [({"cuda0": torch.zeros(3, dtype=torch.uint8)}, "holds no 'torch' tensor"),
                                        ({"torch": torch.zeros(10, dtype=torch.uint8)},
                                         r"holds 'torch' of torch.uint8 \(10,\), not the CPU generator state"),
                                        ({"torch": torch.zeros(5056)}, "holds 'torch' of torch.float32")])
def test_malformed_rng_state(run, rng, match):
    save_file(rng, run / "checkpoints" / CKPT4 / "training_state" / "rng.safetensors")
    with pytest.raises(ValueError, match=rf"{CKPT4}.*rng.safetensors: {match}"):
        resume(run, max_train_steps=6)


def _optimizer_file(run):
    return run / "checkpoints" / CKPT4 / "training_state" / "optimizer.safetensors"


def test_misshaped_optimizer_tensor_names_parameter_and_shapes(run):
    tensors = load_file(_optimizer_file(run))
    tensors["0.exp_avg"] = tensors["0.exp_avg"][:4]  # conv_in.weight is (8, 3, 3, 3)
    save_file(tensors, _optimizer_file(run))
    with pytest.raises(ValueError, match=r"optimizer.safetensors: '0.exp_avg' \(of parameter conv_in.weight\) has "
                                         r"shape \(4, 3, 3, 3\) but the parameter has \(8, 3, 3, 3\)"):
        resume(run, max_train_steps=6)


def test_optimizer_tensor_of_an_unknown_parameter(run):
    tensors = load_file(_optimizer_file(run))
    tensors["9999.exp_avg"] = torch.zeros(2)
    save_file(tensors, _optimizer_file(run))
    with pytest.raises(ValueError, match=r"key '9999.exp_avg' is not '<parameter index < \d+>.<name>'"):
        resume(run, max_train_steps=6)


def test_optimizer_state_of_another_model(run):
    edit_state(run, lambda s: s["optimizer"]["param_groups"][0].update(params=[0, 1]))
    with pytest.raises(ValueError, match=r"the optimizer state covers 2 parameters but the model has \d+"):
        resume(run, max_train_steps=6)


@pytest.mark.parametrize("option, value, shown", [
    ("block_out_channels", (8, 32), r"\[8, 32\] \(checkpoint: \[8, 16\]\)"),
    ("layers_per_block", 2, r"2 \(checkpoint: 1\)"),
    ("resolution", 16, r"16 \(checkpoint: 8\)"),
])
def test_resume_with_a_changed_architecture_names_the_option(run, option, value, shown):
    with pytest.raises(ValueError, match=rf"different training options: {option}={shown}. Only output_dir, resume, "
                                         r".*max_train_steps.* may change on resume"):
        resume(run, max_train_steps=6, **{option: value})


def test_config_without_an_option_is_reported_as_not_recorded(run):
    edit_state(run, lambda s: s["config"].pop("seed"))
    with pytest.raises(ValueError, match=r"seed=0 \(checkpoint: not recorded\)"):
        resume(run, max_train_steps=6)


# ---- the log on resume: never lose a line from before the checkpoint ----------------------------------------------
def test_resume_from_an_older_checkpoint_keeps_the_earlier_lines_and_reruns_the_rest(run):
    before = log_bytes(run).splitlines(keepends=True)
    losses = resume(run, resume=str(run / "checkpoints" / CKPT2))
    after = log_bytes(run).splitlines(keepends=True)
    assert after[:2] == before[:2]  # untouched
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3, 4]
    assert [json.loads(line)["loss"] for line in after] == pytest.approx(losses, rel=1e-6)


def test_resume_that_would_not_rerun_logged_steps_is_refused(run):
    before = log_bytes(run)
    with pytest.raises(ValueError, match=r"logs steps up to 4, but resuming from step 2 with max_train_steps=3 would "
                                         r"drop the lines of steps 4-4 without re-running them; pass "
                                         r"--max-train-steps 4"):
        resume(run, max_train_steps=3, resume=str(run / "checkpoints" / CKPT2))
    assert log_bytes(run) == before


def test_a_damaged_log_line_is_refused_not_rewritten(run):
    lines = log_bytes(run).splitlines(keepends=True)
    (run / "train_log.jsonl").write_bytes(lines[0] + b"garbage\n" + b"".join(lines[2:]))
    before = log_bytes(run)
    with pytest.raises(ValueError, match=r'train_log.jsonl line 2 is not \{"step": 2, "loss": ...\}: the log is '
                                         r"damaged; move it away"):
        resume(run, max_train_steps=6)
    assert log_bytes(run) == before


def test_a_torn_last_line_is_cut_and_a_missing_log_is_rebuilt(run, tmp_path):
    (run / "train_log.jsonl").write_bytes(log_bytes(run) + b'{"step": 5, "lo')  # killed mid-write
    resume(run, max_train_steps=5)
    assert [json.loads(line)["step"] for line in log_bytes(run).splitlines()] == [1, 2, 3, 4, 5]
    elsewhere = tmp_path / "elsewhere"  # a checkpoint resumed into a new folder: the log comes from state.json
    train(tiny_config(elsewhere, **{**RUN, "resume": str(run / "checkpoints" / CKPT4)}))
    state = json.loads(state_path(run).read_text())
    assert [json.loads(line)["loss"] for line in log_bytes(elsewhere).splitlines()] == state["losses"]


# ---- a full disk while writing a checkpoint -----------------------------------------------------------------------
def _disk_full_at(monkeypatch, name):
    real = checkpoint.save_safetensors

    def save(tensors, path, *args):
        if name in path and path.endswith("optimizer.safetensors"):
            open(path + ".tmp", "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args)

    monkeypatch.setattr(checkpoint, "save_safetensors", save)


def test_disk_full_names_the_last_good_checkpoint_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    _disk_full_at(monkeypatch, CKPT4)
    with pytest.raises(OSError, match=rf"no space left on device while writing checkpoint .*{CKPT4} \(nothing of it "
                                      rf"was kept\); the last good checkpoint is .*{CKPT2}: free some space and "
                                      rf"resume with --resume .*{CKPT2}$") as caught:
        train(tiny_config(tmp_path / "run", **RUN))
    assert caught.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [CKPT2]  # no .tmp-checkpoint-000004


def test_disk_full_when_rewriting_a_step_keeps_the_good_checkpoint(run, monkeypatch):
    before = state_path(run).read_bytes()
    _disk_full_at(monkeypatch, CKPT4)
    with pytest.raises(OSError, match=rf"no space left on device .*the last good checkpoint is .*{CKPT4}"):
        resume(run, resume=str(run / "checkpoints" / CKPT2))
    assert state_path(run).read_bytes() == before
    checkpoint.check_intact(str(run / "checkpoints" / CKPT4))
    assert sorted(os.listdir(run / "checkpoints")) == [CKPT2, CKPT4]


def test_disk_full_before_any_checkpoint_in_the_cli(tmp_path, monkeypatch, capsys):
    from minidiff.cli import main
    from tests.training_fixtures import cli_args

    def full(self, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_write_models", full)
    assert main(["train", *cli_args(tiny_config(tmp_path / "run", **RUN))]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no space left on device" in error
    assert "no checkpoint has been written yet: free some space and start again" in error
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


# ---- options and data -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(learning_rate=-1e-3), r"learning_rate must lie in \(0, inf\) \(a finite number\), got -0.001"),
    (dict(learning_rate=math.nan), r"learning_rate must lie in \(0, inf\)"),
    (dict(learning_rate="1e-3"), r"learning_rate must lie in \(0, inf\) \(a finite number\), got '1e-3'"),
    (dict(train_batch_size=0), "train_batch_size must be an int >= 1, got 0"),
    (dict(max_train_steps=0), "max_train_steps must be an int >= 1, got 0"),
    (dict(max_train_steps=2.0), "max_train_steps must be an int >= 1, got 2.0"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be an int >= 1"),
    (dict(ema_max_decay=1.5), r"ema_max_decay must lie in \[0, 1\)"),
    (dict(ema_max_decay=-0.1), r"ema_max_decay must lie in \[0, 1\)"),
    (dict(ema_max_decay=math.nan), r"ema_max_decay must lie in \[0, 1\)"),
    (dict(ema_power=0.0), r"ema_power must lie in \(0, inf\)"),
    (dict(adam_beta1=1.0), r"adam_beta1 must lie in \[0, 1\)"),
    (dict(adam_beta2=-0.5), r"adam_beta2 must lie in \[0, 1\)"),
    (dict(adam_epsilon=-1e-8), r"adam_epsilon must lie in \[0, inf\)"),
    (dict(adam_weight_decay=math.inf), r"adam_weight_decay must lie in \[0, inf\)"),
    (dict(max_grad_norm=math.nan), r"max_grad_norm must lie in \(0, inf\) \(or None for no clipping\)"),
    (dict(max_grad_norm=0), r"max_grad_norm must lie in \(0, inf\)"),
    (dict(prediction_type="sample"), "prediction_type='sample' is not supported; accepted values: 'epsilon'"),
    (dict(beta_schedule="cosine"), "beta_schedule='cosine' is not supported; accepted values: 'linear'"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be an int >= 1, got 0"),
    (dict(block_out_channels="32,64,64"), "block_out_channels must be a non-empty sequence of ints >= 1"),
    (dict(block_out_channels=(8, 0)), r"block_out_channels .*, got \(8, 0\)"),
    (dict(block_out_channels=()), "block_out_channels must be a non-empty sequence"),
    (dict(random_flip="no"), r"random_flip must be True, False or None \(its default for the method\), got 'no'"),
    (dict(seed=2 ** 64), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(seed=-1), "seed must be an int >= 0"),
    (dict(resolution=4), "resolution must be an int >= 8, got 4"),
    (dict(train_data_dir=5), r"train_data_dir must be a path \(str or os.PathLike\), got 5"),
    (dict(checkpoints_total_limit=0), "checkpoints_total_limit must be an int >= 1"),
])
def test_bad_options_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY, "output_dir": "out", **options}).check()


def test_cli_option_errors_are_one_line(tmp_path, capsys):
    from minidiff.cli import main

    assert main(["train", "--output-dir", str(tmp_path / "run"), "--learning-rate", "-1"]) == 2
    expected = "minidiff: error: learning_rate must lie in (0, inf) (a finite number), got -1.0\n"
    assert capsys.readouterr().err == expected
    with pytest.raises(SystemExit):
        main(["train", "--output-dir", str(tmp_path / "run"), "--block-out-channels", "8,x"])
    assert "expected comma-separated ints such as 32,64,64, got '8,x'" in capsys.readouterr().err


def test_path_options_may_be_pathlib_paths(tmp_path):
    config = TrainConfig(output_dir=tmp_path / "run", train_data_dir=tmp_path / "data").check()
    assert config.output_dir == str(tmp_path / "run")
    json.dumps(config.trajectory_options)  # what state.json stores


@pytest.mark.parametrize("levels, resolution, match", [((8, 16, 16), 10, "resolution 10 must be a multiple of 4 "
                                                        r"\(2\^2 for a UNet with 3 levels\); try --resolution 8"),
                                                       ((8, 16), 9, "resolution 9 must be a multiple of 2")])
def test_resolution_must_fit_the_unet_downsampling(tmp_path, levels, resolution, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(tmp_path / "run", block_out_channels=levels, resolution=resolution))
    assert not os.path.exists(tmp_path / "run")


def test_resolution_must_fit_the_vae_and_the_latent_unet(tmp_path):
    pipe = tiny_pipeline(minidiff.StableDiffusionPipeline)
    pipe.save_pretrained(tmp_path / "sd")
    factor, levels = pipe.vae_scale_factor, len(pipe.unet.config.block_out_channels)
    multiple = factor * 2 ** (levels - 1)
    bad = 4 * multiple + factor
    with pytest.raises(ValueError, match=rf"resolution {bad} must be a multiple of {multiple} \(the "
                                         rf"VAE's downsampling {factor} x 2\^{levels - 1}"):
        Trainer(tiny_config(tmp_path / "run", pretrained_model=str(tmp_path / "sd"), resolution=bad),
                Distributed())


def test_bad_data_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("no images")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "file.png").write_bytes(b"")
    write_image(tmp_path / "loose" / "a.png")
    cases = [(tmp_path / "missing", FileNotFoundError, "train_data_dir .*missing does not exist"),
             (tmp_path / "file.png", ValueError, "train_data_dir .*file.png is a file; pass a folder"),
             (tmp_path / "empty", ValueError, "no images in .*empty"),
             (tmp_path / "text", ValueError, "no images in .*text"),
             (tmp_path / "broken", ValueError, "cannot read image file .*a.png")]
    for folder, error, match in cases:
        with pytest.raises(error, match=match):
            train(tiny_config(tmp_path / "run", train_data_dir=str(folder)))
    with pytest.raises(ValueError, match="needs one subfolder per class .* e.g. a.png"):
        train(tiny_config(tmp_path / "run", train_data_dir=str(tmp_path / "loose"), class_conditional=True))


def test_disk_full_while_exporting_says_the_checkpoint_is_complete_and_resume_exports(tmp_path, monkeypatch):
    from minidiff.training.tasks import PixelDiffusion

    real = PixelDiffusion.save

    def save(self, folder, unet, complete=True):
        if complete:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, folder, unet, complete)

    monkeypatch.setattr(PixelDiffusion, "save", save)
    with pytest.raises(OSError, match="no space left on device while exporting the trained model to .*run; the "
                                      "checkpoint of step 4 is complete: free some space and run again with --resume"):
        train(tiny_config(tmp_path / "run", **RUN))
    monkeypatch.undo()
    assert resume(tmp_path / "run") and os.path.isfile(tmp_path / "run" / "unet" / "config.json")
    assert len(log_bytes(tmp_path / "run").splitlines()) == 4
