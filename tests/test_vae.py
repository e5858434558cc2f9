import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minidiff.models.attention import Attention
from minidiff.models.vae import AutoencoderKL, DiagonalGaussianDistribution, blend_overlap, run_tiled

TINY = dict(block_out_channels=[4, 8], norm_num_groups=2, latent_channels=3, sample_size=16,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(**TINY).eval()


def images(batch=2, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_output_access(vae):
    x = images()
    with torch.no_grad():
        out = vae.encode(x)
        posterior = out.latent_dist
        assert out[0] is posterior is out["latent_dist"]
        assert vae.encode(x, return_dict=False)[0].mean.shape == (2, 3, 8, 8)
        decoded = vae.decode(posterior.mode())
        assert decoded.sample.shape == (2, 3, 16, 16) and decoded[0] is decoded["sample"]
        assert vae.decode(posterior.mode(), return_dict=False)[0].shape == (2, 3, 16, 16)
        torch.testing.assert_close(vae(x).sample, decoded.sample)
        first = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(1)).sample
        again = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(1)).sample
        torch.testing.assert_close(first, again, atol=0, rtol=0)
        assert not torch.allclose(first, decoded.sample)
    assert vae.config.scaling_factor == 0.18215 and vae.config["latent_channels"] == 3


@pytest.mark.parametrize("method, tensor, message", [
    ("encode", torch.zeros(1, 4, 16, 16), r"encode expects images of shape \(B, 3, H, W\), got shape \(1, 4, 16, 16\)"),
    ("encode", torch.zeros(3, 16, 16), r"encode expects images of shape \(B, 3, H, W\), got shape \(3, 16, 16\)"),
    ("decode", torch.zeros(1, 4, 8, 8), r"decode expects latents of shape \(B, 3, H, W\), got shape \(1, 4, 8, 8\)"),
    ("tiled_decode", torch.zeros(1, 8, 8), r"tiled_decode expects latents of shape \(B, 3, H, W\)"),
])
def test_wrong_input_shapes(vae, method, tensor, message):
    with pytest.raises(ValueError, match=message):
        getattr(vae, method)(tensor)


@pytest.mark.parametrize("channels, groups, method, shape, message, smallest_ok, out_shape", [
    ([4, 8], 2, "encode", (2, 3, 1, 1), "images of 1x1 are too small for this VAE: they reach a 0x0 level with 2 ch",
     (2, 3, 2, 2), (2, 3, 1, 1)),
    ([4, 8], 4, "encode", (2, 3, 2, 3), r"images of 2x3 .* a 1x1 level with 1 channel\(s\) per GroupNorm group, "
                                        r"fewer than two values to normalise; use images of at least 4x4",
     (2, 3, 2, 4), (2, 3, 1, 2)),
    ([4, 4], 4, "decode", (1, 3, 1, 1), "latents of 1x1 .* a 1x1 level with 1 channel.* use latents of at least 2x2",
     (1, 3, 2, 1), (1, 3, 4, 2)),
])
def test_too_small_inputs_name_the_size_to_use(channels, groups, method, shape, message, smallest_ok, out_shape):
    """One value per GroupNorm group carries nothing (torch raises deep inside at batch 1, returns the bias above);
    one pixel more runs."""
    vae = AutoencoderKL(**{**TINY, "block_out_channels": channels, "norm_num_groups": groups})
    with pytest.raises(ValueError, match=f"AutoencoderKL.{method}: {message}"):
        getattr(vae, method)(torch.zeros(shape))
    with torch.no_grad():
        out = getattr(vae, method)(torch.zeros(smallest_ok))
    assert (out.latent_dist.mean if method == "encode" else out.sample).shape == out_shape


@pytest.mark.parametrize("changes, message", [
    (dict(down_block_types=["DownEncoderBlock2D", "DownBlock2D"]),
     r"down_block_types\[1\]='DownBlock2D' is not supported; accepted values: 'DownEncoderBlock2D'"),
    (dict(up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
     r"up_block_types\[0\]='AttnUpDecoderBlock2D' is not supported; accepted values: 'UpDecoderBlock2D'"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types has 1 entries but block_out_channels has 2"),
    (dict(norm_num_groups=3), r"norm_num_groups=3 does not divide block_out_channels \[4, 8\]"),
    (dict(act_fn="tanh"), "act_fn='tanh' is not supported; accepted values: 'swish', 'silu'"),
    (dict(latent_dim=4), r"unknown config option\(s\) \['latent_dim'\]"),
])
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKL(**{**TINY, **changes})


def test_round_trip_and_key_errors(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == 0.18215
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, vae(x).sample, atol=0, rtol=0)
    weights_path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    weights = load_file(weights_path)
    weights["encoder.conv_extra.weight"] = torch.zeros(1)
    del weights["decoder.conv_out.bias"]
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match=r"1 missing key\(s\): decoder.conv_out.bias; "
                                         r"1 unexpected key\(s\): encoder.conv_extra.weight"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_deprecated_attention_keys_load(vae):
    renamed = {key.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): value
               for key, value in vae.state_dict().items()}
    assert "encoder.mid_block.attentions.0.query.weight" in renamed
    other = AutoencoderKL(**TINY).load_weights(renamed)
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, atol=0, rtol=0)


def test_slicing_matches_batched(vae):
    x = images(3)
    with torch.no_grad():
        plain_moments, plain = vae.encode(x).latent_dist.parameters, vae(x).sample
        vae.enable_slicing()
        torch.testing.assert_close(vae.encode(x).latent_dist.parameters, plain_moments, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae(x).sample, plain, atol=1e-5, rtol=1e-5)
        vae.disable_slicing()
        assert not vae.use_slicing


def test_tiling_leaves_small_inputs_alone(vae):
    x = images(1, size=16)  # not larger than tile_sample_min_size = 16
    with torch.no_grad():
        plain = vae(x).sample
        vae.enable_tiling()
        torch.testing.assert_close(vae(x).sample, plain, atol=0, rtol=0)
        large = vae(images(1, size=40)).sample
        vae.disable_tiling()
    assert large.shape == (1, 3, 40, 40) and not vae.use_tiling


def test_run_tiled_stitches_local_maps_exactly():
    """For a map that is local (each output pixel depends on one input pixel), tiles agree where they overlap, so
    the blended, stitched result equals the untiled map: this checks tile starts, blending weights and crops."""
    z = torch.randn(2, 3, 20, 28)
    decode_like = lambda t: F.interpolate(t, scale_factor=4, mode="nearest") * 2 + 1  # noqa: E731  (8 -> 32 px)
    torch.testing.assert_close(run_tiled(decode_like, z, in_tile=8, out_tile=32, overlap_factor=0.25), decode_like(z))
    encode_like = lambda t: F.avg_pool2d(t, 4)  # noqa: E731  (32 px -> 8)
    x = torch.randn(1, 3, 80, 112)
    torch.testing.assert_close(run_tiled(encode_like, x, in_tile=32, out_tile=8, overlap_factor=0.25), encode_like(x))


def test_blend_overlap_is_a_linear_ramp():
    previous, tile = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    blend_overlap(previous, tile, extent=2, dim=3)
    torch.testing.assert_close(tile[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    tile = torch.ones(1, 1, 4, 4)
    blend_overlap(previous, tile, extent=4, dim=2)
    torch.testing.assert_close(tile[0, 0, :, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))


def gaussian(mean: float, std: float, shape=(2, 3, 32, 32)) -> DiagonalGaussianDistribution:
    moments = torch.cat([torch.full(shape, mean), torch.full(shape, 2 * math.log(std))], dim=1)
    return DiagonalGaussianDistribution(moments)


def test_gaussian_moments_and_sampling():
    posterior = gaussian(1.5, 0.5)
    torch.testing.assert_close(posterior.std, torch.full((2, 3, 32, 32), 0.5))
    torch.testing.assert_close(posterior.var, posterior.std ** 2)
    assert posterior.mode() is posterior.mean
    draw = posterior.sample(torch.Generator().manual_seed(0))
    assert abs(draw.mean().item() - 1.5) < 0.03 and abs(draw.std().item() - 0.5) < 0.03
    eps = torch.randn(draw.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw, 1.5 + 0.5 * eps)  # z = mean + std * eps with the generator's own noise
    clamped = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]])], 1))
    assert clamped.logvar.tolist() == [[[[-30.0, 20.0]]]]


def test_gaussian_kl_and_nll_match_torch_distributions():
    moments = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    q = DiagonalGaussianDistribution(moments)
    p = DiagonalGaussianDistribution(torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1)))
    normal = lambda d: torch.distributions.Normal(d.mean, d.std)  # noqa: E731
    standard = torch.distributions.Normal(torch.zeros(2, 4, 5, 5), torch.ones(2, 4, 5, 5))
    torch.testing.assert_close(q.kl(), torch.distributions.kl_divergence(normal(q), standard).sum([1, 2, 3]))
    torch.testing.assert_close(q.kl(p), torch.distributions.kl_divergence(normal(q), normal(p)).sum([1, 2, 3]))
    torch.testing.assert_close(q.kl(q), torch.zeros(2), atol=1e-5, rtol=0)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(q.nll(x), -normal(q).log_prob(x).sum([1, 2, 3]))


def test_deterministic_gaussian_collapses_to_mean():
    moments = torch.randn(1, 4, 3, 3)
    posterior = DiagonalGaussianDistribution(moments, deterministic=True)
    assert posterior.std.abs().max() == 0 and posterior.var.abs().max() == 0
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(0)), posterior.mean)
    assert posterior.kl().item() == 0 and posterior.nll(moments[:, :2]).item() == 0


def test_attention_backend_reaches_mid_blocks(vae):
    vae.set_attention_backend("math")
    attentions = [m for m in vae.modules() if isinstance(m, Attention)]
    assert len(attentions) == 2 and all(m.backend == "math" for m in attentions)
    no_attention = AutoencoderKL(**{**TINY, "mid_block_add_attention": False})
    assert not any(isinstance(m, Attention) for m in no_attention.modules())
