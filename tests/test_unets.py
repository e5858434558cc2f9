import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minidiff import ops
from minidiff.models import UNet2DConditionModel, UNet2DModel
from minidiff.models.attention import Attention
from minidiff.models.embeddings import get_timestep_embedding
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

COND = dict(block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=12, attention_head_dim=2,
            layers_per_block=1, sample_size=16)
PLAIN = dict(block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=4, layers_per_block=1, sample_size=16)


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**COND).eval()


def cond_inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 5, 12, generator=g)


# ---- configuration errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, config, match", [
    (UNet2DConditionModel, dict(COND, down_block_types=["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
     r"down block type 'SimpleCrossAttnDownBlock2D' is not supported; supported types: DownBlock2D, AttnDownBlock2D, "
     r"CrossAttnDownBlock2D, ResnetDownsampleBlock2D"),
    (UNet2DModel, dict(PLAIN, up_block_types=["KCrossAttnUpBlock2D", "UpBlock2D"]),
     r"up block type 'KCrossAttnUpBlock2D' is not supported; supported types: UpBlock2D"),
    (UNet2DConditionModel, dict(COND, addition_embed_type="text_image"),
     r"addition_embed_type='text_image' is not supported .* accepted values: None, 'text_time'"),
    (UNet2DConditionModel, dict(COND, addition_embed_type="text_time"),
     r"addition_time_embed_dim=None is invalid: addition_embed_type='text_time' embeds .* set addition_time_embed_dim"),
    (UNet2DConditionModel, dict(COND, attention_type="gated"), r"attention_type='gated' .* accepted values: 'default'"),
    (UNet2DConditionModel, dict(COND, dual_cross_attention=True), r"dual_cross_attention=True .* accepted values: False"),
    (UNet2DConditionModel, dict(COND, encoder_hid_dim=32), r"encoder_hid_dim=32"),
    (UNet2DConditionModel, dict(COND, time_cond_proj_dim=0), r"time_cond_proj_dim=0 is invalid: must be an int >= 1"),
    (UNet2DConditionModel, dict(COND, cross_attention_norm="group_norm"), r"cross_attention_norm='group_norm'"),
    (UNet2DConditionModel, dict(COND, mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
     r"mid_block_type='UNetMidBlock2DSimpleCrossAttn' is not supported; accepted values: 'UNetMidBlock2DCrossAttn'"),
    (UNet2DModel, dict(PLAIN, mid_block_type="UNetMidBlock2DCrossAttn"), r"mid_block_type='UNetMidBlock2DCrossAttn'"),
    (UNet2DConditionModel, dict(COND, resnet_time_scale_shift="spatial"),
     r"resnet_time_scale_shift='spatial' is not supported; accepted values: 'default', 'scale_shift'"),
    (UNet2DModel, dict(PLAIN, downsample_type="fir"), r"downsample_type='fir' is not supported; accepted values: 'conv', 'resnet'"),
    (UNet2DModel, dict(PLAIN, time_embedding_type="sinusoid"), r"time_embedding_type='sinusoid'"),
    (UNet2DModel, dict(PLAIN, time_embedding_type="learned"), r"'learned' needs num_train_timesteps"),
    (UNet2DConditionModel, dict(COND, class_embed_type="text"), r"class_embed_type='text' is not supported"),
    (UNet2DConditionModel, dict(COND, class_embed_type="projection"), r"needs projection_class_embeddings_input_dim"),
    (UNet2DConditionModel, dict(COND, act_fn="tanh"), r"activation 'tanh' is not supported; accepted values: 'swish'"),
    (UNet2DConditionModel, dict(COND, attention_head_dim=[2, 4, 8]), r"attention_head_dim has 3 entries but there are 2"),
    (UNet2DConditionModel, dict(COND, up_block_types=["UpBlock2D"]), r"must have the same length"),
    (UNet2DConditionModel, dict(COND, transformer_layers_per_block=[[1], [2]]),
     r"need reverse_transformer_layers_per_block"),
    (UNet2DModel, dict(PLAIN, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]),
     r"CrossAttnDownBlock2D needs cross_attention_dim"),
    (UNet2DConditionModel, dict(COND, not_an_option=1), r"unknown config option\(s\) \['not_an_option'\]"),
])
def test_config_errors(model, config, match):
    with pytest.raises(ValueError, match=match):
        model(**config)


def test_unet_res_prefix_and_unused_diffusers_fields_are_accepted():
    UNet2DConditionModel(**dict(COND, down_block_types=["UNetResCrossAttnDownBlock2D", "DownBlock2D"],
                                addition_embed_type_num_heads=32, mid_block_only_cross_attention=True))


# ---- call errors ----------------------------------------------------------------------------------------------------

def test_wrong_sample_channels_names_them(unet):
    _, text = cond_inputs()
    with pytest.raises(ValueError, match=r"sample has 3 channels but UNet2DConditionModel was built with in_channels=4"):
        unet(torch.randn(2, 3, 16, 16), 1, text)
    with pytest.raises(ValueError, match=r"expects sample of shape \(B, C, H, W\), got \(4, 16, 16\)"):
        unet(torch.randn(4, 16, 16), 1, text)
    plain = UNet2DModel(**PLAIN)
    with pytest.raises(ValueError, match=r"sample has 4 channels but UNet2DModel was built with in_channels=3"):
        plain(torch.randn(1, 4, 16, 16), 1)


def test_encoder_hidden_states_errors(unet):
    sample, _ = cond_inputs()
    with pytest.raises(ValueError, match=r"must have shape \(B=2, tokens, cross_attention_dim=12\), got \(2, 5, 7\)"):
        unet(sample, 1, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"got \(1, 5, 12\)"):
        unet(sample, 1, torch.randn(1, 5, 12))
    with pytest.raises(ValueError, match=r"pass encoder_hidden_states of shape \(B, tokens, 12\)"):
        unet(sample, 1)
    with pytest.raises(ValueError, match=r"cross_attention_kwargs \['gligen'\] are not supported"):
        unet(sample, 1, torch.randn(2, 5, 12), cross_attention_kwargs={"gligen": {}})
    with pytest.raises(ValueError, match=r"timestep_cond was given but this UNet2DConditionModel has no "
                                         r"time_cond_proj_dim \(only LCM-distilled UNets"):
        unet(sample, 1, torch.randn(2, 5, 12), timestep_cond=torch.zeros(2, 4))
    lcm = UNet2DConditionModel(**COND, time_cond_proj_dim=4)
    with pytest.raises(ValueError, match=r"timestep_cond must be a tensor of shape \(B=2, time_cond_proj_dim=4\), "
                                         r"got \(2, 5\)"):
        lcm(sample, 1, torch.randn(2, 5, 12), timestep_cond=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"added_cond_kwargs=\['time_ids'\] given, but this UNet2DConditionModel "
                                         r"has no added conditioning"):
        unet(sample, 1, torch.randn(2, 5, 12), added_cond_kwargs={"time_ids": torch.zeros(2, 6)})


def test_class_label_errors():
    sample = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="is class-conditioned: pass class_labels"):
        UNet2DModel(**dict(PLAIN, num_class_embeds=3))(sample, 1)
    with pytest.raises(ValueError, match="has no class embedding"):
        UNet2DModel(**PLAIN)(sample, 1, class_labels=torch.tensor([0]))


def test_timestep_shape_errors(unet):
    sample, text = cond_inputs()
    with pytest.raises(ValueError, match=r"1-d tensor of 1 or 2 \(batch size\) entries, got shape \(3,\)"):
        unet(sample, torch.tensor([1, 2, 3]), text)
    with pytest.raises(TypeError, match="timestep must be a number or a tensor, got str"):
        unet(sample, "10", text)


# ---- outputs and timesteps ------------------------------------------------------------------------------------------

def test_output_container_and_tuple(unet):
    sample, text = cond_inputs()
    with torch.no_grad():
        out = unet(sample, 10, text)
        as_tuple = unet(sample, 10, text, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert out.sample.shape == sample.shape and out[0] is out.sample is out["sample"]
    (key,) = out  # a mapping, as diffusers' outputs: iterating yields the keys
    assert key == "sample" and isinstance(out, dict) and list(out.values()) == [out.sample]
    (unpacked,) = out.to_tuple()
    with torch.no_grad():  # the keyword arguments diffusers' pipelines pass (all None for SD 1/2)
        diffusers_style = unet(sample, 10, encoder_hidden_states=text, timestep_cond=None, cross_attention_kwargs=None,
                               added_cond_kwargs=None, return_dict=False)[0]
    torch.testing.assert_close(diffusers_style, out.sample, rtol=0, atol=0)
    torch.testing.assert_close(unpacked, as_tuple[0], rtol=0, atol=0)
    plain = UNet2DModel(**PLAIN).eval()
    x = torch.randn(2, 3, 16, 16)
    assert plain(x, 3).sample.shape == x.shape and plain(x, 3, return_dict=False)[0].shape == x.shape


def test_timestep_forms_broadcast_to_the_batch(unet):
    sample, text = cond_inputs(batch=3)
    with torch.no_grad():
        expected = unet(sample, torch.tensor([25, 25, 25]), text).sample
        for form in (25, 25.0, torch.tensor(25), torch.tensor([25]), torch.tensor([25.0, 25.0, 25.0])):
            torch.testing.assert_close(unet(sample, form, text).sample, expected, rtol=1e-6, atol=1e-6)
        per_sample = unet(sample, torch.tensor([1, 500, 999]), text).sample
        torch.testing.assert_close(per_sample[1:2], unet(sample[1:2], 500, text[1:2]).sample, rtol=1e-5, atol=1e-5)


def test_unet2d_truncates_python_float_timesteps_like_diffusers():
    torch.manual_seed(0)
    plain = UNet2DModel(**PLAIN).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, 7.9).sample, plain(x, 7).sample, rtol=0, atol=0)


def test_sinusoidal_embedding_formula():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = get_timestep_embedding(t, 8, flip_sin_to_cos=True, downscale_freq_shift=0)
    frequencies = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * frequencies), torch.sin(t[:, None] * frequencies)], -1))
    assert get_timestep_embedding(t, 7).shape == (3, 7) and torch.all(get_timestep_embedding(t, 7)[:, -1] == 0)


# ---- kernel seam --------------------------------------------------------------------------------------------------

@pytest.fixture
def recording_backend():
    calls = []

    def recorder(q, k, v, **kwargs):
        calls.append(q.shape)
        return ops.math_attention(q, k, v, **kwargs)

    ops.register_backend("attention", "test-unet-recorder", recorder)
    yield calls
    ops.unregister_backend("attention", "test-unet-recorder")


def test_backend_per_model_and_with_block(unet, recording_backend):
    sample, text = cond_inputs()
    attention_count = len(unet.attention_modules())
    assert attention_count == 2 * 4  # (attn1, attn2) in 4 transformers: 1 down, 1 mid, 2 up (layers + 1)
    with torch.no_grad():
        reference = unet(sample, 5, text).sample
        unet.set_attention_backend("test-unet-recorder")
        torch.testing.assert_close(unet(sample, 5, text).sample, reference, rtol=1e-5, atol=1e-6)
        assert len(recording_backend) == attention_count
        other = UNet2DConditionModel(**COND).eval()  # another model keeps the global default
        other(sample, 5, text)
        assert len(recording_backend) == attention_count
        with ops.use_backend("attention", "math"):  # a with block wins over the per-model choice
            unet(sample, 5, text)
        assert len(recording_backend) == attention_count
        with ops.use_backend("attention", "test-unet-recorder"):
            other(sample, 5, text)
        assert len(recording_backend) == 2 * attention_count
        unet.set_attention_backend(None)
        unet(sample, 5, text)
        assert len(recording_backend) == 2 * attention_count
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; registered backends: \[.*'chunked'"):
        unet.set_attention_backend("nope")


def test_attention_slicing_uses_chunked_with_the_slice_size(unet, monkeypatch):
    sample, text = cond_inputs()
    attention_module = sys.modules["minidiff.ops.attention"]
    rows = []

    def spy(q, k, v, **kwargs):
        rows.append(q.shape[-2])
        return ops.math_attention(q, k, v, **kwargs)

    with torch.no_grad():
        reference = unet(sample, 5, text).sample
        unet.enable_attention_slicing(16)
        assert {(m.backend, m.chunk_size) for m in unet.attention_modules()} == {("chunked", 16)}
        monkeypatch.setattr(attention_module, "math_attention", spy)  # the chunked backend calls it per slice
        torch.testing.assert_close(unet(sample, 5, text).sample, reference, rtol=1e-5, atol=1e-6)
        assert max(rows) == 16 and len(rows) > 16  # 256 query rows at 16x16 came in slices of 16
        unet.disable_attention_slicing()
        assert {(m.backend, m.chunk_size) for m in unet.attention_modules()} == {(None, None)}
    with pytest.raises(ValueError, match="slice_size must be a positive int"):
        unet.enable_attention_slicing("auto")


def test_geglu_is_a_swappable_op(unet):
    sample, text = cond_inputs()
    calls = []

    def recorded_geglu(x):
        calls.append(x.shape)
        return ops.torch_geglu(x)

    ops.register_backend("geglu", "test-geglu", recorded_geglu)
    try:
        with torch.no_grad():
            reference = unet(sample, 5, text).sample
            with ops.use_backend("geglu", "test-geglu"):
                torch.testing.assert_close(unet(sample, 5, text).sample, reference, rtol=0, atol=0)
        assert len(calls) == 4  # one feed-forward per transformer block
    finally:
        ops.unregister_backend("geglu", "test-geglu")
    with pytest.raises(ValueError, match=r"even last dimension"):
        ops.geglu(torch.zeros(2, 3))


def test_geglu_in_place_inference_path_matches_the_formula():
    """Without autograd the product is written into GELU's buffer: the same bits, and the input is left alone."""
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    value, gate = x.chunk(2, dim=-1)
    expected = value * torch.nn.functional.gelu(gate)
    before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(ops.torch_geglu(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    leaf = x.clone().requires_grad_()
    ops.torch_geglu(leaf).sum().backward()  # the autograd path: no in-place op on a saved tensor
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


# ---- training, dtypes, round trips ----------------------------------------------------------------------------------

def test_backward_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    fourier = UNet2DModel(**dict(PLAIN, time_embedding_type="fourier"))
    for model, args in ((UNet2DConditionModel(**COND), cond_inputs()), (fourier, (torch.randn(2, 3, 16, 16),))):
        sample = args[0].requires_grad_(True)
        model(sample, torch.tensor([0.5, 2.0]), *args[1:]).sample.square().mean().backward()
        assert sample.grad is not None and torch.isfinite(sample.grad).all()
        for name, param in model.named_parameters():
            assert (param.grad is not None) == param.requires_grad, name
    assert not fourier.time_proj.weight.requires_grad  # the Fourier features are fixed


def test_bfloat16_forward_keeps_the_dtype(unet):
    sample, text = cond_inputs()
    unet = unet.to(torch.bfloat16)
    with torch.no_grad():
        out = unet(sample.bfloat16(), 10, text.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_load_round_trip_and_from_config(tmp_path, unet):
    unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["cross_attention_dim"] == 12
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    sample, text = cond_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 3, text).sample, unet(sample, 3, text).sample, rtol=0, atol=0)
    assert UNet2DConditionModel.from_config(dict(unet.config)).config == unet.config


def test_from_pretrained_missing_key_and_shape_mismatch(tmp_path, unet):
    unet.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    del state[key]
    save_file(state, weights)
    with pytest.raises(ValueError, match=rf"1 missing key\(s\): {key}"):
        UNet2DConditionModel.from_pretrained(tmp_path)

    unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, cross_attention_dim=16)))
    with pytest.raises(ValueError, match=rf"shape mismatch for {key.replace('.', '[.]')}: checkpoint \(8, 12\), "
                                         r"model \(8, 16\)"):
        UNet2DConditionModel.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(dict(config, addition_embed_type="text_image")))
    with pytest.raises(ValueError, match="addition_embed_type='text_image' is not supported"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_attention_layer_options():
    """The VAE-style layer: 1 head over pixels, group norm, residual, rescale."""
    torch.manual_seed(0)
    layer = Attention(8, heads=1, dim_head=8, norm_num_groups=2, eps=1e-6, bias=True, residual_connection=True,
                      rescale_output_factor=2.0).eval()
    x = torch.randn(2, 8, 4, 5)
    with torch.no_grad():
        out = layer(x)
        tokens = layer.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = layer.to_q(tokens), layer.to_k(tokens), layer.to_v(tokens)
        attended = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1) @ v
        expected = (layer.to_out[0](attended).transpose(1, 2).reshape(x.shape) + x) / 2.0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"need 8 features per token, got shape \(2, 3, 5\)"):
        layer(torch.randn(2, 3, 8), torch.randn(2, 3, 5))


@settings(max_examples=10, deadline=None)
@given(height=st.integers(5, 20), width=st.integers(5, 20), batch=st.integers(1, 2),
       levels=st.integers(1, 3), heads=st.sampled_from([1, 2, 3]))
def test_output_shape_equals_input_shape(height, width, batch, levels, heads):
    down = ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"][:levels]
    up = ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"][:levels]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**dict(COND, block_out_channels=[12] * levels, down_block_types=down,
                                        up_block_types=up, attention_head_dim=heads)).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 4, height, width), 3, torch.randn(batch, 2, 12)).sample
    assert out.shape == (batch, 4, height, width) and torch.isfinite(out).all()
