"""UNet2DModel / UNet2DConditionModel parity with diffusers 0.42.1.

Each case builds a seeded diffusers model (every parameter perturbed, so norms and biases count), saves it with
save_pretrained, loads the folder with minidiff's from_pretrained, and compares the forward output (1e-5 relative)
and the gradients of a fixed random projection of the output with respect to the inputs and to every parameter,
parameter by parameter under its name (1e-4 relative). The reverse direction (a minidiff-saved folder read by
diffusers) and the attention backends are checked too.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.models import UNet2DConditionModel, UNet2DModel
from minidiff.models.modeling import check_state_dict
from parity.pipeline_fixtures import randomize_
from parity.report import compare, compare_gradients
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
PAIRS = {"UNet2DModel": (diffusers.UNet2DModel, UNet2DModel),
         "UNet2DConditionModel": (diffusers.UNet2DConditionModel, UNet2DConditionModel)}


def cond(down, up, channels=(8, 16), groups=4, cross=12, heads=2, **extra) -> dict:
    return dict(dict(block_out_channels=list(channels), norm_num_groups=groups, down_block_types=list(down),
                     up_block_types=list(up), cross_attention_dim=cross, attention_head_dim=heads, layers_per_block=1,
                     sample_size=16), **extra)


def plain(down, up, channels=(8, 16), groups=4, head_dim=4, **extra) -> dict:
    return dict(dict(block_out_channels=list(channels), norm_num_groups=groups, down_block_types=list(down),
                     up_block_types=list(up), attention_head_dim=head_dim, layers_per_block=1, sample_size=16), **extra)


SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
CROSS2 = (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

CONDITION_CASES = {
    # diffusers tests/models/unets/test_models_unet_2d_condition.py (prepare_init_args_and_inputs_for_common)
    "diffusers test config": dict(
        block_out_channels=[4, 8], norm_num_groups=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8, attention_head_dim=2,
        in_channels=4, out_channels=4, layers_per_block=1, sample_size=16),
    # diffusers' StableDiffusionPipeline tests (get_dummy_components), SD1 and SD2 variants
    "pipeline dummy (SD1)": dict(
        block_out_channels=[4, 8], layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=8, norm_num_groups=2),
    "pipeline dummy (SD2)": dict(
        block_out_channels=[4, 8], layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=[2, 4], use_linear_projection=True),
    "SD1-like (4 levels, conv proj, 8 heads)": cond(SD_DOWN, SD_UP, channels=(16, 32, 32, 32), groups=8, cross=48,
                                                   heads=8, layers_per_block=2),
    "SD2-like (linear proj, heads per level, upcast)": cond(
        SD_DOWN, SD_UP, channels=(16, 32, 32, 32), groups=8, cross=40, heads=[1, 2, 4, 4], layers_per_block=2,
        use_linear_projection=True, upcast_attention=True),
    "inpaint (9 in-channels)": cond(*CROSS2, in_channels=9, out_channels=4),
    "odd head dims (12 ch / 5 heads, 24 ch / 7 heads)": cond(*CROSS2, channels=(12, 24), heads=[5, 7]),
    "resnet_time_scale_shift=scale_shift": cond(*CROSS2, resnet_time_scale_shift="scale_shift"),
    "transformer_layers_per_block=2": cond(*CROSS2, transformer_layers_per_block=2),
    "transformer layers per level + reverse list": cond(
        *CROSS2, transformer_layers_per_block=[[1], [2]], reverse_transformer_layers_per_block=[[2, 1], [1, 3]]),
    "only_cross_attention per level": cond(*CROSS2, only_cross_attention=[True, False]),
    "Resnet{Down,Up}sampleBlock2D, skip_time_act, out scale": cond(
        ("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        resnet_skip_time_act=True, resnet_out_scale_factor=1.5, mid_block_scale_factor=1.2),
    "Attn blocks (attention_head_dim as head size), mid UNetMidBlock2D": cond(
        ("AttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "AttnUpBlock2D"), heads=[4, 2], mid_block_type="UNetMidBlock2D"),
    "no mid block, 3 levels, layers per level": cond(
        ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), channels=(8, 8, 16), mid_block_type=None,
        layers_per_block=[1, 2, 1], cross_attention_dim=[12, 12, 12]),
    "fourier time, mish, time act + post act, kernels 1/5": cond(
        *CROSS2, time_embedding_type="fourier", act_fn="mish", time_embedding_act_fn="silu",
        timestep_post_act="gelu", conv_in_kernel=1, conv_out_kernel=5, flip_sin_to_cos=False, freq_shift=1),
    "class embeds (table)": cond(*CROSS2, num_class_embeds=10),
    "class embeds (timestep, concatenated)": cond(*CROSS2, class_embed_type="timestep", class_embeddings_concat=True),
    "class embeds (identity)": cond(*CROSS2, class_embed_type="identity"),
    "class embeds (projection)": cond(*CROSS2, class_embed_type="projection", projection_class_embeddings_input_dim=6),
    "class embeds (simple_projection)": cond(*CROSS2, class_embed_type="simple_projection",
                                             projection_class_embeddings_input_dim=6),
    "center_input_sample, dropout config": cond(*CROSS2, center_input_sample=True, dropout=0.1),
}

PLAIN_CASES = {
    # diffusers tests/models/unets/test_models_unet_2d.py (Unet2DModelTests)
    "diffusers test config": dict(
        block_out_channels=(4, 8), norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=3, out_channels=3, in_channels=3,
        layers_per_block=2, sample_size=32),
    "DDPM-like 3 levels": plain(("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), channels=(8, 16, 16), layers_per_block=2),
    "fourier time embedding (score model)": plain(("AttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "AttnUpBlock2D"),
                                                  time_embedding_type="fourier"),
    "class-conditioned (num_class_embeds)": plain(("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"),
                                                  num_class_embeds=7),
    "class embeds (timestep)": plain(("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"),
                                     class_embed_type="timestep"),
    "class embeds (identity)": plain(("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"),
                                     class_embed_type="identity"),
    "downsample_type/upsample_type=resnet": plain(("AttnDownBlock2D", "AttnDownBlock2D"),
                                                  ("AttnUpBlock2D", "AttnUpBlock2D"), downsample_type="resnet",
                                                  upsample_type="resnet"),
    "Resnet{Down,Up}sampleBlock2D": plain(("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                                          ("AttnUpBlock2D", "ResnetUpsampleBlock2D")),
    "scale_shift (mid attention without norm), mid scale": plain(
        ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"), resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=1.414),
    "attention_head_dim=None (one head), attn_norm_num_groups": plain(
        ("AttnDownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "AttnUpBlock2D"), head_dim=None,
        attn_norm_num_groups=2),
    "no mid attention, learned time, center input, act gelu": plain(
        ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"), add_attention=False,
        time_embedding_type="learned", num_train_timesteps=1000, center_input_sample=True, act_fn="gelu",
        time_embedding_dim=24, flip_sin_to_cos=False, freq_shift=1),
    "no mid block, downsample_padding=0": plain(("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"),
                                                mid_block_type=None, downsample_padding=0),
    # NCSN++ (diffusers' NCSNppModelTests, smaller): skip blocks, FIR resampling, norm_num_groups=None, Fourier time
    "NCSN++ skip blocks (FIR, own groups)": dict(
        block_out_channels=(32, 64, 32), in_channels=3, out_channels=3, layers_per_block=1,
        time_embedding_type="fourier", norm_eps=1e-6, mid_block_scale_factor=2**0.5, norm_num_groups=None,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"), sample_size=16),
}


def inputs(kind: str, config: dict, batch: int = 2, size=(16, 16), seed: int = 1) -> dict:
    """Seeded inputs for one forward call (timesteps as a 1-d tensor, labels as the config needs them)."""
    g = torch.Generator().manual_seed(seed)
    channels = config.get("block_out_channels")
    time_embed_dim = config.get("time_embedding_dim") or channels[0] * (
        2 if kind == "UNet2DConditionModel" and config.get("time_embedding_type") == "fourier" else 4)
    args = dict(sample=torch.randn(batch, config.get("in_channels", 4 if kind == "UNet2DConditionModel" else 3),
                                   *size, generator=g))
    if config.get("time_embedding_type") == "fourier":
        args["timestep"] = torch.rand(batch, generator=g) * 5 + 0.1  # noise levels sigma > 0
    else:
        args["timestep"] = torch.randint(0, 1000, (batch,), generator=g)
    if kind == "UNet2DConditionModel":
        cross = config["cross_attention_dim"]
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        args["encoder_hidden_states"] = torch.randn(batch, 5, cross, generator=g)
    embed_type = config.get("class_embed_type")
    if config.get("num_class_embeds") is not None and embed_type is None:
        args["class_labels"] = torch.randint(0, config["num_class_embeds"], (batch,), generator=g)
    elif embed_type == "timestep":
        args["class_labels"] = torch.randint(0, 1000, (batch,), generator=g)
    elif embed_type == "identity":
        args["class_labels"] = torch.randn(batch, time_embed_dim, generator=g)
    elif embed_type in ("projection", "simple_projection"):
        args["class_labels"] = torch.randn(batch, config["projection_class_embeddings_input_dim"], generator=g)
    return args


def reference_and_minidiff(kind: str, config: dict, folder, seed: int = 0):
    reference_class, minidiff_class = PAIRS[kind]
    torch.manual_seed(seed)
    reference = reference_class(**config)
    randomize_(reference, seed)
    reference.save_pretrained(folder)
    return reference.eval(), minidiff_class.from_pretrained(folder)  # eval: the dropout configs must not drop


def float_inputs(args: dict) -> list[str]:
    return [name for name, value in args.items() if torch.is_tensor(value) and value.is_floating_point()
            and name != "timestep"]


def run(model, args: dict, projection: torch.Tensor | None = None):
    """Output, and (when ``projection`` is given) d(sum(output * projection)) w.r.t. inputs and parameters."""
    args = {k: v.clone().requires_grad_(k in float_inputs(args)) if torch.is_tensor(v) else v for k, v in args.items()}
    model.zero_grad(set_to_none=True)
    output = model(**args).sample
    if projection is None:
        return output.detach(), {}
    (output * projection).sum().backward()
    grads = {f"input {k}": args[k].grad for k in float_inputs(args)}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return output.detach(), grads


def compare_models(kind: str, case: str, reference, ours, args: dict, gradients: bool = True) -> None:
    sample = args["sample"]
    output_shape = (sample.shape[0], reference.config.out_channels, *sample.shape[2:])
    projection = torch.randn(output_shape, generator=torch.Generator().manual_seed(7)) if gradients else None
    theirs, their_grads = run(reference, args, projection)
    mine, my_grads = run(ours, args, projection)
    compare(kind, f"{case}: forward", mine, theirs, FORWARD_TOL)
    if not gradients:
        return
    compare_gradients(kind, case, my_grads, their_grads, GRAD_TOL)


@pytest.mark.parametrize("case", list(CONDITION_CASES))
def test_unet_2d_condition(tmp_path, case):
    config = CONDITION_CASES[case]
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path)
    compare_models("UNet2DConditionModel", case, reference, ours, inputs("UNet2DConditionModel", config))


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_unet_2d(tmp_path, case):
    config = PLAIN_CASES[case]
    reference, ours = reference_and_minidiff("UNet2DModel", config, tmp_path)
    compare_models("UNet2DModel", case, reference, ours, inputs("UNet2DModel", config))


@pytest.mark.parametrize("kind, case, size", [
    ("UNet2DConditionModel", "diffusers test config", (13, 11)),
    ("UNet2DConditionModel", "no mid block, 3 levels, layers per level", (10, 18)),
    ("UNet2DModel", "DDPM-like 3 levels", (12, 20)),
])
def test_sizes_not_multiple_of_levels(tmp_path, kind, size, case):
    """Upsamplers resize to the skip tensor's size (diffusers' upsample_size), batch of 1."""
    config = (CONDITION_CASES if kind == "UNet2DConditionModel" else PLAIN_CASES)[case]
    reference, ours = reference_and_minidiff(kind, config, tmp_path)
    compare_models(kind, f"{case}, size {size[0]}x{size[1]}", reference, ours,
                   inputs(kind, config, batch=1, size=size))


@pytest.mark.parametrize("timestep", [7, 7.5, "0-d", "1-element"])
def test_timestep_forms(tmp_path, timestep):
    """Python int/float, 0-d tensor and 1-element tensor, broadcast over the batch, in both UNets."""
    forms = {"0-d": torch.tensor(321), "1-element": torch.tensor([321.5])}
    for kind, cases in (("UNet2DConditionModel", CONDITION_CASES), ("UNet2DModel", PLAIN_CASES)):
        config = cases["diffusers test config"]
        reference, ours = reference_and_minidiff(kind, config, tmp_path / kind)
        args = inputs(kind, config, batch=3)
        args["timestep"] = forms.get(timestep, timestep)
        compare_models(kind, f"timestep given as {timestep}", reference, ours, args, gradients=False)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.long])
def test_encoder_attention_mask(tmp_path, mask_dtype):
    """A (B, tokens) keep/hide mask on the text tokens, every cross-attention, with gradients; hiding the last
    token equals dropping it (diffusers' own check)."""
    config = CONDITION_CASES["diffusers test config"]
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path)
    args = inputs("UNet2DConditionModel", config)
    batch, tokens, _ = args["encoder_hidden_states"].shape
    mask = torch.ones(batch, tokens)
    mask[0, -2:], mask[1, 1] = 0, 0
    compare_models("UNet2DConditionModel", "encoder_attention_mask", reference, ours,
                   dict(args, encoder_attention_mask=mask.to(mask_dtype)))
    keep_all_but_last = (torch.arange(tokens) < tokens - 1).expand(batch, -1).to(mask_dtype)
    with torch.no_grad():
        masked = ours(**args, encoder_attention_mask=keep_all_but_last).sample
        truncated = ours(**dict(args, encoder_hidden_states=args["encoder_hidden_states"][:, :-1])).sample
    compare("UNet2DConditionModel", "a hidden last token equals a dropped one", masked, truncated, 1e-5)


@pytest.mark.parametrize("kind, case", [("UNet2DConditionModel", "SD2-like (linear proj, heads per level, upcast)"),
                                        ("UNet2DConditionModel", "class embeds (timestep, concatenated)"),
                                        ("UNet2DModel", "fourier time embedding (score model)"),
                                        ("UNet2DModel", "NCSN++ skip blocks (FIR, own groups)"),
                                        ("UNet2DModel", "downsample_type/upsample_type=resnet")])
def test_minidiff_saved_folder_loads_in_diffusers(tmp_path, kind, case):
    config = (CONDITION_CASES if kind == "UNet2DConditionModel" else PLAIN_CASES)[case]
    reference_class, minidiff_class = PAIRS[kind]
    torch.manual_seed(3)
    ours = minidiff_class(**config)
    randomize_(ours, 3)
    ours.save_pretrained(tmp_path)
    reference = reference_class.from_pretrained(tmp_path)
    assert type(reference) is reference_class
    compare_models(kind, f"reverse (minidiff-saved, diffusers-loaded): {case}", reference.eval(), ours.eval(),
                   inputs(kind, config))


@pytest.mark.parametrize("backend", ["math", "sdpa", "chunked"])
def test_attention_backends_match_diffusers(tmp_path, backend):
    config = CONDITION_CASES["odd head dims (12 ch / 5 heads, 24 ch / 7 heads)"]
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path)
    if backend == "chunked":
        ours.enable_attention_slicing(7)  # 256 query rows at 16x16 -> 37 slices
    else:
        ours.set_attention_backend(backend)
    compare_models("UNet2DConditionModel", f"attention backend {backend}", reference, ours,
                   inputs("UNet2DConditionModel", config))


def sd15_config() -> dict:
    """Stable Diffusion 1.5's unet/config.json (diffusers defaults plus these)."""
    return dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                down_block_types=list(SD_DOWN), up_block_types=list(SD_UP), layers_per_block=2, norm_num_groups=32)


@pytest.mark.slow
def test_full_size_sd15_unet():
    """SD 1.5-shaped UNet (860M random parameters), batch 1, 32x32 latents. Both models share one copy of the
    weights (3.4 GB, not 6.9): minidiff's takes the reference's tensors, made channels-last as minidiff keeps them."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**sd15_config()).eval()
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        theirs = reference(sample, 981, text).sample
    reference.to(memory_format=torch.channels_last)  # one tensor at a time: the peak stays one model
    with torch.device("meta"):  # skip minidiff's random init: the weights are the reference's
        ours = UNet2DConditionModel(**sd15_config())
    state_dict = reference.state_dict()
    check_state_dict(ours, state_dict, "the reference UNet")
    ours.load_state_dict(state_dict, strict=True, assign=True)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        mine = ours.eval()(sample, 981, text).sample
    compare("UNet2DConditionModel", "SD 1.5 shape (860M params), 32x32 latents: forward", mine, theirs, FORWARD_TOL)


# ---- property-based configurations -------------------------------------------------------------------------------

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D")


@st.composite
def condition_configs(draw):
    levels = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    return cond(
        [draw(st.sampled_from(DOWN_TYPES)) for _ in range(levels)],
        [draw(st.sampled_from(UP_TYPES)) for _ in range(levels)],
        channels=[draw(st.sampled_from([12, 24])) for _ in range(levels)], groups=groups,
        cross=draw(st.integers(3, 10)), heads=[draw(st.sampled_from([1, 2, 3, 4, 6])) for _ in range(levels)],
        layers_per_block=draw(st.integers(1, 2)), transformer_layers_per_block=draw(st.integers(1, 2)),
        use_linear_projection=draw(st.booleans()), only_cross_attention=draw(st.booleans()),
        upcast_attention=draw(st.booleans()), mid_block_type=draw(st.sampled_from(
            ["UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None])),
        resnet_time_scale_shift=draw(st.sampled_from(["default", "scale_shift"])),
        flip_sin_to_cos=draw(st.booleans()), freq_shift=draw(st.sampled_from([0, 1])),
        act_fn=draw(st.sampled_from(["silu", "mish", "gelu"])), norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
    )


@st.composite
def plain_configs(draw):
    levels = draw(st.integers(1, 3))
    return plain(
        [draw(st.sampled_from(("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"))) for _ in range(levels)],
        [draw(st.sampled_from(("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"))) for _ in range(levels)],
        channels=[draw(st.sampled_from([8, 12, 16])) for _ in range(levels)], groups=draw(st.sampled_from([1, 2, 4])),
        head_dim=draw(st.sampled_from([None, 2, 3, 4, 8])), layers_per_block=draw(st.integers(1, 2)),
        downsample_type=draw(st.sampled_from(["conv", "resnet"])), upsample_type=draw(st.sampled_from(["conv", "resnet"])),
        resnet_time_scale_shift=draw(st.sampled_from(["default", "scale_shift"])),
        time_embedding_type=draw(st.sampled_from(["positional", "fourier"])),
        num_class_embeds=draw(st.sampled_from([None, 3])), add_attention=draw(st.booleans()),
        mid_block_scale_factor=draw(st.sampled_from([1.0, 1.5])),
    )


@settings(max_examples=15, deadline=None)
@given(config=condition_configs(), seed=st.integers(0, 2**16))
def test_unet_2d_condition_hypothesis(tmp_path_factory, config, seed):
    folder = tmp_path_factory.mktemp("unet")
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, folder, seed)
    size = (8, 12) if len(config["block_out_channels"]) < 3 else (8, 16)
    compare_models("UNet2DConditionModel", "hypothesis configs", reference, ours,
                   inputs("UNet2DConditionModel", config, size=size, seed=seed))


@settings(max_examples=15, deadline=None)
@given(config=plain_configs(), seed=st.integers(0, 2**16))
def test_unet_2d_hypothesis(tmp_path_factory, config, seed):
    folder = tmp_path_factory.mktemp("unet")
    reference, ours = reference_and_minidiff("UNet2DModel", config, folder, seed)
    compare_models("UNet2DModel", "hypothesis configs", reference, ours,
                   inputs("UNet2DModel", config, size=(8, 12), seed=seed))


@pytest.mark.parametrize("slice_size", ["auto", "max", 2, [1, 2, 4, 3, 2, 1, 8, 5]])
def test_head_slicing_matches_diffusers(tmp_path, slice_size):
    """diffusers' ``set_attention_slice``: batch x heads score matrices a slice at a time, with a text-token mask."""
    config = dict(CONDITION_CASES["diffusers test config"], block_out_channels=[16, 32], attention_head_dim=[4, 8])
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path)
    ours.set_attention_slice(slice_size)
    reference.set_attention_slice(slice_size)
    args = inputs("UNet2DConditionModel", config)
    args["encoder_attention_mask"] = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    compare_models("UNet2DConditionModel", f"set_attention_slice({slice_size!r})", reference, ours, args)


def test_attention_processors_map_onto_backends(tmp_path):
    """diffusers' processor API: the same ``attn_processors`` keys; diffusers' own processor objects (one for all,
    or a dict) choose minidiff's kernels, and the outputs match diffusers' with those processors."""
    from diffusers.models import attention_processor as theirs

    from minidiff.models import attention_processor as mine_processors

    config = dict(CONDITION_CASES["diffusers test config"], block_out_channels=[16, 32], attention_head_dim=[4, 8])
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path)
    assert sorted(ours.attn_processors) == sorted(reference.attn_processors)
    args = inputs("UNet2DConditionModel", config)
    for processor in (theirs.AttnProcessor(), theirs.AttnProcessor2_0(), theirs.SlicedAttnProcessor(3)):
        ours.set_attn_processor(processor)
        reference.set_attn_processor(processor)
        assert all(type(p) is type(processor) for p in ours.attn_processors.values())  # what was set comes back
        compare_models("UNet2DConditionModel", f"set_attn_processor({type(processor).__name__})", reference, ours,
                       args, gradients=False)
    ours.set_attn_processor({key: mine_processors.BackendProcessor("chunked") for key in ours.attn_processors})
    ours.set_default_attn_processor()
    reference.set_default_attn_processor()
    compare_models("UNet2DConditionModel", "set_default_attn_processor", reference, ours, args, gradients=False)
    with pytest.raises(ValueError, match=r"the attention processor XFormersAttnProcessor runs code of its own.*"
                                         r"minidiff.ops.register_backend"):
        ours.set_attn_processor(theirs.XFormersAttnProcessor())
    with pytest.raises(ValueError, match=r"a dict of processors needs one entry per attention layer.* the number "
                                         r"of processors \(1\)"):
        ours.set_attn_processor({"conv_in.processor": theirs.AttnProcessor()})
