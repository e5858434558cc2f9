"""Tiny seeded SDXL components built with diffusers/transformers, saved once, loaded by both libraries.

The base config is diffusers' own SDXL pipeline test config (tests/pipelines/stable_diffusion_xl, get_dummy_components)
widened from channels (2, 4) to (32, 64), with the real CLIP vocabulary and SDXL's VAE scaling factor (parity/
test_sdxl_models.py also runs the verbatim one): a 2-level UNet with ``transformer_layers_per_block=(1, 2)``, two text
encoders of width 32 whose penultimate states are concatenated (cross_attention_dim 64), and 6 time ids of 8 features
after the 32-wide pooled embedding (80 in all).
The refiner-like config has only the second text encoder (cross_attention_dim 32) and 5 time ids (original size, crop,
aesthetic score: 32 + 5 * 8 = 72), as diffusers' img2img test with ``skip_first_text_encoder``/``requires_aesthetics_score``.
Tokenizers use the real CLIP vocabulary; the second one pads with "!" as SDXL's OpenCLIP tokenizer does.
"""

from __future__ import annotations

import diffusers
import torch
import transformers

from minidiff.text import CLIPTokenizer as MinidiffTokenizer
from parity.pipeline_fixtures import randomize_

SDXL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    norm_num_groups=1,
)
REFINER_UNET = dict(SDXL_UNET, cross_attention_dim=32, projection_class_embeddings_input_dim=72)
SDXL_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                 num_hidden_layers=5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_act="gelu",
                 projection_dim=32)
SDXL_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                      timestep_spacing="leading")


def reference_tokenizers(folder) -> tuple:
    """(tokenizer, tokenizer_2) as transformers objects over minidiff's shipped vocabulary."""
    MinidiffTokenizer().save_pretrained(folder / "tok")
    MinidiffTokenizer(pad_token="!").save_pretrained(folder / "tok_2")
    return (transformers.CLIPTokenizer.from_pretrained(folder / "tok"),
            transformers.CLIPTokenizer.from_pretrained(folder / "tok_2"))


def sdxl_reference_components(folder, refiner: bool = False, in_channels: int = 4, **unet_overrides) -> dict:
    """The components of diffusers' SDXL pipelines (seeded, every parameter perturbed): base (two text encoders) or
    refiner-like (``text_encoder``/``tokenizer`` None, 5 time ids); ``unet_overrides`` change the UNet config."""
    tokenizer, tokenizer_2 = reference_tokenizers(folder)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**(REFINER_UNET if refiner else SDXL_UNET), "in_channels": in_channels,
                                             **unet_overrides})
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(**SDXL_VAE)
    torch.manual_seed(2)
    text_encoder = None if refiner else transformers.CLIPTextModel(transformers.CLIPTextConfig(**SDXL_TEXT))
    torch.manual_seed(3)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**SDXL_TEXT))
    for seed, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        if model is not None:
            randomize_(model, seed)
            model.eval()
    scheduler = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=None if refiner else tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def save_sdxl_reference(folder, pipeline_class=diffusers.StableDiffusionXLPipeline, refiner: bool = False,
                        **kwargs):
    """A diffusers SDXL pipeline of the tiny components, saved to ``folder/"pipe"``: (pipeline, its folder).
    A refiner-like pipeline is built with ``requires_aesthetics_score=True``."""
    components = sdxl_reference_components(folder, refiner=refiner, **kwargs)
    extra = dict(requires_aesthetics_score=True) if refiner else {}
    pipe = pipeline_class(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"
