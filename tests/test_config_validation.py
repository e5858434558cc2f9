"""Config values are checked against their dataclass annotations (minidiff.configuration.build_config), for
schedulers and models alike: a wrong type is a one-line TypeError naming the option, the value and the expected
type, raised before a model builds any layer; JSON lists become tuples for tuple fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minidiff import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from minidiff.configuration import build_config, checked_value, describe_type
from minidiff.models.vae import AutoencoderKLConfig
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

UNET = dict(block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=12, attention_head_dim=2,
            layers_per_block=1, sample_size=16)


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("num_train_timesteps", "1", "expected int"),  # a string for an int
        ("num_train_timesteps", 4.0, "expected int"),  # an integral float is not an int
        ("num_train_timesteps", True, "expected int"),  # a bool is not an int
        ("steps_offset", None, "expected int"),  # None where the field is not Optional
        ("beta_start", "0.0001", "expected float"),  # a string for a float
        ("clip_sample", 1, "expected bool"),  # an int for a bool
        ("clip_sample", "false", "expected bool"),
        ("beta_schedule", 3, "expected str"),
        ("trained_betas", "0.1,0.2", r"expected a list of float or None"),  # a string for a list
        ("trained_betas", [0.1, "0.2"], r"expected a list of float or None"),  # an item of the wrong type
        ("trained_betas", {"a": 0.1}, r"expected a list of float or None"),
    ],
)
def test_scheduler_option_of_the_wrong_type(option, value, expected):
    with pytest.raises(TypeError, match=rf"DDIMScheduler config option {option}=.* has the wrong type .*; {expected}"):
        DDIMScheduler(**{option: value})


def test_dpm_solver_order_must_be_an_int_not_a_float_or_bool():
    for value in (2.0, True):
        with pytest.raises(TypeError, match=r"solver_order=.* has the wrong type .*; expected int"):
            DPMSolverMultistepScheduler(solver_order=value)


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("block_out_channels", "32,64,64", r"block_out_channels='32,64,64' has the wrong type str"),  # not characters
        ("block_out_channels", [8, "16"], r"block_out_channels=\[8, '16'\] has the wrong type list"),
        ("in_channels", "4", r"in_channels='4' has the wrong type str; expected int"),
        ("in_channels", 4.0, r"in_channels=4.0 has the wrong type float; expected int"),
        ("in_channels", None, r"in_channels=None has the wrong type NoneType; expected int"),
        ("center_input_sample", 0, r"center_input_sample=0 has the wrong type int; expected bool"),
        ("norm_eps", "1e-5", r"norm_eps='1e-5' has the wrong type str; expected float"),
        ("down_block_types", "CrossAttnDownBlock2D", r"down_block_types='CrossAttnDownBlock2D' has the wrong type"),
    ],
)
def test_unet_option_of_the_wrong_type_fails_before_building_layers(option, value, expected, monkeypatch):
    built = []
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", lambda *args, **kwargs: built.append(args))
    with pytest.raises(TypeError, match=rf"UNet2DConditionModel config option {expected}"):
        UNet2DConditionModel(**{**UNET, option: value})
    assert built == [], "a layer was built before the config was checked"


def test_unet_config_json_of_the_wrong_type_names_the_file(tmp_path):
    folder = tmp_path / "unet"
    UNet2DConditionModel(**UNET).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layers_per_block": "1"}))
    with pytest.raises(TypeError, match=r"config\.json.*layers_per_block='1' has the wrong type str"):
        UNet2DConditionModel.from_pretrained(folder)


def test_json_lists_become_tuples_for_tuple_fields_and_stay_lists_in_json():
    unet = UNet2DConditionModel(**UNET)
    assert unet.config.block_out_channels == (8, 16) and unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert unet.config.to_dict()["block_out_channels"] == [8, 16]
    config = build_config(AutoencoderKLConfig, "AutoencoderKL", {"sample_size": [32, 32], "latents_mean": [0, 0.5]})
    assert config.sample_size == (32, 32) and config.latents_mean == (0, 0.5)


def test_accepted_values_that_real_configs_hold():
    """JSON integers for float options, numpy scalars, trained_betas as an array or tensor (as diffusers allows)."""
    scheduler = DDIMScheduler(beta_start=np.float64(0.0001), beta_end=1 / 50, num_train_timesteps=np.int64(10),
                              trained_betas=np.linspace(0.001, 0.02, 10))
    assert scheduler.config.num_train_timesteps == 10 and isinstance(scheduler.config.num_train_timesteps, int)
    assert DDIMScheduler(num_train_timesteps=10, trained_betas=torch.linspace(0.001, 0.02, 10)).betas.shape == (10,)
    assert checked_value(1, float) == 1 and checked_value(None, int | None) is None


def test_describe_type_reads_like_the_json_it_expects():
    assert describe_type(tuple[int, ...] | None) == "a list of int or None"
    assert describe_type(int | tuple[int, int]) == "int or a list of 2 (int, int)"
