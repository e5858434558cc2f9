"""Single-file ControlNet checkpoints (original LDM layout, ``control_model.``): minidiff writes them, diffusers'
converter and from_single_file read them, and minidiff's ControlNetModel.from_single_file gives diffusers' outputs.

A tiny seeded diffusers ControlNet checks numbers end to end (with and without the ``control_model.`` prefix);
full-size SD1.5 / SD2.1 ControlNets on the meta device check key coverage against diffusers' own converter.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.loaders import single_file_utils as ldm

from minidiff.loading import builtin_configs
from minidiff.loading.single_file_controlnet import (
    CONTROLNET_PREFIX, UNET_ONLY_FIELDS, detect_controlnet_config, save_single_file_controlnet, to_ldm_controlnet_state_dict,
)
from minidiff.models import ControlNetModel
from parity.report import compare
from parity.test_controlnet import CASES, FORWARD_TOL, inputs, reference_and_minidiff, residuals
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

# 4 hint widths as the releases (conv_out is input_hint_block.14, where diffusers' converter looks)
SMALL_CASES = {name: CASES[name][0] for name in ("SD1-like (4 levels, conv proj, 8 heads)",
                                                "SD2-like (linear proj, heads per level, upcast)")}


@pytest.mark.parametrize("prefix", [CONTROLNET_PREFIX, ""], ids=["control_model.", "no prefix"])
@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_ldm_controlnet_file_matches_diffusers(tmp_path, case, prefix):
    config = SMALL_CASES[case]
    reference, mine = reference_and_minidiff(config, tmp_path / "folder")
    path = tmp_path / "control.safetensors"
    save_single_file_controlnet(path, mine, prefix=prefix)

    # diffusers' converter turns minidiff's file back into exactly the diffusers state dict
    checkpoint = to_ldm_controlnet_state_dict(mine, prefix)
    converted = ldm.convert_controlnet_checkpoint(checkpoint, dict(config))
    expected = reference.state_dict()
    assert set(converted) == set(expected)
    worst = max(float((converted[k] - expected[k]).abs().max()) for k in expected)
    compare("single-file ControlNet", f"{case}, {prefix or 'no prefix'}: diffusers' converter of minidiff's file "
            "(max weight difference)", worst, 0.0, 0.0, "abs")

    theirs = diffusers.ControlNetModel.from_single_file(str(path), config=str(tmp_path / "folder")).eval()
    loaded = ControlNetModel.from_single_file(path, config=tmp_path / "folder")
    args = inputs(config)
    with torch.no_grad():
        want = residuals(reference, args, {})
        for library, model in (("diffusers from_single_file", theirs), ("minidiff from_single_file", loaded)):
            for got, ref in zip(residuals(model, args, {}), want):
                compare("single-file ControlNet", f"{case}, {prefix or 'no prefix'}: {library} residuals vs "
                        "diffusers ControlNetModel", got, ref, FORWARD_TOL)


def test_float64_and_config_forms(tmp_path):
    """config= as a dict and torch_dtype=float64 give the same model as the folder form."""
    config = SMALL_CASES["SD1-like (4 levels, conv proj, 8 heads)"]
    reference, mine = reference_and_minidiff(config, tmp_path / "folder")
    path = tmp_path / "control.safetensors"
    save_single_file_controlnet(path, mine)
    loaded = ControlNetModel.from_single_file(path, config=dict(config), torch_dtype=torch.float64)
    assert loaded.dtype == torch.float64
    args = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs(config).items()}
    with torch.no_grad():
        for got, ref in zip(residuals(loaded, args, {}), residuals(reference.double(), args, {})):
            compare("single-file ControlNet", "SD1-like float64 (config dict)", got, ref, FORWARD_TOL)


SD1_CONTROLNET = {k: v for k, v in builtin_configs.SD1_UNET.items() if k not in UNET_ONLY_FIELDS}
SD2_CONTROLNET = {k: v for k, v in builtin_configs.SD2_UNET.items() if k not in UNET_ONLY_FIELDS}


@pytest.mark.parametrize("name, config", [("SD1.5", SD1_CONTROLNET), ("SD2.1", SD2_CONTROLNET)])
def test_full_size_key_coverage_matches_diffusers_converter(name, config):
    """A full-size ControlNet (meta device: no memory): every key and shape of minidiff's LDM file is what
    diffusers' converter maps to diffusers' ControlNetModel, and shape detection picks the config back."""
    with torch.device("meta"):
        mine = ControlNetModel(**config)
        reference = diffusers.ControlNetModel(**config)
    checkpoint = to_ldm_controlnet_state_dict(mine)
    converted = ldm.convert_controlnet_checkpoint(checkpoint, dict(config))
    expected = reference.state_dict()
    missing, extra = set(expected) - set(converted), set(converted) - set(expected)
    wrong_shape = [k for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape]
    compare("single-file ControlNet", f"{name} full-size: keys missing + unexpected + wrong-shape in diffusers' "
            "conversion of minidiff's file", len(missing) + len(extra) + len(wrong_shape), 0, 0.0, "abs")
    assert not (missing or extra or wrong_shape), (sorted(missing)[:5], sorted(extra)[:5], wrong_shape[:5])
    detected = detect_controlnet_config(checkpoint, name)
    assert detected == dict(config, in_channels=4, conditioning_channels=3,
                            conditioning_embedding_out_channels=(16, 32, 96, 256))
