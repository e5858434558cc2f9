"""Bad configs and bad inputs of the four models give a one-line ValueError/TypeError naming the key or argument
(issue 11), never a torch error from inside a layer, a ZeroDivisionError or a NaN."""

from __future__ import annotations

import json

import pytest
import torch

from minidiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, UNet2DModel
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

COND = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, sample_size=8, in_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=8, attention_head_dim=2)
PLAIN = dict(block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=4, layers_per_block=1, sample_size=8)
VAE = dict(block_out_channels=[4, 8], norm_num_groups=2, latent_channels=2, sample_size=16, layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
CLIP = dict(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12, bos_token_id=98, eos_token_id=99, pad_token_id=0)
BASE = {UNet2DConditionModel: COND, UNet2DModel: PLAIN, AutoencoderKL: VAE, CLIPTextModel: CLIP}

SKIP = dict(down_block_types=["SkipDownBlock2D", "SkipDownBlock2D"], up_block_types=["SkipUpBlock2D", "SkipUpBlock2D"],
            norm_num_groups=None, in_channels=3)
CONFIG_ERRORS = [
    # NCSN++ skip blocks (UNet2DModel only)
    (UNet2DModel, dict(SKIP, up_block_types=["UpBlock2D", "SkipUpBlock2D"]),
     r"mix NCSN\+\+ skip blocks \['SkipDownBlock2D', 'SkipDownBlock2D', 'SkipUpBlock2D'\] with others"),
    (UNet2DModel, dict(norm_num_groups=None), r"norm_num_groups=None is invalid: is only for NCSN\+\+ skip blocks"),
    (UNet2DModel, dict(SKIP, in_channels=4), r"in_channels=4 is invalid: must be 3 with NCSN\+\+ skip blocks"),
    (UNet2DModel, dict(SKIP, block_out_channels=[8, 18]), r"has 18, which NCSN\+\+'s min\(channels // 4, 32\) = 4"),
    (UNet2DModel, dict(SKIP, down_block_types=["SkipDownBlock2D", "AttnSkipDownBlock2D"]),
     r"has 16 at level 1, whose NCSN\+\+ attention normalises in 32 groups"),
    (UNet2DConditionModel, dict(down_block_types=["SkipDownBlock2D", "DownBlock2D"]),
     r"down_block_types: SkipDownBlock2D is an NCSN\+\+ block of UNet2DModel"),
    # UNet2DConditionModel (most checks are shared with UNet2DModel)
    (UNet2DConditionModel, dict(block_out_channels=[8, -16]), r"block_out_channels=\[8, -16\] is invalid: every entry "
                                                              r"must be an int >= 1"),
    (UNet2DConditionModel, dict(block_out_channels=[8, 0]), r"block_out_channels=\[8, 0\] is invalid"),
    (UNet2DConditionModel, dict(block_out_channels=[], down_block_types=[], up_block_types=[]),
     r"block_out_channels=\[\] is invalid: needs at least one entry"),
    (UNet2DConditionModel, dict(in_channels=0), r"in_channels=0 is invalid: must be an int >= 1; use ints >= 1 in "
                                                r"in_channels"),
    (UNet2DConditionModel, dict(out_channels=-4), r"out_channels=-4 is invalid"),
    (UNet2DConditionModel, dict(norm_num_groups=0), r"norm_num_groups=0 is invalid"),
    (UNet2DConditionModel, dict(norm_num_groups=3), r"norm_num_groups=3 does not divide block_out_channels \[8, 16\] "
                                                    r"\(each GroupNorm splits"),
    (UNet2DConditionModel, dict(layers_per_block=0), r"layers_per_block=0 is invalid"),
    (UNet2DConditionModel, dict(layers_per_block=[1, 1, 1]), r"layers_per_block has 3 entries but there are 2 "
                                                             r"down_block_types"),
    (UNet2DConditionModel, dict(transformer_layers_per_block=[1]), r"transformer_layers_per_block has 1 entries"),
    (UNet2DConditionModel, dict(transformer_layers_per_block=-1), r"transformer_layers_per_block=-1 is invalid: must "
                                                                  r"be an int >= 0"),
    (UNet2DConditionModel,
     dict(transformer_layers_per_block=[[1], [-1]], reverse_transformer_layers_per_block=[[1, 1]] * 2),
     r"transformer_layers_per_block=\[\[1\], \[-1\]\] is invalid: every entry must be an int >= 0"),
    (UNet2DConditionModel,
     dict(transformer_layers_per_block=[[1], [1]], reverse_transformer_layers_per_block=[[1], [1]]),
     r"reverse_transformer_layers_per_block=\[\[1\], \[1\]\] is invalid: block 0 has 2 resnet layer\(s\) but 1 depth"),
    (UNet2DConditionModel, dict(attention_head_dim=0), r"attention_head_dim=0 is invalid"),
    (UNet2DConditionModel, dict(attention_head_dim=16), r"attention_head_dim=16 is invalid: this head count gives 16 "
                                                        r"attention head\(s\) for the 8 channels of level 0"),
    (UNet2DConditionModel, dict(num_attention_heads=[2, 0]), r"num_attention_heads=\[2, 0\] is invalid"),
    (UNet2DConditionModel, dict(cross_attention_dim=0), r"cross_attention_dim=0 is invalid"),
    (UNet2DConditionModel, dict(cross_attention_dim=[8, 12]), r"cross_attention_dim=\[8, 12\] is invalid: gives the "
                                                              r"cross-attention levels different widths \[8, 12\]"),
    (UNet2DConditionModel, dict(down_block_types=["CrossAttnDownBlock2D", "FancyBlock"]),
     r"down_block_types: down block type 'FancyBlock' is not supported; supported types: DownBlock2D"),
    (UNet2DConditionModel, dict(norm_eps=0.0), r"norm_eps=0.0 is invalid: must be a finite number > 0"),
    (UNet2DConditionModel, dict(norm_eps=float("nan")), r"norm_eps=nan is invalid"),
    (UNet2DConditionModel, dict(dropout=1.5), r"dropout=1.5 is invalid: a dropout probability must be in \[0, 1\)"),
    (UNet2DConditionModel, dict(sample_size=0), r"sample_size=0 is invalid"),
    (UNet2DConditionModel, dict(sample_size=[8, -8]), r"sample_size=\[8, -8\] is invalid"),
    (UNet2DConditionModel, dict(conv_in_kernel=4), r"conv_in_kernel=4 is invalid: an even kernel changes the image"),
    (UNet2DConditionModel, dict(time_embedding_type="fourier", time_embedding_dim=7),
     r"time_embedding_dim=7 is invalid: time_embedding_type='fourier' needs an even"),
    (UNet2DConditionModel, dict(class_embeddings_concat=True), r"class_embeddings_concat=True is invalid: there is no "
                                                               r"class embedding"),
    (UNet2DConditionModel, dict(resnet_out_scale_factor=0.0), r"resnet_out_scale_factor=0.0 is invalid: must be in "
                                                              r"\[0.01, 100\]"),
    (UNet2DConditionModel, dict(act_fn="tanh"), r"act_fn: activation 'tanh' is not supported"),
    (UNet2DConditionModel, dict(time_embedding_act_fn="tanh"), r"time_embedding_act_fn: activation 'tanh'"),
    # wrong types, refused by build_config thanks to exact annotations
    (UNet2DConditionModel, dict(block_out_channels="8,16"), r"block_out_channels='8,16' has the wrong type str"),
    (UNet2DConditionModel, dict(layers_per_block=1.0), r"layers_per_block=1.0 has the wrong type float"),
    (UNet2DConditionModel, dict(norm_num_groups=None), r"norm_num_groups=None has the wrong type NoneType"),
    (UNet2DConditionModel, dict(transformer_layers_per_block="1"),
     r"transformer_layers_per_block='1' has the wrong type"),
    (UNet2DConditionModel, dict(only_cross_attention=[1, 0]), r"only_cross_attention=\[1, 0\] has the wrong type"),
    # UNet2DModel
    (UNet2DModel, dict(attention_head_dim=32), r"attention_head_dim=32 is invalid: this head size gives 0 attention "
                                               r"head\(s\) for the 16 channels of level 1"),
    (UNet2DModel, dict(attn_norm_num_groups=3), r"attn_norm_num_groups=3 is invalid: does not divide the 16"),
    (UNet2DModel, dict(mid_block_scale_factor=1e-12), r"mid_block_scale_factor=1e-12 is invalid"),
    (UNet2DModel, dict(time_embedding_type="learned", num_train_timesteps=0), r"num_train_timesteps=0 is invalid"),
    (UNet2DModel, dict(freq_shift=4), r"freq_shift=4 is invalid: equals half of block_out_channels\[0\]=8"),
    (UNet2DModel, dict(downsample_padding=-1), r"downsample_padding=-1 is invalid: must be an int >= 0"),
    (UNet2DModel, dict(num_class_embeds=0), r"num_class_embeds=0 is invalid"),
    (UNet2DModel, dict(attention_head_dim=4.0), r"attention_head_dim=4.0 has the wrong type float"),
    # AutoencoderKL
    (AutoencoderKL, dict(latent_channels=0), r"latent_channels=0 is invalid"),
    (AutoencoderKL, dict(block_out_channels=[4, -8]), r"block_out_channels=\[4, -8\] is invalid"),
    (AutoencoderKL, dict(norm_num_groups=0), r"norm_num_groups=0 is invalid"),
    (AutoencoderKL, dict(layers_per_block=0), r"layers_per_block=0 is invalid"),
    (AutoencoderKL, dict(scaling_factor=0.0), r"scaling_factor=0.0 is invalid: must be a finite number > 0"),
    (AutoencoderKL, dict(scaling_factor=float("inf")), r"scaling_factor=inf is invalid"),
    (AutoencoderKL, dict(shift_factor=float("nan")), r"shift_factor=nan is invalid: must be a finite number"),
    (AutoencoderKL, dict(latents_mean=[0.0]), r"latents_mean=\[0.0\] is invalid: needs 2 \(latent_channels\)"),
    (AutoencoderKL, dict(latents_std=[1.0, 0.0]), r"latents_std=\[1.0, 0.0\] is invalid: .* all > 0"),
    (AutoencoderKL, dict(sample_size=-16), r"sample_size=-16 is invalid"),
    (AutoencoderKL, dict(block_out_channels="4,8"), r"block_out_channels='4,8' has the wrong type str"),
    # CLIPTextModel
    (CLIPTextModel, dict(vocab_size=0), r"vocab_size=0 is invalid"),
    (CLIPTextModel, dict(hidden_size=0), r"hidden_size=0 is invalid"),
    (CLIPTextModel, dict(num_attention_heads=0), r"num_attention_heads=0 is invalid"),
    (CLIPTextModel, dict(num_attention_heads=3), r"hidden_size=8 is not divisible by num_attention_heads=3"),
    (CLIPTextModel, dict(intermediate_size=-1), r"intermediate_size=-1 is invalid"),
    (CLIPTextModel, dict(num_hidden_layers=-1), r"num_hidden_layers=-1 is invalid: must be an int >= 0"),
    (CLIPTextModel, dict(max_position_embeddings=0), r"max_position_embeddings=0 is invalid"),
    (CLIPTextModel, dict(layer_norm_eps=0.0), r"layer_norm_eps=0.0 is invalid"),
    (CLIPTextModel, dict(layer_norm_eps=float("-inf")), r"layer_norm_eps=-inf is invalid"),
    (CLIPTextModel, dict(eos_token_id=100), r"eos_token_id=100 is invalid: is not a token id of the vocabulary "
                                            r"\(vocab_size=100\)"),
    (CLIPTextModel, dict(hidden_size="8"), r"hidden_size='8' has the wrong type str"),
]


@pytest.mark.parametrize("model_class, changes, match", CONFIG_ERRORS,
                         ids=[f"{cls.__name__}-{'-'.join(changes)}" for cls, changes, _ in CONFIG_ERRORS])
def test_bad_config_names_the_key(model_class, changes, match):
    error = TypeError if "wrong type" in match else ValueError
    with pytest.raises(error, match=match) as caught:
        model_class(**{**BASE[model_class], **changes})
    assert "\n" not in str(caught.value)


def test_tiling_needs_a_sample_size_of_at_least_two_latent_pixels():
    vae = AutoencoderKL(**{**VAE, "sample_size": 2})
    with pytest.raises(ValueError, match=r"sample_size=2 is invalid: tiles of 2 pixels are 1 latent pixels, too small "
                                         r"to blend; use sample_size >= 4"):
        vae.enable_tiling()
    AutoencoderKL(**{**VAE, "sample_size": 4}).enable_tiling()


# ---- a broken config.json in a model folder: the error names the file and the key --------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved tiny model folder per class."""
    folders = {}
    for model_class, config in BASE.items():
        torch.manual_seed(0)
        folders[model_class] = tmp_path_factory.mktemp(model_class.__name__)
        model_class(**config).save_pretrained(folders[model_class])
    return folders


def damage(folder, edit) -> str:
    path = folder / "config.json"
    original = path.read_text()
    config = json.loads(original)
    text = edit(config) if callable(edit) else edit
    path.write_text(text if isinstance(text, str) else json.dumps(config))
    return original


FOLDER_ERRORS = [
    (UNet2DConditionModel, "{not json", ValueError, r"config.json is not valid JSON"),
    (UNet2DConditionModel, "[1, 2]", ValueError, r"config.json must hold a JSON object, found a list"),
    (UNet2DConditionModel, lambda c: c.update(block_out_channels="8,16"), TypeError,
     r"config.json: UNet2DConditionModel config option block_out_channels='8,16' has the wrong type str"),
    (UNet2DConditionModel, lambda c: c.update(block_out_channels=[8, -16]), ValueError,
     r"config.json: block_out_channels=\[8, -16\] is invalid"),
    (UNet2DConditionModel, lambda c: c.pop("down_block_types"), ValueError,
     r"config.json: down_block_types \['CrossAttnDownBlock2D', .*\] .* must have the same length"),
    (UNet2DModel, lambda c: c.update(layers_per_block=2.0), TypeError, r"config.json: .*layers_per_block=2.0"),
    (UNet2DModel, lambda c: c.update(norm_num_groups=3), ValueError, r"config.json: norm_num_groups=3 does not divide"),
    (AutoencoderKL, lambda c: c.update(scaling_factor="0.18215"), TypeError,
     r"config.json: .*scaling_factor='0.18215'"),
    (AutoencoderKL, lambda c: c.update(latent_channels=-4), ValueError, r"config.json: latent_channels=-4 is invalid"),
    (CLIPTextModel, lambda c: c.update(num_attention_heads=3), ValueError,
     r"config.json: hidden_size=8 is not divisible by num_attention_heads=3"),
    (CLIPTextModel, lambda c: c.update(vocab_size=None), TypeError, r"config.json: .*vocab_size=None"),
]


@pytest.mark.parametrize("model_class, edit, error, match", FOLDER_ERRORS)
def test_broken_config_json_names_file_and_key(saved, model_class, edit, error, match):
    folder = saved[model_class]
    original = damage(folder, edit)
    try:
        with pytest.raises(error, match=match) as caught:
            model_class.from_pretrained(folder)
        assert str(folder / "config.json") in str(caught.value) and "\n" not in str(caught.value)
    finally:
        (folder / "config.json").write_text(original)


# ---- forward-time inputs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return dict(
        cond=UNet2DConditionModel(**COND).eval(),
        plain=UNet2DModel(**PLAIN).eval(),
        classes=UNet2DModel(**{**PLAIN, "num_class_embeds": 3}).eval(),
        fourier=UNet2DModel(**{**PLAIN, "time_embedding_type": "fourier"}).eval(),
        learned=UNet2DModel(**{**PLAIN, "time_embedding_type": "learned", "num_train_timesteps": 10}).eval(),
        narrow=UNet2DConditionModel(**{**COND, "block_out_channels": [4, 4], "attention_head_dim": 1}).eval(),
        resnet_up=UNet2DConditionModel(**{
            **COND, "down_block_types": ["CrossAttnDownBlock2D", "ResnetDownsampleBlock2D"],
            "up_block_types": ["ResnetUpsampleBlock2D", "CrossAttnUpBlock2D"]}).eval(),
        vae=AutoencoderKL(**VAE).eval(),
        clip=CLIPTextModel(**CLIP).eval(),
        ncsn=UNet2DModel(**{**PLAIN, **SKIP}).eval(),
    )


SAMPLE, TEXT, IDS = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8), torch.tensor([[98, 5, 99]])
FORWARD_ERRORS = [
    ("cond", lambda m: m(SAMPLE.long(), 1, TEXT), r"sample must be a floating-point tensor, got torch.int64"),
    ("cond", lambda m: m(SAMPLE.double(), 1, TEXT), r"sample has dtype torch.float64 but the model's weights are "
                                                    r"torch.float32; pass sample.to\(torch.float32\)"),
    ("cond", lambda m: m(SAMPLE, 1, TEXT.tolist()),
     r"encoder_hidden_states must be a tensor \(B, tokens, 8\), got list"),
    ("cond", lambda m: m(SAMPLE, 1, TEXT.double()), r"encoder_hidden_states has dtype torch.float64"),
    ("cond", lambda m: m(SAMPLE, 1, torch.randn(1, 0, 8)),
     r"encoder_hidden_states of shape \(1, 0, 8\) hold no tokens"),
    ("cond", lambda m: m(SAMPLE, torch.tensor([float("nan")]), TEXT), r"timestep must be finite, got \[nan\]"),
    ("cond", lambda m: m(SAMPLE, torch.tensor([[1.0]]), TEXT), r"timestep must be .* got shape \(1, 1\)"),
    ("cond", lambda m: m(torch.randn(1, 4, 0, 8), 1, TEXT), r"sample of 0x8 is too small: level 0 would be 0x8"),
    ("cond", lambda m: m(SAMPLE, 1, TEXT, encoder_attention_mask=torch.ones(1, 4)),
     r"encoder_attention_mask must be a tensor of shape \(batch, tokens\) = \(1, 3\) .* got \(1, 4\)"),
    ("cond", lambda m: m(SAMPLE, 1, TEXT, encoder_attention_mask=[[1, 1, 1]]),
     r"encoder_attention_mask must be a tensor .* got list"),
    ("narrow", lambda m: m(torch.randn(1, 4, 2, 2), 1, TEXT), r"sample of 2x2 is too small: level 1 would be 1x1, too "
                                                              r"small to downsample or normalise; use a sample of at "
                                                              r"least 4x4"),
    ("resnet_up", lambda m: m(torch.randn(1, 4, 7, 7), 1, TEXT), r"sample of 7x7 does not fit the resnet upsampler of "
                                                                 r"up block 0, which doubles 4x4; use a height and "
                                                                 r"width that are multiples of 2"),
    ("classes", lambda m: m(SAMPLE[:, :3], 1, class_labels=torch.tensor([5])),
     r"class_labels must be integer ids in \[0, 3\) \(num_class_embeds\), got \[5\]"),
    ("classes", lambda m: m(SAMPLE[:, :3], 1, class_labels=torch.tensor([0.5])), r"class_labels must be integer ids"),
    ("classes", lambda m: m(SAMPLE[:, :3], 1, class_labels=torch.tensor([[1]])), r"class_labels must be a 1-d tensor"),
    ("classes", lambda m: m(SAMPLE[:, :3], 1, class_labels=torch.tensor([1, 1, 1])),
     r"class_labels of shape \(3,\) give a class embedding of shape \(3, 32\); expected \(1, 32\)"),
    ("classes", lambda m: m(SAMPLE[:, :3], 1, class_labels=[1]), r"class_labels must be a tensor, got list"),
    ("ncsn", lambda m: m(torch.randn(1, 3, 7, 7), 1), r"sample of 7x7 does not fit the FIR upsampler of up block 0, "
                                                     r"which doubles 3x3; use a height and width that are multiples "
                                                     r"of 2"),
    ("fourier", lambda m: m(SAMPLE[:, :3], 0.5), r"time_embedding_type='fourier' takes the noise level sigma > 0 as "
                                                 r"timestep, got \[0\] \(python numbers are truncated to int"),
    ("fourier", lambda m: m(SAMPLE[:, :3], torch.tensor([-1.0])), r"sigma > 0 as timestep, got \[-1.0\]"),
    ("learned", lambda m: m(SAMPLE[:, :3], 10),
     r"'learned' takes integer timesteps in \[0, 10\) \(num_train_timesteps\)"),
    ("vae", lambda m: m.encode(torch.zeros(1, 3, 8, 8, dtype=torch.long)), r"images must be a floating-point tensor"),
    ("vae", lambda m: m.decode(torch.zeros(1, 2, 2, 2, dtype=torch.float64)), r"latents has dtype torch.float64"),
    ("clip", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), r"input_ids of shape \(1, 0\) hold no tokens"),
    ("clip", lambda m: m(IDS, attention_mask=[[1, 1, 1]]), r"attention_mask must be a tensor of the input_ids shape"),
    ("clip", lambda m: m(IDS, position_ids=torch.tensor([[0, 1, 50]])),
     r"position_ids must be integers in \[0, 12\) \(max_position_embeddings\)"),
    ("clip", lambda m: m(IDS, position_ids=torch.tensor([0, 1, 2])), r"position_ids must be .* got \(3,\)"),
]


@pytest.mark.parametrize("name, call, match", FORWARD_ERRORS)
def test_bad_forward_input_names_the_argument(models, name, call, match):
    with pytest.raises(ValueError, match=match) as caught:
        with torch.no_grad():
            call(models[name])
    assert "\n" not in str(caught.value)


def test_valid_edge_inputs_still_run(models):
    """The checks refuse only what fails: odd sizes with conv upsamplers, the smallest allowed map, sigma > 0."""
    with torch.no_grad():
        assert models["cond"](torch.randn(1, 4, 7, 9), 1, TEXT).sample.shape == (1, 4, 7, 9)
        assert torch.isfinite(models["narrow"](torch.randn(1, 4, 4, 4), 1, TEXT).sample).all()
        assert models["resnet_up"](torch.randn(1, 4, 6, 6), 1, TEXT).sample.shape == (1, 4, 6, 6)
        assert torch.isfinite(models["fourier"](SAMPLE[:, :3], torch.tensor([0.5])).sample).all()
        assert torch.isfinite(models["learned"](SAMPLE[:, :3], 9).sample).all()
        assert models["clip"](IDS, position_ids=torch.tensor([[0, 1, 2]])).last_hidden_state.shape == (1, 3, 8)


def test_bad_attention_slice_names_the_limit(models):
    unet = models["cond"]
    with pytest.raises(ValueError, match=r"slice_size has 1 entries but UNet2DConditionModel has \d+ attention layers"):
        unet.set_attention_slice([1])
    with pytest.raises(ValueError, match=r"slice_size=99 must be an int in \[1, \d+\] \(this attention's heads\)"):
        unet.set_attention_slice(99)
    unet.set_attention_slice(None)  # off again
