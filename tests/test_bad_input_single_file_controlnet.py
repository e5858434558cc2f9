"""Bad single-file ControlNet checkpoints give one ValueError/TypeError naming the file, the key, the shapes and
the fix: pickled files, SD/UNet checkpoints given as ControlNets, truncated or padded key sets, wrong shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from minidiff.loading.single_file import save_single_file
from minidiff.loading.single_file_controlnet import (
    CONTROLNET_PREFIX, save_single_file_controlnet, to_ldm_controlnet_state_dict,
)
from minidiff.models import ControlNetModel, UNet2DConditionModel
from tests.test_bad_input_controlnet import CONTROLNET, UNET
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)


@pytest.fixture(scope="module")
def controlnet():
    torch.manual_seed(0)
    return ControlNetModel(**CONTROLNET).eval()


@pytest.fixture
def ldm_state(controlnet):
    return {k: v.contiguous() for k, v in to_ldm_controlnet_state_dict(controlnet).items()}


def write(tmp_path, state, name="control.safetensors"):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_round_trip_loads(tmp_path, controlnet):
    path = tmp_path / "control.safetensors"
    save_single_file_controlnet(path, controlnet)
    loaded = ControlNetModel.from_single_file(path, config=dict(CONTROLNET))
    for key, tensor in controlnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", ["control_sd15_canny.pth", "control.ckpt", "control.bin"])
def test_pickled_file_is_refused_unread(tmp_path, controlnet, name):
    path = tmp_path / name
    torch.save(controlnet.state_dict(), path)
    with pytest.raises(ValueError, match=rf"reads \.safetensors files only; .*{name} is a pickled checkpoint, which "
                                         r"minidiff never unpickles: convert it to \.safetensors"):
        ControlNetModel.from_single_file(path, config=dict(CONTROLNET))


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "control.safetensors"
    path.write_bytes(b"not a safetensors header at all")
    with pytest.raises(ValueError, match=r"control\.safetensors is not a readable safetensors file"):
        ControlNetModel.from_single_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ControlNet checkpoint .*absent\.safetensors does not exist"):
        ControlNetModel.from_single_file(tmp_path / "absent.safetensors")


def test_sd_unet_checkpoint_is_not_a_controlnet(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "v1-5-pruned.safetensors"
    save_single_file(path, unet=UNet2DConditionModel(**UNET))
    with pytest.raises(ValueError, match=r"v1-5-pruned\.safetensors is a Stable Diffusion \(UNet\) checkpoint, not a "
                                         r"ControlNet: .*UNet2DConditionModel\.from_single_file"):
        ControlNetModel.from_single_file(path)


def test_unknown_file_names_its_keys(tmp_path):
    path = write(tmp_path, {"foo.bar.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"is not a ControlNet checkpoint: .*keys start with \['foo\.bar'\]"):
        ControlNetModel.from_single_file(path)


def test_truncated_key_set(tmp_path, ldm_state):
    dropped = [k for k in ldm_state if k.startswith(CONTROLNET_PREFIX + "zero_convs.")]
    path = write(tmp_path, {k: v for k, v in ldm_state.items() if k not in dropped})
    with pytest.raises(ValueError, match=rf"lacks {len(dropped)} ControlNetModel tensor\(s\): "
                                         r"control_model\.zero_convs\.0\.0\.weight"):
        ControlNetModel.from_single_file(path, config=dict(CONTROLNET))


def test_left_over_key(tmp_path, ldm_state):
    path = write(tmp_path, dict(ldm_state, **{CONTROLNET_PREFIX + "zero_convs.9.0.weight": torch.zeros(8, 8, 1, 1)}))
    with pytest.raises(ValueError, match=r"has 1 ControlNet tensor\(s\) this ControlNetModel does not use: "
                                         r"control_model\.zero_convs\.9\.0\.weight \(is the config right"):
        ControlNetModel.from_single_file(path, config=dict(CONTROLNET))


def test_wrong_shape(tmp_path, ldm_state):
    key = CONTROLNET_PREFIX + "middle_block_out.0.weight"
    path = write(tmp_path, dict(ldm_state, **{key: torch.zeros(16, 8, 1, 1)}))
    with pytest.raises(ValueError, match=r"control_model\.middle_block_out\.0\.weight has shape \(16, 8, 1, 1\), "
                                         r"ControlNetModel expects \(16, 16, 1, 1\) for controlnet_mid_block\.weight"):
        ControlNetModel.from_single_file(path, config=dict(CONTROLNET))


def test_detected_sd15_config_does_not_fit_a_tiny_file(tmp_path, ldm_state):
    """Without config= the family is told from the first cross-attention; a tiny file then fails on a shape."""
    tiny = dict(CONTROLNET, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_single_file_controlnet(path, ControlNetModel(**tiny))
    with pytest.raises(ValueError, match=r"has shape \(.*\), ControlNetModel expects \(320, 4, 3, 3\) for "
                                         r"conv_in\.weight \(is the config right"):
        ControlNetModel.from_single_file(path)


def test_undetectable_family_asks_for_config(tmp_path, ldm_state):
    key = CONTROLNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    path = write(tmp_path, {k: v for k, v in ldm_state.items() if k != key})
    with pytest.raises(ValueError, match=r"has no control_model\.input_blocks\.1\.1\.transformer_blocks\.0\.attn2"
                                         r"\.to_k\.weight, so its model family .* pass config="):
        ControlNetModel.from_single_file(path)


def test_diffusers_layout_needs_config(tmp_path, controlnet):
    path = write(tmp_path, {k: v.contiguous() for k, v in controlnet.state_dict().items()})
    with pytest.raises(ValueError, match=r"is in diffusers' layout, whose config cannot be told from shapes: pass "
                                         r"config="):
        ControlNetModel.from_single_file(path)
    assert ControlNetModel.from_single_file(path, config=dict(CONTROLNET)).config == controlnet.config


@pytest.mark.parametrize("config, error, message", [
    (42, TypeError, r"config= for .* must be a ControlNet config \(dict, ControlNetConfig\) or a local folder"),
    (dict(CONTROLNET, upsample="yes"), ValueError, r"config= has config field\(s\) \['upsample'\]"),
])
def test_bad_config_argument(tmp_path, ldm_state, config, error, message):
    path = write(tmp_path, ldm_state)
    with pytest.raises(error, match=message):
        ControlNetModel.from_single_file(path, config=config)


def test_save_refuses_other_suffixes(tmp_path, controlnet):
    with pytest.raises(ValueError, match=r"writes \.safetensors only, got .*control\.ckpt"):
        save_single_file_controlnet(tmp_path / "control.ckpt", controlnet)
