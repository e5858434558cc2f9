"""The benchmark rows: what runs on each side, at which shape, with which backends; full size and ``--quick`` size.

Every model pair is built the same way: a seeded diffusers/transformers model with random weights, whose state dict
is loaded into the minidiff model (``load_weights``), then both are cast to the row's dtype. The op-level diffusers
side is what diffusers' default ``AttnProcessor2_0`` runs on the (B, heads, N, d) tensors: one
``F.scaled_dot_product_attention`` call.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers.models.activations import GEGLU as ReferenceGEGLU

import minidiff
from benchmarks.harness import Pair
from minidiff import ops
from minidiff.models.attention import GEGLU
from minidiff.models.modeling import skip_weight_init
from minidiff.text import CLIPTokenizer
from parity.sdxl_fixtures import SDXL_TEXT as TINY_SDXL_TEXT, SDXL_UNET as TINY_SDXL_UNET, SDXL_VAE as TINY_SDXL_VAE

BUILTIN_ATTENTION = ("math", "sdpa", "chunked")
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # max_rel above which a row reports "error too high"
PIPELINE_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-1}  # long loops amplify rounding differences


@dataclass
class Case:
    level: str  # "op", "model" or "pipeline"
    what: str
    shape: str
    build: Callable[[torch.dtype], Pair]
    op: str = "attention"  # the op whose backend the row's "backend" column names
    backends: tuple[str, ...] = ("sdpa",)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    tolerance: dict[str, float] = field(default_factory=lambda: dict(TOLERANCE))
    repeats: int | None = None  # fewer timed calls than the run's setting, for very long rows
    compilable: bool = False  # with --compile, also a row with both sides through torch.compile


# ---- shapes -------------------------------------------------------------------------------------------------------
# SD 1.5 at 64x64 latents: (query tokens, channels) at each UNet level; 8 heads, head dim = channels / 8.
SD15_LEVELS = ((4096, 320), (1024, 640), (256, 1280), (64, 1280))
TEXT_TOKENS = 77
CFG_BATCH = 2  # classifier-free guidance runs [uncond, cond] as one batch

SD15_UNET = dict(cross_attention_dim=768, sample_size=64)  # the rest are diffusers' defaults (= SD 1.x)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=16,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
BUTTERFLY = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128, 256),
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
SD_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion's scheduler config
TINY_BUTTERFLY = dict(BUTTERFLY, sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=1)
# SDXL base (= SDXL-Turbo) UNet, 2.6B parameters: the architecture fields of its published config.json
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)  # 2816 = 1280 pooled + 6 x 256 time ids
CLIP_BIG_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)  # SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14), 694M
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
TURBO_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                       timestep_spacing="trailing")  # SDXL-Turbo's EulerAncestralDiscreteScheduler config
SDXL_TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w): Podell et al. 2023, Sec. 2.2


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def same_weights(reference: torch.nn.Module, ours: torch.nn.Module, dtype: torch.dtype):
    """Load the reference's weights into ``ours`` (strictly), cast both to ``dtype``, put both in eval mode."""
    load = getattr(ours, "load_weights", ours.load_state_dict)
    load(reference.state_dict())
    return reference.to(dtype).eval(), ours.to(dtype).eval()


def twins(name: str, config: dict, dtype: torch.dtype):
    """diffusers' model ``name`` built from a fixed seed, and minidiff's model of that name with its weights."""
    torch.manual_seed(0)
    return same_weights(getattr(diffusers, name)(**config), getattr(minidiff, name)(**config), dtype)


def clip_twins(config: dict, dtype: torch.dtype):
    """transformers' CLIPTextModel built from a fixed seed, and minidiff's with its weights."""
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    return same_weights(reference, minidiff.CLIPTextModel(**config), dtype)


def model_pair(reference, ours, call: Callable[..., torch.Tensor], *inputs: Any) -> Pair:
    """``call(model, *inputs)`` on each side; ``compiled`` is the same with both models through torch.compile."""
    return Pair(
        minidiff=lambda: call(ours, *inputs),
        diffusers=lambda: call(reference, *inputs),
        compiled=lambda: model_pair(torch.compile(reference), torch.compile(ours), call, *inputs),
    )


# ---- op level -----------------------------------------------------------------------------------------------------
def attention_pair(tokens: int, context: int, head_dim: int, dtype: torch.dtype) -> Pair:
    q = randn(CFG_BATCH, 8, tokens, head_dim, dtype=dtype, seed=0)  # (B, heads, N, d)
    k = randn(CFG_BATCH, 8, context, head_dim, dtype=dtype, seed=1)  # (B, heads, M, d)
    v = randn(CFG_BATCH, 8, context, head_dim, dtype=dtype, seed=2)
    return Pair(minidiff=lambda: ops.attention(q, k, v), diffusers=lambda: F.scaled_dot_product_attention(q, k, v))


def geglu_pair(tokens: int, channels: int, dtype: torch.dtype) -> Pair:
    torch.manual_seed(0)
    reference, ours = same_weights(ReferenceGEGLU(channels, 4 * channels), GEGLU(channels, 4 * channels), dtype)
    return model_pair(reference, ours, lambda model, x: model(x), randn(CFG_BATCH, tokens, channels, dtype=dtype))


def op_cases(quick: bool, attention_backends: tuple[str, ...], geglu_backends: tuple[str, ...]) -> list[Case]:
    scale = 16 if quick else 1  # --quick: 16x fewer tokens, same head dims
    cases = []
    for tokens, channels in SD15_LEVELS:
        n, d = tokens // scale, channels // 8
        for kind, m in (("self", n), ("cross", TEXT_TOKENS)):
            cases.append(Case("op", f"attention {kind}", f"q ({CFG_BATCH}, 8, {n}, {d}) kv {m}",
                              lambda dtype, n=n, m=m, d=d: attention_pair(n, m, d, dtype), backends=attention_backends))
        cases.append(Case("op", "GEGLU (proj + gate)", f"({CFG_BATCH}, {n}, {channels}) -> {4 * channels}",
                          lambda dtype, n=n, c=channels: geglu_pair(n, c, dtype), op="geglu", backends=geglu_backends,
                          compilable=True))
    return cases


# ---- model level --------------------------------------------------------------------------------------------------
def unet_condition_pair(config: dict, latent_size: int, dtype: torch.dtype) -> Pair:
    reference, ours = twins("UNet2DConditionModel", config, dtype)
    sample = randn(CFG_BATCH, 4, latent_size, latent_size, dtype=dtype)
    text = randn(CFG_BATCH, TEXT_TOKENS, config["cross_attention_dim"], dtype=dtype, seed=1)
    return model_pair(reference, ours, lambda model, x, t: model(x, 999, encoder_hidden_states=t).sample, sample, text)


def vae_decode_pair(config: dict, latent_size: int, dtype: torch.dtype) -> Pair:
    reference, ours = twins("AutoencoderKL", config, dtype)
    latents = randn(1, config["latent_channels"], latent_size, latent_size, dtype=dtype)
    return model_pair(reference, ours, lambda model, z: model.decode(z).sample, latents)


def seeded_fill_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter in place from one seed, fast enough for SDXL's 2.6B parameters (diffusers' own random
    init takes minutes): one pool of standard normals as long as the largest tensor is drawn, and each tensor copies
    a window of it at a seeded offset, scaled to std 1/sqrt(fan_in) (weights), 0.1 (biases) or 1 + 0.1 N(0, 1) (norm
    scales, the 1-D "weight"s), so activations keep their scale through the 70 transformer blocks."""
    generator = torch.Generator().manual_seed(seed)
    size = max(parameter.numel() for parameter in model.parameters())
    pool = torch.randn(size, generator=generator).repeat(2)  # any window of <= size values is one slice
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            start = int(torch.randint(size, (1,), generator=generator))
            flat = parameter.view(-1)
            flat.copy_(pool[start:start + flat.numel()])
            if parameter.ndim > 1:
                flat.mul_(parameter[0].numel() ** -0.5)  # fan_in = in_features (x kernel area)
            else:
                flat.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return model


def shared_twins(reference: torch.nn.Module, ours_class: type, config: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``reference`` and a minidiff ``ours_class(**config)`` holding the SAME weight tensors (built on the meta device,
    then ``assign``-loaded), so a full-size pair costs one model's memory. minidiff keeps its 4-D conv weights
    channels-last (see ModelMixin): re-applying that copies only those (a 1.3 GB of SDXL's 10.3 GB in fp32)."""
    with skip_weight_init(), torch.device("meta"):
        ours = ours_class(**config)
    ours.load_state_dict(ours.convert_state_dict(reference.state_dict()), strict=True, assign=True)
    for name, buffer in list(ours.named_buffers()):
        if buffer.is_meta:  # a non-persistent buffer (CLIP's position_ids) is in no state dict: take the reference's
            module, _, leaf = name.rpartition(".")
            ours.get_submodule(module).register_buffer(leaf, reference.get_buffer(name), persistent=False)
    return reference.eval(), ours.to(memory_format=torch.channels_last).eval()


def meta_built_twins(name: str, config: dict, dtype: torch.dtype, seed: int = 0):
    """diffusers' model ``name`` allocated straight in ``dtype`` and filled by ``seeded_fill_``, and minidiff's model
    sharing its weights (``shared_twins``): a full-size SDXL UNet pair in 10.3 GB (fp32) or 5.1 GB (bf16)."""
    with torch.device("meta"):
        reference = getattr(diffusers, name)(**config)
    reference = seeded_fill_(reference.to(dtype).to_empty(device="cpu"), seed)
    return shared_twins(reference, getattr(minidiff, name), config)


def sdxl_added_conditions(config: dict, batch: int, pixels: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """SDXL's ``added_cond_kwargs``: the pooled text embedding (B, P) and the six size/crop time ids (B, 6) of an
    uncropped ``pixels``-square image (Podell et al. 2023, Sec. 2.2 micro-conditioning)."""
    pooled = config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * config["addition_time_embed_dim"]
    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=dtype).repeat(batch, 1)  # (B, 6)
    return dict(text_embeds=randn(batch, pooled, dtype=dtype, seed=2), time_ids=time_ids)


def sdxl_unet_pair(config: dict, latent_size: int, dtype: torch.dtype) -> Pair:
    """The SDXL UNet at the CFG batch: latents (2, 4, s, s), 77 tokens of both text encoders' states concatenated
    (768 + 1280 = 2048 wide), t = 999, and the added conditioning."""
    reference, ours = meta_built_twins("UNet2DConditionModel", config, dtype)
    sample = randn(CFG_BATCH, 4, latent_size, latent_size, dtype=dtype)
    text = randn(CFG_BATCH, TEXT_TOKENS, config["cross_attention_dim"], dtype=dtype, seed=1)
    added = sdxl_added_conditions(config, CFG_BATCH, 8 * latent_size, dtype)

    def call(model, x, states):
        return model(x, 999, encoder_hidden_states=states, added_cond_kwargs=added).sample

    return model_pair(reference, ours, call, sample, text)


def clip_pair(config: dict, dtype: torch.dtype) -> Pair:
    reference, ours = clip_twins(config, dtype)
    ids = torch.randint(0, config["vocab_size"], (CFG_BATCH, TEXT_TOKENS), generator=torch.Generator().manual_seed(0))
    return model_pair(reference, ours, lambda model, tokens: model(tokens).last_hidden_state, ids)


def unet_pair(config: dict, batch: int, dtype: torch.dtype) -> Pair:
    reference, ours = twins("UNet2DModel", config, dtype)
    size = config["sample_size"]
    return model_pair(reference, ours, lambda model, x: model(x, 10).sample, randn(batch, 3, size, size, dtype=dtype))


def model_cases(quick: bool, backends: tuple[str, ...]) -> list[Case]:
    unet, vae, clip, butterfly = (TINY_UNET, TINY_VAE, TINY_CLIP, TINY_BUTTERFLY) if quick else (SD15_UNET, SD_VAE, CLIP_L, BUTTERFLY)
    latent, big_latent, vae_latent = (16, 32, 8) if quick else (64, 128, 64)
    sdxl, sdxl_latent = (TINY_SDXL_UNET, 16) if quick else (SDXL_UNET, 128)
    vae_pixels = vae_latent * 2 ** (len(vae["block_out_channels"]) - 1)
    size = butterfly["sample_size"]
    return [
        Case("model", "UNet2DConditionModel fwd", f"({CFG_BATCH}, 4, {latent}, {latent})",
             lambda dtype: unet_condition_pair(unet, latent, dtype), backends=backends),
        Case("model", "UNet2DConditionModel fwd (memory)", f"({CFG_BATCH}, 4, {big_latent}, {big_latent})",
             lambda dtype: unet_condition_pair(unet, big_latent, dtype), backends=("sdpa", "chunked"), dtypes=("fp32",),
             repeats=1),
        Case("model", "SDXL UNet2DConditionModel fwd", f"({CFG_BATCH}, 4, {sdxl_latent}, {sdxl_latent})",
             lambda dtype: sdxl_unet_pair(sdxl, sdxl_latent, dtype), repeats=None if quick else 3),
        Case("model", "AutoencoderKL decode", f"(1, 4, {vae_latent}, {vae_latent}) -> {vae_pixels}px",
             lambda dtype: vae_decode_pair(vae, vae_latent, dtype), backends=backends),
        Case("model", "CLIPTextModel", f"({CFG_BATCH}, {TEXT_TOKENS}) width {clip['hidden_size']}",
             lambda dtype: clip_pair(clip, dtype), backends=backends),
        *(Case("model", "UNet2DModel (butterfly) fwd", f"({batch}, 3, {size}, {size})",
               lambda dtype, batch=batch: unet_pair(butterfly, batch, dtype), backends=backends, compilable=True)
          for batch in (1, 8)),
    ]


# ---- pipeline level -----------------------------------------------------------------------------------------------
def ddpm_pair(config: dict, steps: int, dtype: torch.dtype, compiled: bool = False) -> Pair:
    reference_unet, unet = twins("UNet2DModel", config, dtype)
    if compiled:
        reference_unet, unet = torch.compile(reference_unet), torch.compile(unet)
    reference = diffusers.DDPMPipeline(reference_unet, diffusers.DDPMScheduler())
    ours = minidiff.DDPMPipeline(unet, minidiff.DDPMScheduler())
    options = dict(batch_size=1, num_inference_steps=steps)
    return Pair(sampling_call(ours, options), sampling_call(reference, options),
                compiled=None if compiled else lambda: ddpm_pair(config, steps, dtype, compiled=True))


def stable_diffusion_pair(unet: dict, vae: dict, clip: dict, pixels: int, steps: int, dtype: torch.dtype) -> Pair:
    unets, vaes, texts = twins("UNet2DConditionModel", unet, dtype), twins("AutoencoderKL", vae, dtype), clip_twins(clip, dtype)
    tokenizer = minidiff.CLIPTokenizer.from_default()
    with tempfile.TemporaryDirectory() as folder:  # the same vocabulary, read by transformers' tokenizer
        tokenizer.save_pretrained(folder)
        reference_tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    reference = diffusers.StableDiffusionPipeline(
        vae=vaes[0], text_encoder=texts[0], tokenizer=reference_tokenizer, unet=unets[0],
        scheduler=diffusers.DDIMScheduler(**SD_DDIM), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = minidiff.StableDiffusionPipeline(vae=vaes[1], text_encoder=texts[1], tokenizer=tokenizer, unet=unets[1],
                                            scheduler=minidiff.DDIMScheduler(**SD_DDIM))
    options = dict(prompt="a photograph of an astronaut riding a horse", height=pixels, width=pixels,
                   num_inference_steps=steps)
    return Pair(sampling_call(ours, options), sampling_call(reference, options))


def seeded(build: Callable[[], torch.nn.Module], seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build().to(dtype)


def turbo_pair(unet: dict, vae: dict, clip: dict, clip_2: dict, pixels: int, dtype: torch.dtype) -> Pair:
    """SDXL-Turbo's one-step call (Sauer et al. 2023, "Adversarial Diffusion Distillation"): guidance 0 (no CFG
    batch), EulerAncestral with trailing spacing, so the one step starts at t = 999. Every model is shared between
    the two pipelines (``shared_twins``); the UNet is filled by ``seeded_fill_``, the others by their own init."""
    unets = meta_built_twins("UNet2DConditionModel", unet, dtype)
    vaes = shared_twins(seeded(lambda: diffusers.AutoencoderKL(**vae), 1, dtype), minidiff.AutoencoderKL, vae)
    texts = shared_twins(seeded(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip)), 2, dtype),
                         minidiff.CLIPTextModel, clip)
    bigg = transformers.CLIPTextConfig(**clip_2)
    reference_2 = seeded(lambda: transformers.CLIPTextModelWithProjection(bigg), 3, dtype)
    texts_2 = shared_twins(reference_2, minidiff.CLIPTextModelWithProjection, clip_2)
    tokenizers = CLIPTokenizer.from_default(), CLIPTokenizer.from_default(pad_token="!")  # bigG pads with "!"
    with tempfile.TemporaryDirectory() as folder:  # the same vocabularies, read by transformers' tokenizer
        for i, tokenizer in enumerate(tokenizers):
            tokenizer.save_pretrained(f"{folder}/{i}")
        reference_tokenizers = [transformers.CLIPTokenizer.from_pretrained(f"{folder}/{i}") for i in range(2)]
    reference = diffusers.StableDiffusionXLPipeline(
        vae=vaes[0], text_encoder=texts[0], text_encoder_2=texts_2[0], tokenizer=reference_tokenizers[0],
        tokenizer_2=reference_tokenizers[1], unet=unets[0],
        scheduler=diffusers.EulerAncestralDiscreteScheduler(**TURBO_SCHEDULER), add_watermarker=False)
    ours = minidiff.StableDiffusionXLPipeline(
        vae=vaes[1], text_encoder=texts[1], text_encoder_2=texts_2[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unets[1], scheduler=minidiff.EulerAncestralDiscreteScheduler(**TURBO_SCHEDULER))
    options = dict(prompt="a photograph of an astronaut riding a horse", height=pixels, width=pixels,
                   num_inference_steps=1, guidance_scale=0.0)
    return Pair(sampling_call(ours, options), sampling_call(reference, options))


def sampling_call(pipe, options: dict) -> Callable[[], Any]:
    """One seeded run of ``pipe`` returning the images as a numpy array (no progress bar)."""
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(generator=torch.Generator().manual_seed(0), output_type="np", **options).images


def pipeline_cases(quick: bool, backends: tuple[str, ...]) -> list[Case]:
    butterfly, ddpm_steps = (TINY_BUTTERFLY, 10) if quick else (BUTTERFLY, 1000)
    unet, vae, clip, pixels, sd_steps = (TINY_UNET, TINY_VAE, TINY_CLIP, 32, 2) if quick else (SD15_UNET, SD_VAE, CLIP_L, 256, 4)
    turbo = (TINY_SDXL_UNET, TINY_SDXL_VAE, TINY_SDXL_TEXT, TINY_SDXL_TEXT, 32) if quick else (
        SDXL_UNET, SDXL_VAE, CLIP_L, CLIP_BIG_G, 512)
    size = butterfly["sample_size"]
    return [
        Case("pipeline", f"DDPMPipeline {ddpm_steps} steps (butterfly)", f"(1, 3, {size}, {size})",
             lambda dtype: ddpm_pair(butterfly, ddpm_steps, dtype), backends=backends, dtypes=("fp32",),
             tolerance=dict(PIPELINE_TOLERANCE), repeats=None if quick else 3, compilable=True),
        Case("pipeline", f"StableDiffusionPipeline DDIM {sd_steps} steps", f"1 image {pixels}x{pixels}, CFG 7.5",
             lambda dtype: stable_diffusion_pair(unet, vae, clip, pixels, sd_steps, dtype), backends=backends,
             dtypes=("fp32",), tolerance=dict(PIPELINE_TOLERANCE), repeats=None if quick else 3),
        Case("pipeline", "SDXL-Turbo StableDiffusionXLPipeline 1 step", f"1 image {turbo[-1]}x{turbo[-1]}, guidance 0",
             lambda dtype: turbo_pair(*turbo, dtype), backends=backends, tolerance=dict(PIPELINE_TOLERANCE),
             repeats=None if quick else 3),
    ]


LEVELS = ("op", "model", "pipeline")
DEFAULT_ATTENTION = dict(op=BUILTIN_ATTENTION, model=("sdpa", "chunked"), pipeline=("sdpa",))


def all_cases(quick: bool, levels: tuple[str, ...], attention: tuple[str, ...] | None = None,
              added: dict[str, tuple[str, ...]] | None = None) -> list[Case]:
    """Rows of the requested levels. ``attention``: the attention backends of every level (default: all built-ins on
    ops, sdpa and chunked on models, sdpa on pipelines); ``added``: user backends per op ("attention", "geglu")
    that run in addition, e.g. the ones a ``--kernel`` module registered."""
    added = added or {}

    def chosen(level: str) -> tuple[str, ...]:
        return (attention or DEFAULT_ATTENTION[level]) + added.get("attention", ())

    builders = dict(op=lambda: op_cases(quick, chosen("op"), ("torch",) + added.get("geglu", ())),
                    model=lambda: model_cases(quick, chosen("model")),
                    pipeline=lambda: pipeline_cases(quick, chosen("pipeline")))
    return [case for level in levels for case in builders[level]()]
