"""LoRA on the SDXL pipelines, minidiff alone: kohya's SGM UNet names and te1/te2 prefixes resolve by rule,
diffusers-format text_encoder_2 keys, the three components in fuse/unload/set_adapters/save_lora_weights, and the
errors for SDXL files on SD 1/2 pipelines."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import minidiff
from minidiff.adapters import lora
from minidiff.adapters.lora_formats import parse_lora
from tests.tiny_components import tiny_pipeline, tiny_sdxl_components

# kohya SGM name -> the diffusers module path it must resolve to on the tiny SDXL UNet (layers_per_block 2,
# down (DownBlock2D, CrossAttnDownBlock2D), transformer_layers_per_block (1, 2))
SGM_NAMES = {
    "input_blocks_4_1_transformer_blocks_1_attn1_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k",
    "input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_1_1_transformer_blocks_0_attn2_to_out_0":
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
    "label_emb_0_0": "add_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
}


@pytest.fixture
def pipe():
    pipe = minidiff.StableDiffusionXLPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pair(module: torch.nn.Module, rank: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) LoRA weights fitting a Linear or Conv2d (or the one inside a LoRA layer)."""
    g = torch.Generator().manual_seed(seed)
    module = getattr(module, "base_layer", module)
    if isinstance(module, torch.nn.Conv2d):
        return (torch.randn(rank, module.in_channels, *module.kernel_size, generator=g),
                torch.randn(module.out_channels, rank, 1, 1, generator=g))
    return torch.randn(rank, module.in_features, generator=g), torch.randn(module.out_features, rank, generator=g)


def kohya_tensors(names: dict[str, torch.nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in names.items():
        down, up = pair(module, seed=seed)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
    return tensors


def kohya_file(path, names: dict[str, torch.nn.Module], seed: int = 0):
    save_file(kohya_tensors(names, seed), str(path))
    return path


def sdxl_kohya_names(pipe) -> dict[str, torch.nn.Module]:
    names = {f"lora_unet_{sgm}": pipe.unet.get_submodule(path) for sgm, path in SGM_NAMES.items()}
    names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = pipe.text_encoder.get_submodule(
        "encoder.layers.0.self_attn.q_proj")
    names["lora_te2_text_model_encoder_layers_1_mlp_fc2"] = pipe.text_encoder_2.text_model.encoder.layers[1].mlp.fc2
    names["lora_te2_text_projection"] = pipe.text_encoder_2.text_projection
    return names


def test_kohya_sgm_and_te1_te2_names_resolve_by_rule(pipe):
    parsed = parse_lora(kohya_tensors(sdxl_kohya_names(pipe)), None, "kohya.safetensors", pipe._lora_models())
    assert set(parsed["unet"]) == set(SGM_NAMES.values())
    assert set(parsed["text_encoder"]) == {"encoder.layers.0.self_attn.q_proj"}
    assert set(parsed["text_encoder_2"]) == {"text_model.encoder.layers.1.mlp.fc2", "text_projection"}


def test_kohya_sdxl_file_loads_fuses_and_unloads_on_all_three_models(pipe, tmp_path):
    path = kohya_file(tmp_path / "k.safetensors", sdxl_kohya_names(pipe))
    base = {name: {key: value.clone() for key, value in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "text_encoder", "text_encoder_2")}
    pipe.load_lora_weights(path, adapter_name="k")
    assert pipe.get_list_adapters() == {"unet": ["k"], "text_encoder": ["k"], "text_encoder_2": ["k"]}
    second = kohya_file(tmp_path / "k2.safetensors", sdxl_kohya_names(pipe), seed=1)  # SGM names over LoRA layers
    pipe.load_lora_weights(second, adapter_name="k2")
    pipe.set_adapters(["k", "k2"], [{"unet": 1.0, "text_encoder": 0.5, "text_encoder_2": 0.0}, 1.0])
    pipe.fuse_lora()  # default: every LoRA component, text_encoder_2 included
    fused = pipe.text_encoder_2.text_projection.base_layer.weight
    assert not torch.equal(fused, base["text_encoder_2"]["text_projection.weight"])
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    for name, state in base.items():
        after = getattr(pipe, name).state_dict()
        assert all(torch.allclose(after[key], value, atol=1e-6) for key, value in state.items()), name


def test_a_lora_on_the_added_embedding_still_samples(pipe, tmp_path):
    """kohya's label_emb_0_0 wraps add_embedding.linear_1 in a LoRALayer; the pipeline's time-id check must work."""
    path = kohya_file(tmp_path / "emb.safetensors", {"lora_unet_label_emb_0_0": pipe.unet.add_embedding.linear_1})
    kwargs = dict(num_inference_steps=1, height=32, width=32, output_type="np")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(path)
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(after - before).max() > 1e-3  # the adapter changes the added embedding, hence the image


def test_diffusers_format_text_encoder_2_keys_and_save_round_trip(pipe, tmp_path):
    projection = pipe.text_encoder_2.text_projection
    q_proj = pipe.text_encoder.encoder.layers[0].self_attn.q_proj
    tensors = {}
    for key, module in (("text_encoder_2.text_projection", projection),
                        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", q_proj)):
        down, up = pair(module)
        tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    pipe.load_lora_weights(tensors, adapter_name="d")
    assert pipe.get_list_adapters() == {"text_encoder": ["d"], "text_encoder_2": ["d"]}
    path = pipe.save_lora_weights(tmp_path, text_encoder_lora_layers=lora.lora_state_dict(pipe.text_encoder, "d"),
                                  text_encoder_2_lora_layers=lora.lora_state_dict(pipe.text_encoder_2, "d"))
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(tensors)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(path, adapter_name="again")
    assert torch.equal(pipe.text_encoder_2.text_projection.adapters["again"].up.weight,
                       tensors["text_encoder_2.text_projection.lora_B.weight"])


def test_sdxl_lora_on_an_sd_pipeline_and_sgm_names_on_an_sd_unet_are_refused(tmp_path):
    sd = tiny_pipeline(minidiff.StableDiffusionPipeline)
    down, up = pair(torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"has text_encoder_2 LoRA weights .* only \['text_encoder', 'unet'\]"):
        sd.load_lora_weights({"text_encoder_2.text_projection.lora_A.weight": down,
                              "text_encoder_2.text_projection.lora_B.weight": up})
    with pytest.raises(ValueError, match="SGM block names .* are read for SDXL UNets only"):
        sd.load_lora_weights({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
                              "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up})
    with pytest.raises(ValueError, match="StableDiffusionPipeline has no text_encoder_2"):
        minidiff.StableDiffusionPipeline.save_lora_weights(tmp_path, text_encoder_2_lora_layers={"a.lora_A.weight": up})
    assert sd._lora_loadable_modules == ["unet", "text_encoder"]
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['text_encoder_2'\]"):
        sd.fuse_lora(components=["text_encoder_2"])
