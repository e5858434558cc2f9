"""SDXL single-file (SGM layout) checkpoints on minidiff alone: round trips of base and refiner, the variant table,
SD 1/2 <-> SDXL mismatches and config folders of the wrong family."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import minidiff
from minidiff.loading import builtin_configs
from minidiff.loading.single_file import detect_variant, load_single_file, save_single_file, to_ldm_state_dict
from tests.tiny_components import tiny_pipeline, tiny_sdxl_components

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(components, config folder, SGM file, its state dict) of the tiny SDXL base."""
    folder = tmp_path_factory.mktemp("sdxl")
    components = tiny_sdxl_components()
    minidiff.StableDiffusionXLPipeline(**components).save_pretrained(folder / "pipe")
    state = to_ldm_state_dict(components["unet"], components["vae"], components["text_encoder"],
                              text_encoder_2=components["text_encoder_2"])
    return components, folder / "pipe", write(folder / "base.safetensors", state), state


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refiner")
    components = tiny_sdxl_components(refiner=True)
    minidiff.StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=True,
                                              force_zeros_for_empty_prompt=False).save_pretrained(folder / "pipe")
    path = folder / "refiner.safetensors"
    save_single_file(path, unet=components["unet"], vae=components["vae"], text_encoder_2=components["text_encoder_2"])
    return components, folder / "pipe", path


def assert_same_weights(expected: dict, loaded: dict, names) -> None:
    for name in names:
        ours, theirs = expected[name].state_dict(), loaded[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_base_file_layout_is_sgm(base):
    components, _, _, state = base
    width = components["text_encoder_2"].config.hidden_size
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    fused_qkv = state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused_qkv.shape == (3 * width, width)
    projection = components["text_encoder_2"].text_projection.weight  # (projection_dim, hidden)
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"], projection.T)
    assert torch.equal(state["model.diffusion_model.label_emb.0.2.weight"],
                       components["unet"].add_embedding.linear_2.weight)
    # transformer_layers_per_block=(1, 2): the second down block's attention has two transformer blocks
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in state
    assert detect_variant(state, "x") == "sdxl"


def test_base_round_trip_with_config_folder_and_pipeline(base, tmp_path):
    components, folder, path, state = base
    extra = {"conditioner.embedders.1.model.logit_scale": torch.ones(()), "alphas_cumprod": torch.ones(1000),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    loaded = load_single_file(write(tmp_path / "extra.safetensors", {**state, **extra}), config=folder)
    assert_same_weights(components, loaded, MODELS)
    assert loaded["tokenizer_2"].pad_token == "!" and loaded["force_zeros_for_empty_prompt"] is True
    pipe = minidiff.StableDiffusionXLPipeline.from_single_file(str(path), config=folder)
    assert isinstance(pipe.scheduler, minidiff.EulerDiscreteScheduler)
    assert_same_weights(components, pipe.components, MODELS)
    encoder = minidiff.CLIPTextModelWithProjection.from_single_file(path, config=folder)
    assert_same_weights(components, {"text_encoder_2": encoder}, ["text_encoder_2"])


def test_refiner_round_trip_has_no_first_text_encoder(refiner):
    components, folder, path = refiner
    loaded = load_single_file(path, config=folder)
    assert loaded["text_encoder"] is None and loaded["tokenizer"] is None
    assert loaded["requires_aesthetics_score"] is True and loaded["force_zeros_for_empty_prompt"] is False
    assert_same_weights(components, loaded, ("unet", "vae", "text_encoder_2"))
    pipe = minidiff.StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=folder)
    assert pipe.requires_aesthetics_score and pipe.text_encoder is None
    with pytest.raises(ValueError, match="sdxl-refiner checkpoint, which has no text_encoder"):
        minidiff.CLIPTextModel.from_single_file(path, config=folder)


def test_variant_table():
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    to_k = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    adm = "model.diffusion_model.label_emb.0.0.weight"
    clip = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    sdxl_clip = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
    big_g = "conditioner.embedders.1.model.ln_final.weight"
    refiner_g = "conditioner.embedders.0.model.ln_final.weight"
    one, four, nine = torch.zeros(1), torch.zeros(320, 4, 3, 3), torch.zeros(320, 9, 3, 3)
    table = {
        "sd1": {conv: four, to_k: torch.zeros(320, 768), clip: one},
        "sd1-inpaint": {conv: nine, to_k: torch.zeros(320, 768)},
        "sd2": {conv: four, to_k: torch.zeros(320, 1024)},
        "sd2-inpaint": {conv: nine, to_k: torch.zeros(320, 1024)},
        "sdxl": {conv: four, adm: torch.zeros(1280, 2816), sdxl_clip: one, big_g: one},
        "sdxl-inpaint": {conv: nine, adm: torch.zeros(1280, 2816), sdxl_clip: one, big_g: one},
        "sdxl-refiner": {conv: torch.zeros(384, 4, 3, 3), adm: torch.zeros(1536, 2560), refiner_g: one},
    }
    for variant, checkpoint in table.items():
        assert detect_variant(checkpoint, "x") == variant
    # a UNet-only SGM file: base or refiner by the added-conditioning MLP's input width
    assert detect_variant({conv: four, adm: torch.zeros(1280, 2816)}, "x") == "sdxl"
    assert detect_variant({conv: four, adm: torch.zeros(1536, 2560)}, "x") == "sdxl-refiner"
    assert set(table) <= set(builtin_configs.VARIANTS)


def test_unknown_layout_names_the_keys_looked_for(tmp_path):
    path = write(tmp_path / "other.safetensors", {"transformer.blocks.0.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"no model.diffusion_model.input_blocks.0.0.weight.*conditioner.embedders.1"
                                         r".model.*keys start with \['transformer.blocks'\]"):
        load_single_file(path)


def test_sd_and_sdxl_files_refuse_the_other_family(base, tmp_path):
    _, folder, sdxl_path, _ = base
    sd = tiny_pipeline(minidiff.StableDiffusionPipeline)
    sd_path = tmp_path / "sd1.safetensors"
    save_single_file(sd_path, unet=sd.unet, vae=sd.vae, text_encoder=sd.text_encoder)
    for sdxl_class, sd_class in ((minidiff.StableDiffusionXLPipeline, minidiff.StableDiffusionPipeline),
                                 (minidiff.StableDiffusionXLImg2ImgPipeline, minidiff.StableDiffusionImg2ImgPipeline),
                                 (minidiff.StableDiffusionXLInpaintPipeline, minidiff.StableDiffusionInpaintPipeline)):
        with pytest.raises(ValueError, match=rf"SD 1.x/2.x checkpoint \(sd1\), which {sdxl_class.__name__} cannot "
                                             rf"run: load it with {sd_class.__name__}.from_single_file"):
            sdxl_class.from_single_file(sd_path)
        with pytest.raises(ValueError, match=rf"SDXL checkpoint \(sdxl\), which {sd_class.__name__} cannot run: "
                                             rf"load it with {sdxl_class.__name__}.from_single_file"):
            sd_class.from_single_file(sdxl_path, config=folder)


def test_sd_config_folder_for_an_sdxl_file_names_the_missing_config(base, tmp_path):
    _, _, path, _ = base
    tiny_pipeline(minidiff.StableDiffusionPipeline).save_pretrained(tmp_path / "sd")
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/config.json.*SDXL checkpoints need an SDXL"):
        load_single_file(path, config=tmp_path / "sd")


def test_missing_sdxl_tensor_is_named(base, tmp_path):
    _, folder, _, state = base
    state = dict(state)
    del state["conditioner.embedders.1.model.text_projection"]
    with pytest.raises(ValueError, match=r"lacks 1 text_encoder_2 tensor\(s\): conditioner.embedders.1.model"
                                         r".text_projection"):
        load_single_file(write(tmp_path / "broken.safetensors", state), config=folder)


def test_builtin_sdxl_configs_build_on_the_meta_device():
    """The built-in SDXL configs are valid minidiff configs with SDXL's sizes (2.6B-parameter base UNet)."""
    with torch.device("meta"):
        unet = minidiff.UNet2DConditionModel(**builtin_configs.SDXL_UNET)
        refiner = minidiff.UNet2DConditionModel(**builtin_configs.REFINER_UNET)
        big_g = minidiff.CLIPTextModelWithProjection(**builtin_configs.BIGG_TEXT)
    assert 2.55e9 < unet.num_parameters() < 2.6e9 and 2.2e9 < refiner.num_parameters() < 2.35e9
    assert 690e6 < big_g.num_parameters() < 700e6
    assert unet.add_embedding.linear_1.in_features == 2816 and refiner.add_embedding.linear_1.in_features == 2560
