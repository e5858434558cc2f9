"""diffusers' save/load keywords, against diffusers 0.42.1: sharded weights (``max_shard_size``) and variants read
by the other library, ``dtype`` (alias and per-component dict), ``device_map``, ``low_cpu_mem_usage``,
``output_loading_info``; what minidiff refuses (pickles, split device maps) is refused with the reason."""

from __future__ import annotations

import json
import os

import diffusers
import pytest
import torch

import minidiff
from parity.pipeline_fixtures import reference_components
from parity.report import compare, compare_exact
from parity.test_unets import cond, inputs, reference_and_minidiff, run

COMPONENT = "Save/load keywords"
CONFIG = cond(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"))
SHARD = "40KB"  # the tiny UNet is ~170 KB of float32: several shards


def shard_files(folder, variant=None) -> list[str]:
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    return sorted(f for f in os.listdir(folder) if f.startswith(stem + "-") and f.endswith(".safetensors"))


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_weights_cross_both_ways(tmp_path, variant):
    reference, mine = reference_and_minidiff("UNet2DConditionModel", CONFIG, tmp_path / "ref")
    args = inputs("UNet2DConditionModel", CONFIG)
    mine.save_pretrained(tmp_path / "mine", variant=variant, max_shard_size=SHARD)
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    with open(tmp_path / "mine" / index) as handle:
        weight_map = json.load(handle)["weight_map"]
    assert len(shard_files(tmp_path / "mine", variant)) == len(set(weight_map.values())) > 2
    loaded_by_diffusers = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "mine", variant=variant).eval()
    compare_exact(COMPONENT, "minidiff's shards read by diffusers", run(loaded_by_diffusers, args)[0],
                  run(reference, args)[0])
    reference.save_pretrained(tmp_path / "ref_sharded", variant=variant, max_shard_size=SHARD)
    assert len(shard_files(tmp_path / "ref_sharded", variant)) > 2
    ours = minidiff.UNet2DConditionModel.from_pretrained(tmp_path / "ref_sharded", variant=variant)
    compare_exact(COMPONENT, "diffusers' shards read by minidiff", run(ours, args)[0], run(mine, args)[0])
    mine.save_pretrained(tmp_path / "mine", variant=variant)  # one file again: the stale shards are removed
    assert shard_files(tmp_path / "mine", variant) == [] and not os.path.exists(tmp_path / "mine" / index)


def test_from_pretrained_keywords_match_diffusers(tmp_path):
    reference, _ = reference_and_minidiff("UNet2DConditionModel", CONFIG, tmp_path)
    for options in (dict(dtype=torch.float16), dict(torch_dtype=torch.bfloat16, low_cpu_mem_usage=False),
                    dict(device_map="cpu"), dict(device_map={"": "cpu"})):
        ours = minidiff.UNet2DConditionModel.from_pretrained(tmp_path, **options)
        theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, **options)
        assert (ours.dtype, ours.device) == (theirs.dtype, theirs.device), options
    ours, info = minidiff.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    _, reference_info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info == {key: list(value) for key, value in reference_info.items()}  # all empty: a strict, complete load
    assert not ours.training


def test_pipeline_variant_shards_and_dtype_dict(tmp_path):
    components = reference_components(tmp_path)
    reference = diffusers.StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    reference.save_pretrained(tmp_path / "ref")
    mine = minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "ref")
    mine.save_pretrained(tmp_path / "mine", variant="fp16", max_shard_size=SHARD)
    assert len(shard_files(tmp_path / "mine" / "unet", "fp16")) > 2
    back = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "mine", variant="fp16")
    for name in ("unet", "vae", "text_encoder"):
        for (key, ours), (_, theirs) in zip(sorted(getattr(back, name).state_dict().items()),
                                            sorted(components[name].state_dict().items())):
            compare_exact(COMPONENT, f"pipeline {name} via fp16 variant shards", ours, theirs)
    dtypes = {"unet": torch.bfloat16, "default": torch.float16}
    ours = minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "ref", dtype=dtypes)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ref", dtype=dtypes)
    assert {n: ours.components[n].dtype for n in ("unet", "vae", "text_encoder")} == {
        n: theirs.components[n].dtype for n in ("unet", "vae", "text_encoder")}
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=bf16`, but no such"):
        minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "ref", variant="bf16")
    image = minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "mine", variant="fp16", device_map="cpu")(
        "a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
        output_type="pt").images
    expected = mine("a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    compare(COMPONENT, "pipeline loaded from its fp16 variant shards", image, expected, 0.0, metric="abs")


def test_refusals_name_the_reason(tmp_path):
    _, mine = reference_and_minidiff("UNet2DConditionModel", CONFIG, tmp_path / "ref")
    with pytest.raises(ValueError, match="safe_serialization=False would write pickled weights"):
        mine.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match=r"max_shard_size='10 parsecs' is not a size"):
        mine.save_pretrained(tmp_path / "x", max_shard_size="10 parsecs")
    assert not os.path.exists(tmp_path / "x")  # refused before anything is written
    with pytest.raises(ValueError, match="splits the model across devices"):
        minidiff.UNet2DConditionModel.from_pretrained(tmp_path / "ref", device_map={"conv_in": 0, "conv_out": 1})
    with pytest.raises(ValueError, match="use_safetensors=False asks for pickled weights"):
        minidiff.UNet2DConditionModel.from_pretrained(tmp_path / "ref", use_safetensors=False)
    with pytest.raises(ValueError, match="torch_dtype=torch.float16 and dtype=torch.bfloat16 disagree"):
        minidiff.UNet2DConditionModel.from_pretrained(tmp_path / "ref", torch_dtype=torch.float16,
                                                      dtype=torch.bfloat16)
    mine.save_pretrained(tmp_path / "fp16", variant="fp16")
    with pytest.raises(OSError, match=r"(?s)(?=.*Error no file named diffusion_pytorch_model.bin found in directory)"
                                      r"(?=.*try variant=)"):  # diffusers' words (a test matches them), and the fix
        minidiff.UNet2DConditionModel.from_pretrained(tmp_path / "fp16")
    unet = minidiff.UNet2DModel(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                up_block_types=("UpBlock2D",) * 2)
    pipe = minidiff.DDIMPipeline(unet=unet, scheduler=minidiff.DDIMScheduler())
    with pytest.raises(ValueError, match="safe_serialization=False would write pickled weights"):
        pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False)
