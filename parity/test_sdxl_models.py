"""SDXL model parity with diffusers 0.42.1 / transformers 5.23: the text_time UNet, both text encoders, the VAE.

UNet cases follow parity/test_unets.py (seeded reference with every parameter perturbed, saved, loaded by minidiff;
forward 1e-5 relative, gradients 1e-4 of a fixed random projection of the output w.r.t. every input and parameter),
with the added conditioning exactly as the SDXL pipelines pass it (Podell et al. 2023, Sec. 2.2): a CFG batch
[negative, positive] of pooled text embeddings and size/crop ids (base: original size, crop top-left, target size;
refiner: original size, crop, aesthetic score, Sec. 2.5). The full-size base and refiner UNets run once each at small
latents with random weights that both libraries share.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.models import UNet2DConditionModel
from minidiff.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from minidiff.models.modeling import check_state_dict
from minidiff.models.vae import AutoencoderKL
from parity.pipeline_fixtures import randomize_
from parity.report import compare, compare_exact, compare_gradients
from parity.sdxl_fixtures import REFINER_UNET, SDXL_TEXT, SDXL_UNET, SDXL_VAE, reference_tokenizers
from parity.test_unets import reference_and_minidiff
from parity.test_vae import compare_vaes, images
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

UNET = "UNet2DConditionModel (SDXL)"
TEXT = "CLIPTextModelWithProjection"
VAE = "AutoencoderKL (SDXL)"
FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4

CROSS = ("CrossAttnDownBlock2D",), ("CrossAttnUpBlock2D",)
PLAIN = ("DownBlock2D",), ("UpBlock2D",)


def sdxl(down, up, channels, heads, text_width=16, time_ids=6, per_id=4, **extra) -> dict:
    """A text_time UNet config whose add_embedding takes ``text_width + time_ids * per_id`` features."""
    return dict(dict(
        block_out_channels=list(channels), down_block_types=list(down), up_block_types=list(up),
        attention_head_dim=list(heads), layers_per_block=2, norm_num_groups=8, cross_attention_dim=24,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=per_id,
        projection_class_embeddings_input_dim=text_width + time_ids * per_id, sample_size=16), **extra)


UNET_CASES = {  # case -> (config, number of time ids)
    # diffusers tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py, get_dummy_components, verbatim:
    # channels (2, 4) with 2 and 4 heads (head size 1); parity/sdxl_fixtures.SDXL_UNET widens them to (32, 64)
    "diffusers SDXL pipeline test config": (dict(SDXL_UNET, block_out_channels=(2, 4)), 6),
    "sdxl_fixtures.SDXL_UNET (channels 32, 64)": (SDXL_UNET, 6),
    "3 levels, transformer_layers_per_block=(1, 2, 3)": (sdxl(
        PLAIN[0] + CROSS[0] * 2, CROSS[1] * 2 + PLAIN[1], channels=(16, 32, 48), heads=(2, 4, 6),
        transformer_layers_per_block=[1, 2, 3]), 6),
    "per-layer depth lists + reverse_transformer_layers_per_block (0s inside)": (sdxl(
        CROSS[0] * 3, CROSS[1] * 3, channels=(16, 16, 32), heads=(2, 2, 4),
        transformer_layers_per_block=[1, [1, 2], [2, 0]],
        reverse_transformer_layers_per_block=[[1, 2, 3], [2, 0, 1], [1, 1, 1]]), 6),
    "refiner-like: sdxl_fixtures.REFINER_UNET (5 time ids)": (REFINER_UNET, 5),
    "refiner-like: 4 levels, depth 2, upcast_attention, heads per level, 5 ids": (sdxl(
        PLAIN[0] + CROSS[0] * 2 + PLAIN[0], PLAIN[1] + CROSS[1] * 2 + PLAIN[1], channels=(8, 16, 32, 32),
        heads=(1, 2, 4, 4), text_width=32, time_ids=5, per_id=8, cross_attention_dim=32,
        transformer_layers_per_block=2, upcast_attention=True), 5),
    "degenerate: 0 transformer layers in the last level and the mid block": (dict(
        SDXL_UNET, down_block_types=CROSS[0] * 2, up_block_types=CROSS[1] * 2, transformer_layers_per_block=(1, 0)),
        6),
}


def time_ids(count: int, batch: int) -> torch.Tensor:
    """The CFG batch of micro-conditioning ids the pipelines build: [negative, positive] repeated.
    6 ids: (original h, w, crop top, left, target h, w); 5 ids: (original h, w, crop top, left, aesthetic score)."""
    if count == 6:
        negative, positive = [512, 512, 0, 0, 1024, 1024], [1024, 1024, 0, 0, 1024, 1024]
    elif count == 5:
        negative, positive = [1024, 1024, 0, 0, 2.5], [1024, 1024, 0, 0, 6.0]
    else:  # other widths (hypothesis configs): sizes and offsets of the same magnitudes
        negative, positive = [64.0 * (i + 1) for i in range(count)], [1024.0 - 100 * i for i in range(count)]
    return torch.tensor([negative, positive] * (batch // 2), dtype=torch.float32)  # (batch, count)


def unet_inputs(config: dict, count: int, batch: int = 2, size=(16, 16), seed: int = 1) -> dict:
    """sample, per-sample timesteps, 77 text tokens and the added conditioning: ``count`` time ids (B, count) and
    text_embeds (B, P) with P filling the rest of the add_embedding's input."""
    per_id, width = config["addition_time_embed_dim"], config["projection_class_embeddings_input_dim"]
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, config.get("in_channels", 4), *size, generator=g),
        timestep=torch.tensor([999.0, 1.0] * (batch // 2)),  # Euler's float timesteps, one per sample
        encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g),
        added_cond_kwargs=dict(text_embeds=torch.randn(batch, width - count * per_id, generator=g),
                               time_ids=time_ids(count, batch)),
    )


def differentiable(args: dict) -> dict[str, torch.Tensor]:
    """Fresh leaf copies of the float inputs (added_cond_kwargs entries included), requiring gradients."""
    leaves = {name: args[name].clone().requires_grad_() for name in ("sample", "encoder_hidden_states")}
    leaves.update({name: value.clone().requires_grad_() for name, value in args["added_cond_kwargs"].items()})
    return leaves


def run(model, args: dict, projection: torch.Tensor | None):
    """Output, and (with ``projection``) d(sum(output * projection)) w.r.t. every float input and parameter."""
    if projection is None:
        with torch.no_grad():
            return model(**args).sample, {}
    leaves = differentiable(args)
    added = {name: leaves[name] for name in args["added_cond_kwargs"]}
    model.zero_grad(set_to_none=True)
    output = model(leaves["sample"], args["timestep"], leaves["encoder_hidden_states"],
                   added_cond_kwargs=added).sample
    (output * projection).sum().backward()
    grads = {f"input {name}": leaf.grad for name, leaf in leaves.items()}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return output.detach(), grads


def compare_unets(case: str, reference, ours, args: dict, gradients: bool = True) -> None:
    sample = args["sample"]
    shape = (sample.shape[0], reference.config.out_channels, *sample.shape[2:])
    projection = torch.randn(shape, generator=torch.Generator().manual_seed(7)) if gradients else None
    theirs, their_grads = run(reference, args, projection)
    mine, my_grads = run(ours, args, projection)
    compare(UNET, f"{case}: forward", mine, theirs, FORWARD_TOL)
    if gradients:
        assert their_grads["input time_ids"].abs().max() > 0  # the ids really reach the output
        compare_gradients(UNET, case, my_grads, their_grads, GRAD_TOL)


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_sdxl_unet(tmp_path, case):
    """Forward and gradients at per-sample timesteps (999, 1), then forwards at the pipelines' 0-d timesteps."""
    config, count = UNET_CASES[case]
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path)
    args = unet_inputs(config, count)
    compare_unets(case, reference, ours, args)
    for timestep in (torch.tensor(981.0), torch.tensor(500), 21):
        compare_unets(f"{case}, timesteps 981 / 500 / 21 broadcast", reference, ours, dict(args, timestep=timestep),
                      gradients=False)


def test_sdxl_unet_two_prompts_and_odd_latents(tmp_path):
    """A CFG batch of two prompts (B = 4, negatives first as the pipelines concatenate), 13x11 latents."""
    case = "sdxl_fixtures.SDXL_UNET (channels 32, 64)"
    config, count = UNET_CASES[case]
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path)
    compare_unets(f"{case}, batch 4, 13x11 latents", reference, ours,
                  unet_inputs(config, count, batch=4, size=(13, 11), seed=2))


def test_minidiff_saved_sdxl_unet_loads_in_diffusers(tmp_path):
    config, count = UNET_CASES["per-layer depth lists + reverse_transformer_layers_per_block (0s inside)"]
    torch.manual_seed(4)
    ours = UNet2DConditionModel(**config)
    randomize_(ours, 4)
    ours.save_pretrained(tmp_path)
    reference, info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), f"diffusers reported loading problems: {info}"
    compare_unets("reverse (minidiff-saved, diffusers-loaded): per-layer depth lists", reference.eval(), ours.eval(),
                  unet_inputs(config, count))


@st.composite
def sdxl_configs(draw):
    """(config, number of time ids): 1-3 levels of plain or cross-attention blocks, 1-7 ids of 4, 5 or 8 features
    (2 or 3 with freq_shift=1 divide by half - shift = 0 in the sinusoids: NaN in both libraries)."""
    levels, count = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    kinds = [draw(st.sampled_from(["DownBlock2D", "CrossAttnDownBlock2D"])) for _ in range(levels)]
    heads = [draw(st.sampled_from([1, 2, 4])) for _ in range(levels)]
    config = sdxl(
        kinds, [kind.replace("Down", "Up") for kind in reversed(kinds)], channels=[8 * h for h in heads], heads=heads,
        text_width=draw(st.integers(1, 12)), time_ids=count, per_id=draw(st.sampled_from([4, 5, 8])),
        layers_per_block=draw(st.integers(1, 2)), norm_num_groups=draw(st.sampled_from([1, 2, 4])),
        transformer_layers_per_block=[draw(st.integers(0, 2)) for _ in range(levels)],
        cross_attention_dim=draw(st.integers(3, 12)), use_linear_projection=draw(st.booleans()),
        upcast_attention=draw(st.booleans()), act_fn=draw(st.sampled_from(["silu", "mish"])),
        flip_sin_to_cos=draw(st.booleans()), freq_shift=draw(st.sampled_from([0, 1])),
    )
    return config, count


@settings(max_examples=6, deadline=None)
@given(config_and_count=sdxl_configs(), seed=st.integers(0, 2**16))
def test_sdxl_unet_hypothesis(tmp_path_factory, config_and_count, seed):
    """Random text_time configs: any number of time ids, an odd sinusoid width (a zero column in both), transformer
    depths 0-2 per level, activations other than silu (add_embedding keeps silu in both)."""
    config, count = config_and_count
    reference, ours = reference_and_minidiff("UNet2DConditionModel", config, tmp_path_factory.mktemp("unet"), seed)
    compare_unets("hypothesis text_time configs", reference, ours,
                  unet_inputs(config, count, size=(8, 12), seed=seed))


# ---- text encoders ------------------------------------------------------------------------------------------------

# diffusers' SDXL pipeline test text encoders (both of them): legacy ids bos 0 / eos 2, pooled at the largest id
DIFFUSERS_SDXL_TEXT = dict(SDXL_TEXT, bos_token_id=0, eos_token_id=2, vocab_size=1000)


def reference_text_encoder(config: dict, folder, seed: int = 3, projection: bool = True):
    """A seeded transformers text encoder (with or without projection) saved to ``folder`` and loaded by minidiff."""
    reference_class, minidiff_class = ((transformers.CLIPTextModelWithProjection, CLIPTextModelWithProjection)
                                       if projection else (transformers.CLIPTextModel, CLIPTextModel))
    torch.manual_seed(seed)
    reference = reference_class(transformers.CLIPTextConfig(**config))
    randomize_(reference, seed, scale=0.1)
    reference.eval().save_pretrained(folder)
    return reference, minidiff_class.from_pretrained(folder)


def prompt_ids(config: dict, batch: int = 3, length: int = 77, seed: int = 1) -> torch.Tensor:
    """Tokenizer-shaped ids: bos, words, eos, padding (with pad_token_id), prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), config["pad_token_id"])
    for row in range(batch):
        words = int(torch.randint(0, length - 1, (1,), generator=g))
        ids[row, 0] = config["bos_token_id"]
        ids[row, 1:1 + words] = torch.randint(3, config["vocab_size"] - 2, (words,), generator=g)
        ids[row, 1 + words] = config["eos_token_id"]
    return ids


def compare_projection_outputs(case: str, ours, theirs) -> None:
    """text_embeds (SDXL's pooled embedding), last_hidden_state and every hidden state; the penultimate one (what
    SDXL concatenates) is also its own row."""
    compare(TEXT, f"{case}: text_embeds", ours.text_embeds, theirs.text_embeds, FORWARD_TOL)
    compare(TEXT, f"{case}: [0] is text_embeds", ours[0], theirs[0], FORWARD_TOL)
    compare(TEXT, f"{case}: last_hidden_state", ours.last_hidden_state, theirs.last_hidden_state, FORWARD_TOL)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
        compare(TEXT, f"{case}: every hidden state", mine, reference, FORWARD_TOL)
    compare(TEXT, f"{case}: hidden_states[-2]", ours.hidden_states[-2], theirs.hidden_states[-2], FORWARD_TOL)


def run_text_encoders(reference, ours, ids, attention_mask=None):
    with torch.no_grad():
        return (ours(ids, attention_mask=attention_mask, output_hidden_states=True),
                reference(ids, attention_mask=attention_mask, output_hidden_states=True))


@pytest.mark.parametrize("case, config", [
    ("sdxl_fixtures.SDXL_TEXT (real ids, eos 49407)", SDXL_TEXT),
    ("diffusers SDXL test config (legacy eos_token_id=2: argmax pooling)", DIFFUSERS_SDXL_TEXT),
    ("OpenCLIP-bigG-like (head size 64, projection wider than hidden)",
     dict(SDXL_TEXT, hidden_size=128, intermediate_size=320, num_attention_heads=2, projection_dim=160,
          num_hidden_layers=3, pad_token_id=0)),
])
def test_text_encoder_with_projection(tmp_path, case, config):
    reference, ours = reference_text_encoder(config, tmp_path)
    compare_projection_outputs(case, *run_text_encoders(reference, ours, prompt_ids(config)))


def test_text_encoder_with_projection_no_layers(tmp_path):
    """num_hidden_layers=0: the embeddings, final LayerNorm and projection only. transformers 5 records hidden
    states with hooks on the encoder layers and so returns none; minidiff keeps the num_hidden_layers + 1 rule of
    transformers 4.x (the embeddings alone)."""
    config = dict(SDXL_TEXT, num_hidden_layers=0)
    reference, ours = reference_text_encoder(config, tmp_path)
    mine, theirs = run_text_encoders(reference, ours, prompt_ids(config))
    compare(TEXT, "num_hidden_layers=0: text_embeds", mine.text_embeds, theirs.text_embeds, FORWARD_TOL)
    compare(TEXT, "num_hidden_layers=0: last_hidden_state", mine.last_hidden_state, theirs.last_hidden_state,
            FORWARD_TOL)
    assert len(theirs.hidden_states) == 0 and len(mine.hidden_states) == 1
    with torch.no_grad():
        embeddings = reference.text_model.embeddings(prompt_ids(config))
    compare(TEXT, "num_hidden_layers=0: hidden_states[0] (the embeddings)", mine.hidden_states[0], embeddings,
            FORWARD_TOL)


def test_text_encoder_with_projection_attention_mask(tmp_path):
    reference, ours = reference_text_encoder(SDXL_TEXT, tmp_path)
    ids = prompt_ids(SDXL_TEXT, length=20, seed=2)
    attention_mask = (torch.arange(20) < torch.tensor([[20], [12], [3]])).long()
    compare_projection_outputs("attention_mask", *run_text_encoders(reference, ours, ids, attention_mask))


def test_text_encoder_with_projection_gradients(tmp_path):
    """Parameter gradients of a loss on SDXL's two readings: text_embeds and the penultimate hidden states."""
    reference, ours = reference_text_encoder(SDXL_TEXT, tmp_path)
    ids = prompt_ids(SDXL_TEXT, batch=2, length=24, seed=5)
    g = torch.Generator().manual_seed(6)
    weights = torch.randn(2, 24, SDXL_TEXT["hidden_size"], generator=g), torch.randn(2, 32, generator=g)
    for model in (reference, ours):
        out = model(ids, output_hidden_states=True)
        ((out.hidden_states[-2] * weights[0]).sum() + (out.text_embeds * weights[1]).sum()).backward()
    compare_gradients(TEXT, "parameter gradients (penultimate states + text_embeds loss)",
                      {name: p.grad for name, p in ours.named_parameters()},
                      {name: p.grad for name, p in reference.named_parameters()}, GRAD_TOL)


def test_text_encoder_with_projection_round_trip(tmp_path):
    """minidiff save_pretrained -> transformers from_pretrained (no missing/unexpected keys), transformers
    save_pretrained -> minidiff again: weights bit-identical, the config's architecture right, outputs equal."""
    torch.manual_seed(8)
    ours = CLIPTextModelWithProjection(**SDXL_TEXT)
    randomize_(ours, 8, scale=0.1)
    ours.eval().save_pretrained(tmp_path / "minidiff")
    assert json.loads((tmp_path / "minidiff" / "config.json").read_text())["architectures"] == [
        "CLIPTextModelWithProjection"]
    reference, info = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "minidiff",
                                                                               output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference.eval().save_pretrained(tmp_path / "transformers")
    again = CLIPTextModelWithProjection.from_pretrained(tmp_path / "transformers")
    theirs = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        compare_exact(TEXT, "save_pretrained round trip: weights (minidiff -> transformers)", tensor, theirs[name])
    for name, tensor in again.state_dict().items():
        compare_exact(TEXT, "save_pretrained round trip: weights (transformers -> minidiff)", tensor, theirs[name])
    ids = prompt_ids(SDXL_TEXT, batch=2)
    with torch.no_grad():
        compare_exact(TEXT, "save_pretrained round trip: text_embeds", again(ids).text_embeds, ours(ids).text_embeds)
    compare_projection_outputs("minidiff-saved, transformers-loaded", *run_text_encoders(reference, ours, ids))


def test_sdxl_prompt_embeddings_from_both_encoders(tmp_path):
    """What diffusers' SDXL encode_prompt reads, from real tokenizer ids (tokenizer_2 pads with "!" = id 0):
    each encoder's hidden_states[-2] (clip_skip=1: hidden_states[-3]), concatenated, and text_embeds."""
    tokenizer, tokenizer_2 = reference_tokenizers(tmp_path)
    first, ours_first = reference_text_encoder(dict(SDXL_TEXT, projection_dim=None), tmp_path / "te", seed=2,
                                               projection=False)
    second, ours_second = reference_text_encoder(SDXL_TEXT, tmp_path / "te_2")
    prompts = ["a photo of an astronaut riding a horse on mars", ""]
    ids = [tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in (tokenizer, tokenizer_2)]
    assert int(ids[1][1, -1]) == 0 and int(ids[0][1, -1]) == 49407  # the two pad tokens
    with torch.no_grad():
        outputs = [(model(token_ids, output_hidden_states=True), mine(token_ids, output_hidden_states=True))
                   for model, mine, token_ids in ((first, ours_first, ids[0]), (second, ours_second, ids[1]))]
    for skip in (0, 1):
        theirs = torch.cat([out.hidden_states[-(skip + 2)] for out, _ in outputs], dim=-1)  # (2, 77, 32 + 32)
        mine = torch.cat([out.hidden_states[-(skip + 2)] for _, out in outputs], dim=-1)
        assert mine.shape == (2, 77, 64)
        compare(TEXT, f"SDXL prompt_embeds (both encoders concatenated), clip_skip={skip or None}", mine, theirs,
                FORWARD_TOL)
    compare(TEXT, "SDXL pooled_prompt_embeds (text_encoder_2 text_embeds)", outputs[1][1].text_embeds,
            outputs[1][0].text_embeds, FORWARD_TOL)
    compare("CLIPTextModel", "SDXL text_encoder (hidden_act gelu): hidden_states[-2]",
            outputs[0][1].hidden_states[-2], outputs[0][0].hidden_states[-2], FORWARD_TOL)


# ---- VAE ----------------------------------------------------------------------------------------------------------

def reference_vae(folder, seed: int = 1):
    torch.manual_seed(seed)
    reference = diffusers.AutoencoderKL(**SDXL_VAE)
    randomize_(reference, seed, scale=0.1)
    reference.eval().save_pretrained(folder)
    return reference, AutoencoderKL.from_pretrained(folder)


def test_sdxl_vae_float32(tmp_path):
    reference, ours = reference_vae(tmp_path)
    assert (ours.config.scaling_factor, ours.config.force_upcast) == (0.13025, True)
    compare_vaes("SDXL VAE config (scaling_factor 0.13025, force_upcast)", reference, ours,
                 images(SDXL_VAE, batch=2, size=32, seed=1))


# CPU float16/bfloat16: the same kernels, a few reductions in another order; measured 1.7e-3 / 1.4e-2 relative
LOW_PRECISION_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdxl_vae_low_precision_decode(tmp_path, dtype):
    """Decoding in float16 (what force_upcast guards against on real SDXL weights) and bfloat16, on the CPU."""
    reference, ours = reference_vae(tmp_path)
    reference, ours = reference.to(dtype), ours.to(dtype)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        theirs, mine = reference.decode(latents).sample, ours.decode(latents).sample
    assert mine.dtype == theirs.dtype == dtype
    compare(VAE, f"{str(dtype).removeprefix('torch.')} decode (CPU)", mine, theirs, LOW_PRECISION_TOL[dtype])


# ---- full-size SDXL UNets -----------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 unet/config.json (diffusers defaults elsewhere; their
# "upcast_attention": null is left out here, see tests/test_sdxl_models.py)
SDXL_BASE_1_0 = dict(
    sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_REFINER_1_0 = dict(
    sample_size=128, block_out_channels=[384, 768, 1536, 1536], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560)
FULL_SIZE = {  # case -> (config, number of time ids, parameter count)
    "SDXL base 1.0": (SDXL_BASE_1_0, 6, 2_567_463_684),
    "SDXL refiner 1.0": (SDXL_REFINER_1_0, 5, 2_259_526_660),
}
INIT_OFFSETS = 2**20  # each parameter starts at its own offset of its pool: no two layers hold the same values


def init_scale(name: str, param: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of a fan-in init: matrices and kernels N(0, 1/fan_in), biases N(0, 0.01), norm scales N(1, 0.01),
    so activations stay O(1) through the 70 transformer blocks."""
    if param.ndim > 1:
        return 0.0, param[0].numel() ** -0.5
    return (1.0 if "norm" in name and name.endswith("weight") else 0.0), 0.1


def pooled_random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for every parameter of ``model`` (built on the meta device) in a fraction of their
    memory and time: each parameter is a view, at its own offset, of one pool of draws per init scale; kernels are
    channels-last views, as minidiff keeps them. (torch.randn over SDXL's 2.6B parameters: minutes and 10 GB.)"""
    scales = {name: init_scale(name, param) for name, param in model.named_parameters()}
    sizes: dict[tuple[float, float], int] = {}
    for name, param in model.named_parameters():
        sizes[scales[name]] = max(sizes.get(scales[name], 0), param.numel())
    draws = torch.randn(max(sizes.values()) + INIT_OFFSETS, generator=torch.Generator().manual_seed(seed))
    pools = {(mean, std): draws[:size + INIT_OFFSETS] * std + mean for (mean, std), size in sizes.items()}
    weights = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        layout = torch.channels_last if param.ndim == 4 else torch.contiguous_format
        stride = torch.empty(param.shape, device="meta", memory_format=layout).stride()
        weights[name] = pools[scales[name]].as_strided(param.shape, stride, index * 7919 % INIT_OFFSETS)
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FULL_SIZE))
def test_full_size_sdxl_unet(case):
    """The real SDXL UNet shapes with random weights, one CFG-batch forward at 16x16 latents (128x128 pixels).
    Both models are built on the meta device and take the same seeded tensors (views of pooled draws, about 1 GB
    in all): diffusers' own random init of 2.6B parameters would take minutes and 10 GB per copy."""
    config, count, parameters = FULL_SIZE[case]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**config).eval()
        ours = UNet2DConditionModel(**config).eval()
    weights = pooled_random_weights(reference, seed=0)
    reference.load_state_dict(weights, strict=True, assign=True)
    check_state_dict(ours, weights, f"diffusers' {case} UNet")
    ours.load_state_dict(weights, strict=True, assign=True)
    assert ours.num_parameters() == parameters == sum(p.numel() for p in reference.parameters())
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    args = dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(999.0),
                encoder_hidden_states=torch.randn(2, 77, config["cross_attention_dim"], generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(2, 1280, generator=g), time_ids=time_ids(count, 2)))
    with torch.no_grad():
        theirs, mine = reference(**args).sample, ours(**args).sample
    assert torch.isfinite(theirs).all() and theirs.std() > 0.1
    compare(UNET, f"full-size {case} ({parameters / 1e9:.2f}B params), (2, 4, 16, 16) latents: forward", mine, theirs,
            FORWARD_TOL)
