"""LoRA file formats alone: layout detection, rule-based module names, every bad input, read/write round trips."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import minidiff
from minidiff.adapters.lora_formats import (LORA_ADAPTER_METADATA_KEY, LoRAWeights, parse_lora, read_lora_file,
                                            write_lora_file)
from tests.tiny_components import tiny_components

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
TE_Q = "encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def models():
    components = tiny_components()
    return {"unet": components["unet"], "text_encoder": components["text_encoder"]}


@pytest.fixture(scope="module")
def sd2_unet():
    torch.manual_seed(0)
    return minidiff.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=(2, 4), use_linear_projection=True,
    )


def pair(out_dim, in_dim, rank=2, kernel=()):
    """down (rank, in[, k, k]) and up (out, rank[, 1, 1]) filled with seeded numbers."""
    generator = torch.Generator().manual_seed(out_dim * 100 + in_dim)
    ones = (1, 1) if kernel else ()
    return (torch.randn(rank, in_dim, *kernel, generator=generator),
            torch.randn(out_dim, rank, *ones, generator=generator))


def kohya(name, down, up, alpha=None):
    keys = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    return keys if alpha is None else {**keys, f"{name}.alpha": torch.tensor(float(alpha))}


def parse(tensors, models, metadata=None):
    return parse_lora(tensors, metadata or {}, "lora.safetensors", models)


def check(weights: LoRAWeights, down, up, alpha):
    assert torch.equal(weights.down, down) and torch.equal(weights.up, up) and weights.alpha == alpha


# ---------------------------------------------------------------------------------------------------------- layouts

def test_peft_keys_with_prefixes_and_metadata_alpha(models):
    down, up = pair(16, 16)
    te_down, te_up = pair(16, 16, rank=4)
    config = {"unet.lora_alpha": 8, "unet.r": 2, "text_encoder.lora_alpha": 2, "text_encoder.r": 4}
    tensors = {f"unet.{ATTN}.to_q.lora_A.weight": down, f"unet.{ATTN}.to_q.lora_B.weight": up,
               f"text_encoder.text_model.{TE_Q}.lora_A.weight": te_down,
               f"text_encoder.text_model.{TE_Q}.lora_B.weight": te_up}
    parsed = parse(tensors, models, {LORA_ADAPTER_METADATA_KEY: json.dumps(config)})
    check(parsed["unet"][f"{ATTN}.to_q"], down, up, 8.0)
    check(parsed["text_encoder"][TE_Q], te_down, te_up, 2.0)
    assert parsed["unet"][f"{ATTN}.to_q"].rank == 2


def test_peft_without_metadata_means_alpha_equals_rank_and_unprefixed_keys_are_the_unets(models):
    down, up = pair(16, 16)
    parsed = parse({f"{ATTN}.to_k.lora_A.weight": down, f"{ATTN}.to_k.lora_B.weight": up}, models)
    assert list(parsed) == ["unet"]
    check(parsed["unet"][f"{ATTN}.to_k"], down, up, None)


def test_peft_alpha_pattern_matches_the_end_of_the_module_path_as_peft_does(models):
    down, up = pair(16, 16)
    tensors = {f"unet.{ATTN}.{name}.lora_{ab}.weight": tensor for name in ("to_q", "to_v")
               for ab, tensor in (("A", down), ("B", up))}
    config = {"unet.lora_alpha": 4, "unet.alpha_pattern": {"attn1.to_v": 1.5}}
    parsed = parse(tensors, models, {LORA_ADAPTER_METADATA_KEY: json.dumps(config)})["unet"]
    assert parsed[f"{ATTN}.to_q"].alpha == 4.0 and parsed[f"{ATTN}.to_v"].alpha == 1.5


def test_rslora_metadata_scales_by_alpha_over_sqrt_rank(models):
    down, up = pair(16, 16, rank=4)
    tensors = {f"unet.{ATTN}.to_q.lora_A.weight": down, f"unet.{ATTN}.to_q.lora_B.weight": up}
    config = {"unet.lora_alpha": 3, "unet.use_rslora": True}
    weights = parse(tensors, models, {LORA_ADAPTER_METADATA_KEY: json.dumps(config)})["unet"][f"{ATTN}.to_q"]
    assert weights.alpha / weights.rank == pytest.approx(3 / 2)  # alpha / sqrt(4)


def test_kohya_names_map_by_rule_sd1_conv_proj_attention_locon_and_text_encoder(models):
    proj = pair(16, 16, kernel=(1, 1))
    q = pair(16, 16)
    conv1 = pair(16, 8, kernel=(3, 3))
    shortcut = pair(16, 8, kernel=(1, 1))
    downsampler = pair(8, 8, kernel=(3, 3))
    fc1 = pair(32, 16)
    tensors = {**kohya("lora_unet_down_blocks_1_attentions_0_proj_in", *proj, alpha=1),
               **kohya(f"lora_unet_{ATTN.replace('.', '_')}_to_q", *q, alpha=4),
               **kohya("lora_unet_down_blocks_1_resnets_0_conv1", *conv1),
               **kohya("lora_unet_down_blocks_1_resnets_0_conv_shortcut", *shortcut, alpha=2),
               **kohya("lora_unet_down_blocks_0_downsamplers_0_conv", *downsampler, alpha=2),
               **kohya("lora_te_text_model_encoder_layers_1_mlp_fc1", *fc1, alpha=0.5)}
    parsed = parse(tensors, models)
    check(parsed["unet"]["down_blocks.1.attentions.0.proj_in"], *proj, 1.0)
    check(parsed["unet"][f"{ATTN}.to_q"], *q, 4.0)
    check(parsed["unet"]["down_blocks.1.resnets.0.conv1"], *conv1, None)  # no .alpha: alpha = rank
    check(parsed["unet"]["down_blocks.1.resnets.0.conv_shortcut"], *shortcut, 2.0)
    check(parsed["unet"]["down_blocks.0.downsamplers.0.conv"], *downsampler, 2.0)
    check(parsed["text_encoder"]["encoder.layers.1.mlp.fc1"], *fc1, 0.5)


def test_kohya_sd2_linear_projection(sd2_unet):
    proj = pair(16, 16)
    parsed = parse(kohya("lora_unet_up_blocks_0_attentions_1_proj_out", *proj, alpha=1), {"unet": sd2_unet})
    check(parsed["unet"]["up_blocks.0.attentions.1.proj_out"], *proj, 1.0)


@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_attention_processor_layout_with_or_without_prefix(models, prefix):
    names = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
    block = "mid_block.attentions.0.transformer_blocks.0.attn2"
    tensors, expected = {}, {}
    for index, (projection, target) in enumerate(names.items()):
        generator = torch.Generator().manual_seed(index)
        down, up = torch.randn(2, 16, generator=generator), torch.randn(16, 2, generator=generator)
        tensors[f"{prefix}{block}.processor.{projection}_lora.down.weight"] = down
        tensors[f"{prefix}{block}.processor.{projection}_lora.up.weight"] = up
        expected[f"{block}.{target}"] = (down, up)
    parsed = parse(tensors, {"unet": models["unet"]})["unet"]
    assert sorted(parsed) == sorted(expected)
    for path, (down, up) in expected.items():
        check(parsed[path], down, up, None)  # processors carry no alpha: scale 1


@pytest.mark.parametrize("layout", ["self_attn.to_q_lora", "self_attn.q_proj.lora_linear_layer"])
def test_old_text_encoder_layouts(models, layout):
    down, up = pair(16, 16)
    key = f"text_encoder.text_model.encoder.layers.0.{layout}"
    parsed = parse({f"{key}.down.weight": down, f"{key}.up.weight": up}, models)
    check(parsed["text_encoder"][TE_Q], down, up, None)


# ---------------------------------------------------------------------------------------------------------- bad input

def bad(tensors, models, match, metadata=None):
    with pytest.raises(ValueError, match=match) as error:
        parse(tensors, models, metadata)
    assert "lora.safetensors" in str(error.value)


def test_keys_of_no_layout_are_listed_with_the_expected_patterns(models):
    bad({"lora_unet_x.hada_w1_a": torch.zeros(1)}, models, r"follow no LoRA layout.*hada_w1_a.*lora_unet_<module")


def test_keys_matching_no_module_are_listed(models):
    down, up = pair(16, 16)
    bad({"unet.nowhere.to_q.lora_A.weight": down, "unet.nowhere.to_q.lora_B.weight": up}, models,
        r"2 key\(s\) match no module.*unet.nowhere.to_q.lora_A.weight.*named_modules")


def test_ldm_block_names_get_a_hint(models):
    bad(kohya("lora_unet_input_blocks_1_1_proj_in", *pair(16, 16)), models, r"LDM/SGM block names")


def test_mixed_layouts_are_refused(models):
    down, up = pair(16, 16)
    tensors = {f"unet.{ATTN}.to_q.lora_A.weight": down, f"unet.{ATTN}.to_q.lora_B.weight": up,
               **kohya(f"lora_unet_{ATTN.replace('.', '_')}_to_k", down, up)}
    bad(tensors, models, r"mixes LoRA layouts \(kohya: .*diffusers/peft: ")


@pytest.mark.parametrize("missing", ["A", "B"])
def test_down_without_up_and_the_reverse(models, missing):
    present = {"A": "B", "B": "A"}[missing]
    tensor = torch.zeros(2, 16) if present == "A" else torch.zeros(16, 2)
    bad({f"unet.{ATTN}.to_q.lora_{present}.weight": tensor}, models, rf"attn1.to_q has a \w+ weight but no")


def test_alpha_without_weights(models):
    bad({f"lora_unet_{ATTN.replace('.', '_')}_to_q.alpha": torch.tensor(1.0)}, models, r"has an alpha but no down")


def test_rank_mismatch_names_module_and_both_shapes(models):
    bad({f"unet.{ATTN}.to_q.lora_A.weight": torch.zeros(2, 16), f"unet.{ATTN}.to_q.lora_B.weight": torch.zeros(16, 3)},
        models, r"rank mismatch at unet.down_blocks.1.*attn1.to_q: down \(2, 16\) and up \(16, 3\)")


@pytest.mark.parametrize("alpha", [torch.tensor([1.0, 2.0]), torch.tensor(0.0), torch.tensor(-1.0),
                                   torch.tensor(float("nan"))])
def test_alpha_must_be_a_positive_scalar(models, alpha):
    name = f"lora_unet_{ATTN.replace('.', '_')}_to_q"
    down, up = pair(16, 16)
    bad({**kohya(name, down, up), f"{name}.alpha": alpha}, models, r"alpha of unet.*attn1.to_q must be a")


@pytest.mark.parametrize("metadata, match", [
    ({LORA_ADAPTER_METADATA_KEY: "{not json"}, "not valid JSON"),
    ({LORA_ADAPTER_METADATA_KEY: "[1]"}, "must be a JSON object"),
    ({LORA_ADAPTER_METADATA_KEY: json.dumps({"unet.lora_alpha": "8"})}, "must be a positive number, got '8'"),
    ({LORA_ADAPTER_METADATA_KEY: json.dumps({"unet.lora_alpha": 4, "unet.use_dora": True})}, "DoRA"),
    ({LORA_ADAPTER_METADATA_KEY: json.dumps({"unet.alpha_pattern": ["to_q"]})}, "alpha_pattern .* must be an object"),
    ({LORA_ADAPTER_METADATA_KEY: json.dumps({"unet.alpha_pattern": {"to_(q": 2}})}, "not a valid regular expression"),
])
def test_bad_adapter_metadata(models, metadata, match):
    down, up = pair(16, 16)
    bad({f"unet.{ATTN}.to_q.lora_A.weight": down, f"unet.{ATTN}.to_q.lora_B.weight": up}, models, match, metadata)


def test_text_encoder_weights_where_only_the_unet_is_given(models):
    bad(kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", *pair(16, 16)), {"unet": models["unet"]},
        r"has text_encoder LoRA weights .* only \['unet'\]")


def test_empty_state_dict(models):
    bad({}, models, "holds no tensors")


# ---------------------------------------------------------------------------------------------------------- files

def test_read_a_folder_default_name_weight_name_and_metadata(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "pytorch_lora_weights.safetensors", metadata={"k": "v"})
    save_file({"b": torch.ones(2)}, tmp_path / "other.safetensors")
    tensors, metadata, path = read_lora_file(tmp_path)
    assert list(tensors) == ["a"] and metadata["k"] == "v"
    assert path == str(tmp_path / "pytorch_lora_weights.safetensors")
    assert list(read_lora_file(tmp_path, weight_name="other.safetensors")[0]) == ["b"]
    assert read_lora_file(tmp_path / "other.safetensors")[2] == str(tmp_path / "other.safetensors")


def test_a_folder_with_one_safetensors_file_uses_it_and_with_several_lists_them(tmp_path):
    save_file({"b": torch.ones(2)}, tmp_path / "one.safetensors")
    assert read_lora_file(tmp_path)[2].endswith("one.safetensors")
    save_file({"c": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no pytorch_lora_weights.safetensors in .*one.safetensors, "
                                                r"two.safetensors.*weight_name"):
        read_lora_file(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        read_lora_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no x.safetensors in"):
        read_lora_file(tmp_path, weight_name="x.safetensors")
    with pytest.raises(ValueError, match="is not a folder"):
        read_lora_file(tmp_path / "nope.safetensors", weight_name="x.safetensors")


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt", "lora.ckpt"])
def test_pickles_are_refused_by_name_without_being_opened(tmp_path, name):
    (tmp_path / name).write_bytes(b"not even read")
    with pytest.raises(ValueError, match=r"is a pickle; minidiff never unpickles: convert it to .safetensors"):
        read_lora_file(tmp_path / name)


def test_pickle_content_under_a_safetensors_name_is_refused(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match=r"not a readable safetensors file: it looks like a pickle.*convert"):
        read_lora_file(tmp_path / "lora.safetensors")


def test_corrupt_and_empty_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02garbage")
    with pytest.raises(ValueError, match=r"bad.safetensors is not a readable safetensors file \("):
        read_lora_file(tmp_path / "bad.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_lora_file(tmp_path / "empty.safetensors")


def test_write_read_parse_round_trip(tmp_path, models):
    q, proj = pair(16, 16), pair(16, 16, rank=3, kernel=(1, 1))
    te = pair(16, 16, rank=4)
    layers = {"unet": {f"{ATTN}.to_q.lora_A.weight": q[0], f"{ATTN}.to_q.lora_B.weight": q[1],
                       "down_blocks.1.attentions.0.proj_in.lora_A.weight": proj[0],
                       "down_blocks.1.attentions.0.proj_in.lora_B.weight": proj[1]},
              "text_encoder": {f"{TE_Q}.lora_A.weight": te[0], f"{TE_Q}.lora_B.weight": te[1]}}
    metadata = {"unet": {"r": 2, "lora_alpha": 4, "rank_pattern": {"proj_in": 3}, "alpha_pattern": {"proj_in": 6},
                         "target_modules": {"to_q", "proj_in"}}, "text_encoder": None}
    path = write_lora_file(tmp_path / "out", None, layers, metadata)
    assert path == str(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert sorted(os.listdir(tmp_path / "out")) == ["pytorch_lora_weights.safetensors"]  # no temporary left
    tensors, header, _ = read_lora_file(path)
    assert f"text_encoder.text_model.{TE_Q}.lora_A.weight" in tensors and f"unet.{ATTN}.to_q.lora_B.weight" in tensors
    packed = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    assert packed["unet.lora_alpha"] == 4 and packed["unet.target_modules"] == ["proj_in", "to_q"]
    assert not any(key.startswith("text_encoder.") for key in packed)
    parsed = parse_lora(tensors, header, path, models)
    check(parsed["unet"][f"{ATTN}.to_q"], *q, 4.0)
    check(parsed["unet"]["down_blocks.1.attentions.0.proj_in"], *proj, 6.0)
    check(parsed["text_encoder"][TE_Q], *te, None)


def test_write_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown LoRA component\(s\) \['vae'\]"):
        write_lora_file(tmp_path, None, {"vae": {"x.lora_A.weight": torch.zeros(1)}}, {})
    with pytest.raises(TypeError, match="'x.lora_A.weight' must be a tensor, got list"):
        write_lora_file(tmp_path, None, {"unet": {"x.lora_A.weight": [1.0]}}, {})
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        write_lora_file(tmp_path, None, {"unet": {}}, {"unet": None})
    with pytest.raises(TypeError, match="must be JSON values"):
        write_lora_file(tmp_path, None, {"unet": {"x.lora_A.weight": torch.zeros(1)}}, {"unet": {"r": torch.ones(1)}})
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        write_lora_file(tmp_path / "file", None, {"unet": {"x.lora_A.weight": torch.zeros(1)}}, {})
