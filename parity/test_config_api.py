"""Config API that diffusers' tests and users' code rely on, against diffusers 0.42.1: ``_use_default_values`` in
``config``, ``register_to_config``, deprecated direct config reads (a FutureWarning), the AttributeError text, the
constructor signatures, ``_deprecated_kwargs``, DDPM/DDIM ``_get_variance`` and DDPM's ``variance_type=None``."""

from __future__ import annotations

import inspect
import warnings

import diffusers
import pytest
import torch

import minidiff
from minidiff.schedulers.base import SCHEDULER_NAMES
from parity.configs import assert_same_config
from parity.report import compare

COMPONENT = "Schedulers"
SCHEDULERS = list(SCHEDULER_NAMES)
MODELS = {"UNet2DModel": dict(block_out_channels=(8, 16), norm_num_groups=8, sample_size=8,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D")),
          "AutoencoderKL": dict(block_out_channels=(8,), norm_num_groups=8, latent_channels=2)}


def pair(name: str, **options):
    return getattr(minidiff, name)(**options), getattr(diffusers, name)(**options)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_default_values_signature_and_register_to_config(name, tmp_path):
    mine, ref = pair(name, beta_start=0.0002, num_train_timesteps=900)
    assert_same_config(mine.config, ref.config)  # the same options, the same ones left at their default
    assert_same_config(type(mine).from_config(ref.config).config, type(ref).from_config(ref.config).config)
    mine.save_pretrained(tmp_path)
    assert "_use_default_values" not in type(mine).from_pretrained(tmp_path).config  # every option was in the file
    # the constructor lists the options (no **kwargs, so no _deprecated_kwargs either); all are diffusers' options
    ours = set(inspect.signature(type(mine).__init__).parameters) - {"self"}
    assert ours <= set(inspect.signature(type(ref).__init__).parameters) and ours == set(mine.config.field_names())
    assert type(mine)._deprecated_kwargs == []
    for scheduler in (mine, ref):
        scheduler.register_to_config(test_attribute=5, steps_offset=1)
        assert scheduler.config["test_attribute"] == 5 and scheduler.config["steps_offset"] == 1
        with pytest.warns(FutureWarning, match="test_attribute"):
            assert scheduler.test_attribute == 5
        with pytest.raises(AttributeError) as error:
            scheduler.does_not_exist
        assert str(error.value) == f"'{name}' object has no attribute 'does_not_exist'"
    mine.save_pretrained(tmp_path / "again")
    assert type(ref).from_pretrained(tmp_path / "again").config["steps_offset"] == 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_register_to_config_and_direct_reads(name):
    mine, ref = pair(name, **MODELS[name])
    for model in (mine, ref):
        model.register_to_config(test_attribute=5)
        with pytest.warns(FutureWarning):
            assert model.test_attribute == 5
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # parameters and submodules read as before, with no warning
            assert model.time_embedding if name == "UNet2DModel" else model.encoder.conv_in.weight is not None
        with pytest.raises(AttributeError) as error:
            model.does_not_exist
        assert str(error.value) == f"'{name}' object has no attribute 'does_not_exist'"
    assert mine.config["test_attribute"] == ref.config["test_attribute"]


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned"])
def test_ddpm_get_variance(variance_type):
    mine, ref = pair("DDPMScheduler", variance_type=variance_type)
    predicted = torch.tensor(0.3)
    for t in (0, 1, 487, 999):
        compare(COMPONENT, f"DDPM _get_variance {variance_type}", mine._get_variance(t, predicted),
                ref._get_variance(t, predicted), 1e-6)


def test_ddim_get_variance():
    mine, ref = pair("DDIMScheduler", set_alpha_to_one=False)
    for t, prev in ((0, 0), (420, 400), (980, 960), (999, 998), (10, -1)):
        compare(COMPONENT, "DDIM _get_variance", mine._get_variance(t, prev), ref._get_variance(t, prev), 1e-6)


def test_ddpm_from_a_dpm_solver_config_takes_variance_type_none():
    """A saved DPM-Solver config holds ``variance_type: null``; DDPM built from it steps as fixed_small, as in
    diffusers."""
    dpm = diffusers.DPMSolverMultistepScheduler(variance_type=None, beta_schedule="scaled_linear")
    mine, ref = minidiff.DDPMScheduler.from_config(dpm.config), diffusers.DDPMScheduler.from_config(dpm.config)
    assert mine.config.variance_type is None
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for scheduler in (mine, ref):
        scheduler.set_timesteps(5)
    for t in mine.timesteps:
        a = mine.step(0.5 * x, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        b = ref.step(0.5 * x, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        compare(COMPONENT, "DDPM variance_type=None", a, b, 1e-6)


SEEDED = {
    "UNet2DModel": dict(block_out_channels=(4, 8), layers_per_block=2, norm_num_groups=4, sample_size=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "UNet2DConditionModel": dict(block_out_channels=(8, 16), layers_per_block=2, sample_size=16, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=2,
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16),
    "AutoencoderKL": dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4),
    "ControlNetModel": dict(block_out_channels=(8, 16), layers_per_block=2, down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
        conditioning_embedding_out_channels=(4, 8)),
    "UNet2DModel NCSN++": dict(block_out_channels=(32, 64, 32), layers_per_block=2, time_embedding_type="fourier",
                               norm_num_groups=None, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D",
                                                                       "SkipDownBlock2D"),
                               up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D")),
}


@pytest.mark.parametrize("case", sorted(SEEDED))
def test_a_seed_gives_diffusers_initial_weights(case):
    """``torch.manual_seed(s); Model(**config)`` builds diffusers' weights exactly: the layers are created in its
    order (diffusers' own fast tests build their dummy models this way and expect its numbers)."""
    name = case.split()[0]
    torch.manual_seed(0)
    theirs = getattr(diffusers, name)(**SEEDED[case]).state_dict()
    torch.manual_seed(0)
    ours = getattr(minidiff, name)(**SEEDED[case]).state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        compare(f"Seeded init ({name})", "weights drawn under the same seed", ours[key], tensor, 0.0, metric="abs")
