"""Tiny seeded Stable Diffusion components built with diffusers/transformers, saved once, loaded by both libraries.

The shapes follow diffusers' own pipeline tests (get_dummy_components), with the real CLIP vocabulary (shipped by
minidiff, read by transformers' tokenizer from the same vocab.json/merges.txt) so prompts tokenize for real.
"""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import torch
import transformers

from minidiff.text import CLIPTokenizer as MinidiffTokenizer


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Perturb every parameter so zero-initialised ones (conv_out, norms' biases) take part in the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def reference_components(folder, in_channels: int = 4, sd2: bool = False) -> dict:
    """vae, text_encoder, tokenizer, unet, scheduler as diffusers/transformers objects (seeded)."""
    MinidiffTokenizer().save_pretrained(folder / "tok")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tok")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4,
        attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2,
    )
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
    )
    torch.manual_seed(2)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_act="gelu" if sd2 else "quick_gelu",
    ))
    for seed, model in enumerate((unet, vae, text_encoder)):
        randomize_(model, seed)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False)
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                scheduler=scheduler)


def save_reference_pipeline(folder, pipeline_class=diffusers.StableDiffusionPipeline, **kwargs):
    components = reference_components(folder, **kwargs)
    pipe = pipeline_class(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"


def make_image(size: int = 32, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_mask(size: int = 32) -> PIL.Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return PIL.Image.fromarray(mask)
