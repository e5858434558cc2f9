"""SDXL single-file (SGM layout) checkpoints: minidiff writes them, diffusers' from_single_file and minidiff read them.

Tiny seeded SDXL base and refiner: every component's weights (exact) and a UNet / text-encoder forward. Full-size
SDXL base 1.0 and refiner 1.0 on the meta device (no weights): key coverage and shapes of minidiff's SGM rules against
diffusers' own converters in both directions, and minidiff's built-in configs against the configs diffusers derives
from Stability's original SGM configs and against the model cards' diffusers folders.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils as ldm

import minidiff
from minidiff.loading import builtin_configs
from minidiff.loading.single_file import (
    REFINER_OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX, extract_component, save_single_file,
    to_ldm_state_dict, unused_keys,
)
from parity.pipeline_fixtures import randomize_
from parity.report import compare, compare_exact
from parity.sdxl_fixtures import SDXL_TEXT, save_sdxl_reference, sdxl_reference_components

COMPONENT = "single-file checkpoint (SDXL)"
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
# diffusers' from_single_file tells SDXL's towers apart by width (create_diffusers_clip_model_from_ldm reads CLIP-L's
# keys for any encoder as wide as its position embedding), so the tiny base gets a 48-wide second encoder here.
WIDE_TEXT_2 = dict(SDXL_TEXT, hidden_size=48, projection_dim=32)
WIDE_UNET = dict(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=32 + 6 * 8)


def tiny_base_reference(folder):
    """diffusers' tiny SDXL base (sdxl_fixtures) with a 48-wide text_encoder_2: (pipeline, saved folder)."""
    components = sdxl_reference_components(folder, **WIDE_UNET)
    torch.manual_seed(3)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**WIDE_TEXT_2))
    randomize_(text_encoder_2, 3)
    pipe = diffusers.StableDiffusionXLPipeline(**dict(components, text_encoder_2=text_encoder_2.eval()))
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"


def weights(model) -> dict[str, torch.Tensor]:
    """A model's tensors by name, without the ``position_ids`` buffer transformers may hold."""
    return {key: tensor for key, tensor in model.state_dict().items() if not key.endswith("position_ids")}


def unet_output(unet, refiner: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - (5 if refiner else 6) * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=g),
             "time_ids": torch.tensor([[32.0, 32, 0, 0, 6.0] if refiner else [32.0, 32, 0, 0, 32, 32]] * 2)}
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample


def text_outputs(text_encoder_2) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_embeds, penultimate hidden states): what SDXL reads from its second encoder."""
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = text_encoder_2(ids, output_hidden_states=True)
    return out.text_embeds, out.hidden_states[-2]


@pytest.mark.slow
@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_tiny_sdxl_file_through_both_libraries(tmp_path, refiner):
    if refiner:
        reference, folder = save_sdxl_reference(tmp_path, diffusers.StableDiffusionXLImg2ImgPipeline, refiner=True)
        ours, theirs = minidiff.StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline
    else:
        reference, folder = tiny_base_reference(tmp_path)
        ours, theirs = minidiff.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline
    mine = ours.from_pretrained(folder)
    path = tmp_path / "sdxl.safetensors"
    save_single_file(path, unet=mine.unet, vae=mine.vae, text_encoder=mine.text_encoder,
                     text_encoder_2=mine.text_encoder_2)
    loaded = {"diffusers": theirs.from_single_file(str(path), config=str(folder)).components,
              "minidiff": ours.from_single_file(path, config=folder).components}
    case = "refiner" if refiner else "base"
    for library, components in loaded.items():
        for name in MODELS:
            if reference.components[name] is None:
                assert components[name] is None, (library, name)
                continue
            expected, got = weights(reference.components[name]), weights(components[name])
            assert got.keys() == expected.keys(), (library, name, sorted(got.keys() ^ expected.keys()))
            compare_exact(COMPONENT, f"tiny {case}: {library} from_single_file {name} weights (all tensors)",
                          torch.cat([got[k].flatten() for k in expected]), torch.cat([expected[k].flatten()
                                                                                      for k in expected]))
    compare(COMPONENT, f"tiny {case}: UNet forward, minidiff vs diffusers from_single_file",
            unet_output(loaded["minidiff"]["unet"], refiner), unet_output(loaded["diffusers"]["unet"], refiner), 1e-5)
    for what, mine_out, their_out in zip(("text_embeds", "penultimate hidden states"),
                                         text_outputs(loaded["minidiff"]["text_encoder_2"]),
                                         text_outputs(loaded["diffusers"]["text_encoder_2"])):
        compare(COMPONENT, f"tiny {case}: text_encoder_2 {what}, minidiff vs diffusers from_single_file",
                mine_out, their_out, 1e-5)


# ---- full size, meta device -----------------------------------------------------------------------------------
VARIANT_MODELS = {"sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
                  "sdxl-refiner": ("unet", "vae", "text_encoder_2")}


def diffusers_meta_models(variant: str) -> dict:
    """diffusers/transformers models of the built-in configs, on the meta device (no memory)."""
    configs = builtin_configs.VARIANTS[variant]
    build = {"unet": lambda c: diffusers.UNet2DConditionModel(**c), "vae": lambda c: diffusers.AutoencoderKL(**c),
             "text_encoder": lambda c: transformers.CLIPTextModel(transformers.CLIPTextConfig(**c)),
             "text_encoder_2": lambda c: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**c))}
    with torch.device("meta"):
        return {name: build[name](configs[name]) for name in VARIANT_MODELS[variant]}


def minidiff_meta_models(variant: str) -> dict:
    configs = builtin_configs.VARIANTS[variant]
    with torch.device("meta"):
        return {name: builtin_configs.model_class(name)(**configs[name]) for name in VARIANT_MODELS[variant]}


def shapes(state: dict) -> dict[str, tuple]:
    return {key.removeprefix("text_model."): tuple(t.shape) for key, t in state.items()
            if not key.endswith("position_ids")}


def diffusers_conversion(checkpoint: dict, variant: str, models: dict) -> dict[str, dict]:
    """diffusers' own converters (loaders/single_file_utils.py) run on the SGM checkpoint."""
    configs = builtin_configs.VARIANTS[variant]
    converted = {"unet": ldm.convert_ldm_unet_checkpoint(checkpoint, dict(configs["unet"])),
                 "vae": ldm.convert_ldm_vae_checkpoint(checkpoint, dict(configs["vae"]))}
    if "text_encoder" in models:
        converted["text_encoder"] = ldm.convert_ldm_clip_checkpoint(checkpoint)
    prefix = SDXL_OPENCLIP_PREFIX if variant == "sdxl" else REFINER_OPENCLIP_PREFIX
    converted["text_encoder_2"] = ldm.convert_open_clip_checkpoint(models["text_encoder_2"], checkpoint, prefix=prefix)
    return converted


@pytest.mark.parametrize("variant", ["sdxl", "sdxl-refiner"])
def test_full_size_sgm_keys_and_shapes_match_diffusers_converters(variant):
    reference = diffusers_meta_models(variant)
    # writing: minidiff's rules on diffusers' models -> diffusers' converters give back exactly diffusers' tensors
    checkpoint = to_ldm_state_dict(**{name: reference[name] for name in reference})
    assert ldm.infer_diffusers_model_type(checkpoint) == {"sdxl": "xl_base", "sdxl-refiner": "xl_refiner"}[variant]
    converted = diffusers_conversion(checkpoint, variant, reference)
    for name, model in reference.items():
        expected, got = shapes(model.state_dict()), shapes(converted[name])
        differing = set(expected) ^ set(got) | {k for k in set(expected) & set(got) if expected[k] != got[k]}
        compare_exact(COMPONENT, f"{variant} full-size {name}: keys missing/unexpected/misshapen in diffusers' "
                      "conversion of minidiff's file", len(differing), 0)
    # reading: minidiff's models of the built-in configs take every tensor of that file, and leave none unused
    used: set[str] = set()
    for name, model in minidiff_meta_models(variant).items():
        state = extract_component(checkpoint, name, model, variant, used=used)
        compare_exact(COMPONENT, f"{variant} full-size {name}: keys minidiff's model lacks or the file lacks",
                      len(set(state) ^ set(model.state_dict())), 0)
        assert all(state[k].shape == t.shape for k, t in model.state_dict().items())
    compare_exact(COMPONENT, f"{variant} full-size: tensors of the file minidiff leaves unused",
                  len(unused_keys(checkpoint, used)), 0)
    ours = to_ldm_state_dict(**minidiff_meta_models(variant))
    compare_exact(COMPONENT, f"{variant} full-size: SGM keys/shapes written from minidiff's vs diffusers' models",
                  len({k: tuple(v.shape) for k, v in ours.items()}.items()
                      ^ {k: tuple(v.shape) for k, v in checkpoint.items()}.items()), 0)


# Stability's original configs (generative-models configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml): the UNet
# and first-stage parameters diffusers derives its configs from when it converts an SGM file without a folder.
SGM_FIRST_STAGE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                       ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
SGM_NETWORKS = {
    "sdxl": dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
                 attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                 use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048),
    "sdxl-refiner": dict(adm_in_channels=2560, num_classes="sequential", in_channels=4, out_channels=4,
                         model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                         num_head_channels=64, use_linear_in_transformer=True, transformer_depth=4,
                         context_dim=[1280, 1280, 1280, 1280]),
}
# The model cards' diffusers folders (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0): config.json values
MODEL_CARD = {
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                           layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "vae": dict(force_upcast=True, scaling_factor=0.13025, sample_size=1024, block_out_channels=(128, 256, 512, 512),
                latent_channels=4, layers_per_block=2, norm_num_groups=32),
    "scheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False),
}
MODEL_INDEX = {"sdxl": dict(force_zeros_for_empty_prompt=True),
               "sdxl-refiner": dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)}


def differing_fields(config, expected: dict) -> list[str]:
    normal = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    return [key for key, value in expected.items() if normal(getattr(config, key)) != normal(value)]


@pytest.mark.parametrize("variant", ["sdxl", "sdxl-refiner"])
def test_builtin_sdxl_configs_equal_diffusers_and_the_model_cards(variant):
    checkpoint = to_ldm_state_dict(**diffusers_meta_models(variant))  # infer_diffusers_model_type reads its keys
    original = {"model": {"params": {"scale_factor": 0.13025, "network_config": {"params": SGM_NETWORKS[variant]},
                                     "first_stage_config": {"params": {"ddconfig": SGM_FIRST_STAGE}}}}}
    derived = {"unet": ldm.create_unet_diffusers_config_from_ldm(original, checkpoint),
               "vae": ldm.create_vae_diffusers_config_from_ldm(original, checkpoint)}
    models = minidiff_meta_models(variant)
    for name, expected in derived.items():
        compare_exact(COMPONENT, f"{variant} built-in {name} config: fields differing from diffusers' SGM derivation",
                      len(differing_fields(models[name].config, expected)), 0)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if name in models:
            compare_exact(COMPONENT, f"{variant} built-in {name} config: fields differing from the model card",
                          len(differing_fields(models[name].config, MODEL_CARD[name])), 0)
    built = builtin_configs.component_configs(variant, None, None, VARIANT_MODELS[variant])
    assert isinstance(built["scheduler"], minidiff.EulerDiscreteScheduler)
    compare_exact(COMPONENT, f"{variant} built-in scheduler config: fields differing from the model card",
                  len(differing_fields(built["scheduler"].config, MODEL_CARD["scheduler"])), 0)
    assert built["pipeline"] == MODEL_INDEX[variant]
    assert built["tokenizer_2"].pad_token == "!" and ("tokenizer" not in built or built["tokenizer"].pad_token ==
                                                      "<|endoftext|>")

