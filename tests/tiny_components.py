"""Tiny seeded minidiff components for tests that need a whole pipeline (no diffusers involved)."""

from __future__ import annotations

import torch

import minidiff


def tiny_components(in_channels: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = minidiff.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )
    vae = minidiff.AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
    )
    text_encoder = minidiff.CLIPTextModel(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    scheduler = minidiff.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=minidiff.CLIPTokenizer(),
                unet=unet.eval(), scheduler=scheduler)


def run_tiny(pipe, **kwargs):
    """``pipe(...)`` on the tiny components: a 32x32 np image of "a red circle" in 2 seeded steps unless overridden."""
    args = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs})


def tiny_pipeline(pipeline_class, **kwargs):
    pipe = pipeline_class(**tiny_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_components(refiner: bool = False, in_channels: int = 4, seed: int = 0) -> dict:
    """Tiny SDXL components (diffusers' SDXL test shapes): two text encoders of width 32 whose penultimate states make
    64 features, 6 time ids; ``refiner``: only text_encoder_2/tokenizer_2, 5 time ids (aesthetic score)."""
    torch.manual_seed(seed)
    unet = minidiff.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), norm_num_groups=1,
        cross_attention_dim=32 if refiner else 64, projection_class_embeddings_input_dim=72 if refiner else 80,
    )
    vae = minidiff.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, scaling_factor=0.13025, force_upcast=True,
    )
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_act="gelu", projection_dim=32)
    text_encoder = None if refiner else minidiff.CLIPTextModel(**text).eval()
    scheduler = minidiff.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading")
    text_encoder_2 = minidiff.CLIPTextModelWithProjection(**text).eval()
    tokenizer = None if refiner else minidiff.CLIPTokenizer()
    return dict(vae=vae.eval(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=minidiff.CLIPTokenizer(pad_token="!"), unet=unet.eval(), scheduler=scheduler)
