"""Single-file (LDM layout) checkpoints: minidiff writes them, diffusers' from_single_file and minidiff read them.

Small structures check numbers end to end; full-size SD1 / SD2 / inpaint structures (on the meta device, no memory)
check key coverage against diffusers' own LDM converters.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.loaders import single_file_utils as ldm

import minidiff
from minidiff.loading import builtin_configs
from minidiff.loading.single_file import extract_component, load_single_file, save_single_file, to_ldm_state_dict
from parity.pipeline_fixtures import save_reference_pipeline
from parity.report import compare

STRUCTURES = {"SD1-like": dict(), "SD2-like (OpenCLIP, linear proj)": dict(sd2=True), "inpaint 9-channel": dict(in_channels=9)}


def component_outputs(unet, vae, text_encoder, in_channels: int) -> dict[str, torch.Tensor]:
    """Deterministic forward outputs of the three models on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    sample = torch.randn(2, in_channels, 16, 16, generator=g)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        text = text_encoder(ids)[0]
        return {"text_encoder": text, "unet": unet(sample, 10, encoder_hidden_states=text[..., :16]).sample,
                "vae": vae.decode(vae.encode(image).latent_dist.mean).sample}


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_ldm_file_round_trip_through_both_libraries(tmp_path, structure):
    kwargs = STRUCTURES[structure]
    reference, folder = save_reference_pipeline(tmp_path, **kwargs)
    in_channels = kwargs.get("in_channels", 4)
    expected = component_outputs(reference.unet, reference.vae, reference.text_encoder, in_channels)

    mine = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    path = tmp_path / "model.safetensors"
    save_single_file(path, unet=mine.unet, vae=mine.vae, text_encoder=mine.text_encoder)

    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder),
                                                                safety_checker=None, requires_safety_checker=False)
    loaded = load_single_file(path, config=folder)
    # each library's single-file load against the same library's folder load (the libraries' own rounding
    # differences, ~1e-6, are what the model parity tests measure)
    before = {"diffusers": expected, "minidiff": component_outputs(mine.unet, mine.vae, mine.text_encoder, in_channels)}
    for library, how, models in (("diffusers", "from_single_file", theirs.components),
                                 ("minidiff", "load_single_file", loaded)):
        outputs = component_outputs(models["unet"], models["vae"], models["text_encoder"], in_channels)
        for component, value in outputs.items():
            compare("single-file checkpoint", f"{structure}: {library} {how} {component}", value,
                    before[library][component], 1e-6)


def meta_models(variant: str):
    configs = builtin_configs.VARIANTS[variant]
    with torch.device("meta"):
        return (minidiff.UNet2DConditionModel(**configs["unet"]), minidiff.AutoencoderKL(**builtin_configs.VAE),
                minidiff.CLIPTextModel(**configs["text_encoder"]))


def diffusers_key_sets(variant: str) -> dict[str, set[str]]:
    configs = builtin_configs.VARIANTS[variant]
    with torch.device("meta"):
        import transformers

        return {
            "unet": set(diffusers.UNet2DConditionModel(**configs["unet"]).state_dict()),
            "vae": set(diffusers.AutoencoderKL(**builtin_configs.VAE).state_dict()),
            "text_encoder": set(transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])).state_dict())
            - {"embeddings.position_ids"},
        }


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sd1-inpaint"])
def test_full_size_key_coverage_matches_diffusers_converters(variant):
    unet, vae, text_encoder = meta_models(variant)
    checkpoint = to_ldm_state_dict(unet, vae, text_encoder)
    expected = diffusers_key_sets(variant)
    converted = {
        "unet": set(ldm.convert_ldm_unet_checkpoint(checkpoint, dict(builtin_configs.VARIANTS[variant]["unet"]))),
        "vae": set(ldm.convert_ldm_vae_checkpoint(checkpoint, dict(builtin_configs.VAE))),
    }
    if variant.startswith("sd2"):
        import transformers

        with torch.device("meta"):
            reference_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**builtin_configs.SD2_TEXT))
        converted["text_encoder"] = set(ldm.convert_open_clip_checkpoint(reference_text, checkpoint))
    else:
        converted["text_encoder"] = set(ldm.convert_ldm_clip_checkpoint(checkpoint))
    for component in ("unet", "vae", "text_encoder"):
        names = {k.removeprefix("text_model.") for k in converted[component]} - {"embeddings.position_ids"}
        missing, extra = sorted(expected[component] - names), sorted(names - expected[component])
        compare("single-file checkpoint", f"{variant} full-size {component}: keys missing+unexpected in diffusers' "
                f"conversion of minidiff's file", len(missing) + len(extra), 0, 0.0, "abs")
    for component, model in zip(("unet", "vae", "text_encoder"), (unet, vae, text_encoder)):
        state = extract_component(checkpoint, component, model, variant)  # raises on any missing key
        assert set(state) == set(model.state_dict())
