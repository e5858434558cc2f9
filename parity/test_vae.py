"""AutoencoderKL parity with diffusers 0.42.1: seeded tiny VAEs saved with save_pretrained, loaded both ways."""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minidiff.models.vae import AutoencoderKL
from parity.pipeline_fixtures import make_image, randomize_, save_reference_pipeline
from parity.report import compare, compare_gradients

COMPONENT = "AutoencoderKL"
FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4


def levels(channels, groups, **extra) -> dict:
    return dict(block_out_channels=list(channels), norm_num_groups=groups,
                down_block_types=["DownEncoderBlock2D"] * len(channels),
                up_block_types=["UpDecoderBlock2D"] * len(channels), **extra)


# diffusers tests/models/autoencoders/test_models_autoencoder_kl.py (get_autoencoder_kl_config)
DIFFUSERS_TEST = levels([2, 4], 2, in_channels=3, out_channels=3, latent_channels=4)
# SD 1/2 layout (4 levels, 2 resnets per level, f = 8), narrow
SD_LIKE = levels([4, 8, 16, 16], 4, layers_per_block=2, latent_channels=4, sample_size=64)


def reference_and_minidiff(config: dict, folder, seed: int = 0):
    torch.manual_seed(seed)
    reference = diffusers.AutoencoderKL(**config)
    randomize_(reference, seed, scale=0.1)
    reference.eval().save_pretrained(folder)
    return reference, AutoencoderKL.from_pretrained(folder)


def images(config: dict, batch: int, size, seed: int) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.get("in_channels", 3), height, width, generator=generator) * 2 - 1


def compare_vaes(case: str, reference, ours, x: torch.Tensor, seed: int = 0) -> None:
    """Posterior moments, a posterior sample with the same generator, KL, decode of that sample, full forward."""
    with torch.no_grad():
        theirs_post, ours_post = reference.encode(x).latent_dist, ours.encode(x).latent_dist
        for name in ("mean", "logvar", "std", "var"):
            compare(COMPONENT, f"{case}: encode {name}", getattr(ours_post, name), getattr(theirs_post, name),
                    FORWARD_TOL)
        compare(COMPONENT, f"{case}: kl", ours_post.kl(), theirs_post.kl(), FORWARD_TOL)
        theirs_z = theirs_post.sample(generator=torch.Generator().manual_seed(seed))
        ours_z = ours_post.sample(generator=torch.Generator().manual_seed(seed))
        compare(COMPONENT, f"{case}: latent_dist.sample", ours_z, theirs_z, FORWARD_TOL)
        compare(COMPONENT, f"{case}: decode", ours.decode(theirs_z).sample, reference.decode(theirs_z).sample,
                FORWARD_TOL)
        compare(COMPONENT, f"{case}: forward", ours(x).sample, reference(x).sample, FORWARD_TOL)
        generators = [torch.Generator().manual_seed(seed + 1) for _ in range(2)]
        compare(COMPONENT, f"{case}: forward sample_posterior",
                ours(x, sample_posterior=True, generator=generators[0]).sample,
                reference(x, sample_posterior=True, generator=generators[1]).sample, FORWARD_TOL)


@pytest.mark.parametrize("case, config, size", [
    ("diffusers test config", DIFFUSERS_TEST, 32),
    ("SD-like 4 levels", SD_LIKE, 32),
    ("latent_channels=1", levels([4, 8], 2, latent_channels=1), 16),
    ("latent_channels=16, no quant convs", levels([8, 8], 4, latent_channels=16, use_quant_conv=False,
                                                  use_post_quant_conv=False), 16),
    ("no mid-block attention, mish, 1-channel images",
     levels([4, 8], 4, latent_channels=2, mid_block_add_attention=False, act_fn="mish", in_channels=1,
            out_channels=1), 16),
    ("odd image size", DIFFUSERS_TEST, (15, 21)),
])
def test_encode_decode(tmp_path, case, config, size):
    reference, ours = reference_and_minidiff(config, tmp_path)
    compare_vaes(case, reference, ours, images(config, batch=2, size=size, seed=1))


@pytest.mark.parametrize("backend", ["math", "chunked"])
def test_attention_backends(tmp_path, backend):
    reference, ours = reference_and_minidiff(SD_LIKE, tmp_path)
    if backend == "chunked":
        ours.enable_attention_slicing(3)  # 3 query pixels per slice of the mid-block attention
    else:
        ours.set_attention_backend(backend)
    compare_vaes(f"SD-like, {backend} attention", reference, ours, images(SD_LIKE, 2, 64, seed=2))


def test_gradients(tmp_path):
    reference, ours = reference_and_minidiff(SD_LIKE, tmp_path)
    x = images(SD_LIKE, 2, 32, seed=3)
    target = images(SD_LIKE, 2, 32, seed=4)
    for model in (reference, ours):
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(5))
        reconstruction = model.decode(z).sample
        ((reconstruction - target).square().mean() + 1e-3 * posterior.kl().mean()).backward()
    compare_gradients(COMPONENT, "SD-like: parameter gradients (recon + KL loss)",
                      {name: p.grad for name, p in ours.named_parameters()},
                      {name: p.grad for name, p in reference.named_parameters()}, GRAD_TOL)


def test_tiled_and_sliced_encode_and_decode(tmp_path):
    """Both libraries slice the batch and tile (16-pixel / 8-latent tiles, 25% overlap) a 28 x 40 image and its
    latents; tiles at the borders are smaller, and blending runs over rows and columns."""
    config = {**DIFFUSERS_TEST, "sample_size": 16}
    reference, ours = reference_and_minidiff(config, tmp_path)
    for model in (reference, ours):
        model.enable_tiling()
        model.enable_slicing()
    x = images(config, batch=2, size=(28, 40), seed=6)
    with torch.no_grad():
        theirs_post, ours_post = reference.encode(x).latent_dist, ours.encode(x).latent_dist
        compare(COMPONENT, "tiled + sliced: encode mean", ours_post.mean, theirs_post.mean, FORWARD_TOL)
        compare(COMPONENT, "tiled + sliced: encode std", ours_post.std, theirs_post.std, FORWARD_TOL)
        z = theirs_post.mode()
        assert z.shape[-2:] == (14, 20)
        compare(COMPONENT, "tiled + sliced: decode", ours.decode(z).sample, reference.decode(z).sample, FORWARD_TOL)
        compare(COMPONENT, "tiled_decode of small latents", ours.tiled_decode(z[..., :6, :7]).sample,
                reference.tiled_decode(z[..., :6, :7]).sample, FORWARD_TOL)


def test_minidiff_saved_folder_loads_in_diffusers(tmp_path):
    torch.manual_seed(7)
    ours = AutoencoderKL(**SD_LIKE)
    randomize_(ours, 7, scale=0.1)
    ours.eval().save_pretrained(tmp_path)
    reference, info = diffusers.AutoencoderKL.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), f"diffusers reported loading problems: {info}"
    compare_vaes("SD-like, minidiff save -> diffusers load", reference.eval(), ours, images(SD_LIKE, 2, 32, seed=8))


def test_deprecated_attention_key_names(tmp_path):
    """Checkpoints saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
    reference, _ = reference_and_minidiff(DIFFUSERS_TEST, tmp_path)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(str(tmp_path / "diffusion_pytorch_model.safetensors")).items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in state
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    old_reference = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    compare_vaes("deprecated attention key names", old_reference, AutoencoderKL.from_pretrained(tmp_path),
                 images(DIFFUSERS_TEST, 1, 16, seed=9))


@st.composite
def vae_configs(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    channels = draw(st.lists(st.sampled_from([4, 8]), min_size=1, max_size=3))
    return levels(
        channels, groups,
        in_channels=draw(st.integers(1, 4)), out_channels=draw(st.integers(1, 4)),
        latent_channels=draw(st.integers(1, 6)), layers_per_block=draw(st.integers(1, 2)),
        act_fn=draw(st.sampled_from(["silu", "swish", "mish", "gelu", "relu"])),
        use_quant_conv=draw(st.booleans()), use_post_quant_conv=draw(st.booleans()),
        mid_block_add_attention=draw(st.booleans()),
    )


@settings(max_examples=8, deadline=None)
@given(config=vae_configs(), batch=st.integers(1, 2), height=st.integers(4, 16), width=st.integers(4, 16),
       seed=st.integers(0, 2**16))
def test_hypothesis_configs(tmp_path_factory, config, batch, height, width, seed):
    """Odd configs and sizes in float64: maps as small as 1x2 make GroupNorm ill-conditioned (a two-value group
    with a tiny spread amplifies float32 rounding ~1e3-fold), which would hide structural differences behind noise.
    Images too small for the config are refused by minidiff, saying which size to use; diffusers (torch) refuses
    them too at batch 1, while at larger batches torch normalises the single-value groups to their bias silently."""
    reference, ours = reference_and_minidiff(config, tmp_path_factory.mktemp("vae"), seed)
    reference, ours = reference.double(), ours.double()
    x = images(config, batch, (height, width), seed).double()
    try:
        ours.encode(x)
    except ValueError as error:
        assert "too small for this VAE" in str(error) and f"{height}x{width}" in str(error)
        with pytest.raises((ValueError, RuntimeError)):
            reference.encode(x[:1])
        return
    compare_vaes("hypothesis configs (float64)", reference, ours, x, seed)


def test_drop_in_for_diffusers_img2img_pipeline(tmp_path):
    """minidiff's VAE inside diffusers' img2img pipeline: encode, ``latent_dist.sample(generator)``, decode."""
    pipe, folder = save_reference_pipeline(tmp_path)
    reference = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    mixed = diffusers.StableDiffusionImg2ImgPipeline(
        **{**pipe.components, "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae")})
    options = dict(prompt="a red cube", image=make_image(32), strength=0.7, num_inference_steps=3, output_type="np")
    expected = reference(generator=torch.Generator().manual_seed(0), **options).images
    actual = mixed(generator=torch.Generator().manual_seed(0), **options).images
    compare(COMPONENT, "in diffusers StableDiffusionImg2ImgPipeline (np)", actual, expected, 1e-4, metric="abs")
