"""Single-file (LDM) checkpoints on minidiff alone: round trip, EMA, skipped buffers, and errors that name keys."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import minidiff
from minidiff.loading.single_file import detect_variant, load_single_file, save_single_file, to_ldm_state_dict
from tests.tiny_components import tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    pipe = tiny_pipeline(minidiff.StableDiffusionPipeline)
    pipe.save_pretrained(folder / "pipe")
    state = to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    return pipe, folder, state


def write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_round_trip_gives_identical_weights_and_skips_schedule_buffers(saved, tmp_path):
    pipe, folder, state = saved
    extra = {"betas": torch.ones(1000), "alphas_cumprod": torch.ones(1000), "posterior_variance": torch.ones(1000),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    path = write(tmp_path / "m.safetensors", {**state, **extra})
    loaded = load_single_file(path, config=folder / "pipe")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), loaded[name].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    pipeline = minidiff.StableDiffusionPipeline.from_single_file(str(path), config=folder / "pipe")
    assert isinstance(pipeline.scheduler, minidiff.DDIMScheduler)


def test_ema_weights_are_used_when_asked(saved, tmp_path):
    pipe, folder, state = saved
    ema = {"model_ema." + "diffusion_model" + k[len("model.diffusion_model."):].replace(".", ""): v + 1
           for k, v in state.items() if k.startswith("model.diffusion_model.")}
    path = write(tmp_path / "ema.safetensors", {**state, **ema})
    plain = load_single_file(path, config=folder / "pipe")["unet"]
    with_ema = load_single_file(path, config=folder / "pipe", use_ema=True)["unet"]
    key = "conv_in.weight"
    assert torch.equal(with_ema.state_dict()[key], plain.state_dict()[key] + 1)


def test_missing_and_leftover_tensors_are_named(saved, tmp_path):
    pipe, folder, state = saved
    broken = dict(state)
    del broken["model.diffusion_model.out.2.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 unet tensor\(s\): model.diffusion_model.out.2.weight"):
        load_single_file(write(tmp_path / "a.safetensors", broken), config=folder / "pipe")
    with pytest.raises(ValueError, match=r"1 tensor\(s\) no model uses: model.diffusion_model.extra.weight"):
        load_single_file(write(tmp_path / "b.safetensors", {**state, "model.diffusion_model.extra.weight": torch.ones(1)}),
                         config=folder / "pipe")


def test_shape_mismatch_names_key_and_shapes(saved, tmp_path):
    pipe, folder, state = saved
    broken = dict(state, **{"model.diffusion_model.out.2.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"out.2.bias has shape \(7,\), unet expects \(4,\)"):
        load_single_file(write(tmp_path / "c.safetensors", broken), config=folder / "pipe")


def test_a_tensor_with_the_right_count_but_the_wrong_shape_is_refused_not_reshaped(saved, tmp_path):
    pipe, folder, state = saved
    key = next(k for k, v in state.items() if k.startswith("model.diffusion_model.") and v.ndim == 4
               and v.shape[2:] == (3, 3) and v.shape[0] != v.shape[1])  # a 3x3 conv with in != out channels
    swapped = state[key].transpose(0, 1).contiguous()  # (I, O, 3, 3): as many numbers, another layout
    with pytest.raises(ValueError, match=rf"{key} has shape \({swapped.shape[0]}, {swapped.shape[1]}, 3, 3\)"):
        load_single_file(write(tmp_path / "t.safetensors", dict(state, **{key: swapped})), config=folder / "pipe")
    linear = next(k for k, v in state.items() if k.endswith("proj_in.weight") and v.ndim == 4)  # a 1x1 conv
    as_linear = dict(state, **{linear: state[linear][:, :, 0, 0]})  # (O, I): the reshape files may need
    loaded = load_single_file(write(tmp_path / "l.safetensors", as_linear), config=folder / "pipe")["unet"]
    ours, theirs = pipe.unet.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_variant_detection_and_not_a_checkpoint(tmp_path):
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    to_k = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_variant({conv: torch.zeros(320, 4, 3, 3), to_k: torch.zeros(320, 768)}, "x") == "sd1"
    assert detect_variant({conv: torch.zeros(320, 9, 3, 3), to_k: torch.zeros(320, 1024)}, "x") == "sd2-inpaint"
    with pytest.raises(ValueError, match="not a Stable Diffusion LDM checkpoint"):
        load_single_file(write(tmp_path / "d.safetensors", {"weight": torch.ones(2)}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_single_file(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="writes .safetensors only"):
        save_single_file(tmp_path / "x.ckpt")
