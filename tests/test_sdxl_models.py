"""SDXL models in minidiff alone: the text_time UNet's input and config errors, LoRA on add_embedding, round trips,
dtype and memory-format handling, CLIPTextModelWithProjection's config check."""

import json

import pytest
import torch

from minidiff.models import UNet2DConditionModel
from minidiff.models.clip import CLIPTextModelWithProjection
from tests.training_fixtures import one_thread  # noqa: F401  (tiny models run fastest single-threaded)

SDXL = dict(block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=12, attention_head_dim=[2, 4],
            layers_per_block=1, sample_size=16, use_linear_projection=True, transformer_layers_per_block=[1, 2],
            addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32)
TEXT = dict(vocab_size=49408, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            hidden_act="gelu", projection_dim=8)


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL).eval()


def inputs(batch=2, seed=0):
    """sample, text, added_cond_kwargs as the SDXL pipeline passes them: 8 pooled features + 6 ids * 4 = 32."""
    g = torch.Generator().manual_seed(seed)
    added = dict(text_embeds=torch.randn(batch, 8, generator=g),
                 time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(batch, 1))
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 7, 12, generator=g), added


@pytest.mark.parametrize("added, match", [
    (None, r"needs added_cond_kwargs=\{\"text_embeds\": \(B, P\), \"time_ids\": \(B, n\)\} with P \+ n \* 4 = 32 .*"
           r"got None"),
    ("text_embeds only", r"needs added_cond_kwargs=.* got \['text_embeds'\]"),
    ("a tuple", r"needs added_cond_kwargs=.* got \("),
    ("extra image_embeds", r"added_cond_kwargs \['image_embeds'\] are not used by a text_time UNet; pass only "
                           r"'text_embeds' and 'time_ids'"),
    ("5 time ids", r"text_embeds \(2, 8\) and time_ids \(2, 5\) give 8 \+ 5 \* 4 = 28 features, but add_embedding "
                   r"takes projection_class_embeddings_input_dim=32: with this text_embeds width pass 6 time ids"),
    ("text_embeds width 9", r"give 9 \+ 6 \* 4 = 33 features.* pass another text_embeds width"),
    ("batch 1 time_ids", r"added_cond_kwargs\['time_ids'\] must be a 2-D tensor with the batch of sample \(B=2, "
                         r"\.\.\.\), got \(1, 6\)"),
    ("1-D text_embeds", r"added_cond_kwargs\['text_embeds'\] must be a 2-D tensor .* got \(8,\)"),
    ("list time_ids", r"added_cond_kwargs\['time_ids'\] must be a 2-D tensor .* got list"),
    ("int64 text_embeds", r"added_cond_kwargs\['text_embeds'\] must be a floating-point tensor, got torch.int64"),
])
def test_added_cond_kwargs_errors(unet, added, match):
    sample, text, good = inputs()
    bad = {
        None: None,
        "text_embeds only": {"text_embeds": good["text_embeds"]},
        "a tuple": (good["text_embeds"], good["time_ids"]),
        "extra image_embeds": dict(good, image_embeds=torch.zeros(2, 4)),
        "5 time ids": dict(good, time_ids=good["time_ids"][:, :5]),
        "text_embeds width 9": dict(good, text_embeds=torch.zeros(2, 9)),
        "batch 1 time_ids": dict(good, time_ids=good["time_ids"][:1]),
        "1-D text_embeds": dict(good, text_embeds=good["text_embeds"][0]),
        "list time_ids": dict(good, time_ids=good["time_ids"].tolist()),
        "int64 text_embeds": dict(good, text_embeds=good["text_embeds"].long()),
    }[added]
    with pytest.raises(ValueError, match=match):
        unet(sample, 10, text, added_cond_kwargs=bad)


def test_integer_time_ids_are_sizes_like_float_ones(unet):
    """Sizes and crops are integers: int64 time_ids give exactly the float ones' prediction (as in diffusers)."""
    sample, text, added = inputs()
    whole = added["time_ids"].round()
    with torch.no_grad():
        as_float = unet(sample, 10, text, added_cond_kwargs=dict(added, time_ids=whole)).sample
        as_int = unet(sample, 10, text, added_cond_kwargs=dict(added, time_ids=whole.long())).sample
    torch.testing.assert_close(as_int, as_float, rtol=0, atol=0)


def test_sd1_unet_refuses_added_cond_kwargs_and_takes_none_or_empty():
    config = {k: v for k, v in SDXL.items() if k not in ("addition_embed_type", "addition_time_embed_dim",
                                                        "projection_class_embeddings_input_dim")}
    sd = UNet2DConditionModel(**config).eval()
    sample, text, added = inputs()
    with pytest.raises(ValueError, match=r"added_cond_kwargs=\['text_embeds', 'time_ids'\] given, but this "
                                         r"UNet2DConditionModel has no added conditioning .* use an SDXL UNet"):
        sd(sample, 10, text, added_cond_kwargs=added)
    with pytest.raises(ValueError, match=r"added_cond_kwargs=list given"):
        sd(sample, 10, text, added_cond_kwargs=[1])
    with torch.no_grad():
        torch.testing.assert_close(sd(sample, 10, text, added_cond_kwargs={}).sample, sd(sample, 10, text).sample,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("missing", ["addition_time_embed_dim", "projection_class_embeddings_input_dim"])
def test_text_time_config_errors(missing):
    with pytest.raises(ValueError, match=rf"{missing}=None is invalid: addition_embed_type='text_time' embeds the "
                                         rf"time ids .* set {missing} \(SDXL base: addition_time_embed_dim=256"):
        UNet2DConditionModel(**dict(SDXL, **{missing: None}))


def test_text_encoder_with_projection_needs_projection_dim():
    with pytest.raises(ValueError, match=r"projection_dim=None is invalid: CLIPTextModelWithProjection projects .* "
                                         r"set projection_dim \(SDXL's OpenCLIP bigG: 1280\)"):
        CLIPTextModelWithProjection(**dict(TEXT, projection_dim=None))


def test_time_ids_and_text_embeds_change_the_output(unet):
    """The added conditioning is not ignored: other sizes or another pooled embedding give another prediction."""
    sample, text, added = inputs()
    with torch.no_grad():
        base = unet(sample, 10, text, added_cond_kwargs=added).sample
        other_size = unet(sample, 10, text, added_cond_kwargs=dict(added, time_ids=added["time_ids"] / 2)).sample
        other_text = unet(sample, 10, text, added_cond_kwargs=dict(added, text_embeds=-added["text_embeds"])).sample
    assert (base - other_size).abs().max() > 1e-4 and (base - other_text).abs().max() > 1e-4


def test_lora_on_add_embedding_follows_the_call_scale(unet):
    """A LoRA on add_embedding.linear_1 alone: scale 0 gives the base output exactly, scale 1 another one."""
    sample, text, added = inputs()
    with torch.no_grad():
        base = unet(sample, 10, text, added_cond_kwargs=added).sample
    g = torch.Generator().manual_seed(3)
    unet.load_attn_procs({"add_embedding.linear_1.lora_A.weight": torch.randn(2, 32, generator=g),
                          "add_embedding.linear_1.lora_B.weight": torch.randn(32, 2, generator=g)})
    with torch.no_grad():
        off = unet(sample, 10, text, added_cond_kwargs=added, cross_attention_kwargs={"scale": 0.0}).sample
        on = unet(sample, 10, text, added_cond_kwargs=added).sample
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    assert (on - base).abs().max() > 1e-4


def test_sdxl_unet_round_trip(tmp_path, unet):
    unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["addition_embed_type"], config["transformer_layers_per_block"]) == ("text_time", [1, 2])
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    sample, text, added = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 10, text, added_cond_kwargs=added).sample,
                                   unet(sample, 10, text, added_cond_kwargs=added).sample, rtol=0, atol=0)


def test_hub_sdxl_unet_config_with_upcast_attention_null_loads(tmp_path, unet):
    """stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 unet/config.json say "upcast_attention": null
    (diffusers reads it as False)."""
    unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, upcast_attention=None)))
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    sample, text, added = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 10, text, added_cond_kwargs=added).sample,
                                   unet(sample, 10, text, added_cond_kwargs=added).sample, rtol=0, atol=0)


def test_text_encoder_with_projection_round_trip(tmp_path):
    torch.manual_seed(1)
    model = CLIPTextModelWithProjection(**TEXT).eval()
    model.save_pretrained(tmp_path)
    loaded = CLIPTextModelWithProjection.from_pretrained(tmp_path)
    ids = torch.tensor([[49406, 320, 1125, 49407, 49407], [49406, 49407, 49407, 49407, 49407]])
    with torch.no_grad():
        mine, theirs = loaded(ids, output_hidden_states=True), model(ids, output_hidden_states=True)
    assert mine.text_embeds.shape == (2, 8) and len(mine.hidden_states) == 3
    for a, b in ((mine.text_embeds, theirs.text_embeds), (mine.hidden_states[-2], theirs.hidden_states[-2])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.text_model.config is loaded.config  # one config object for the tower and the wrapper


def test_channels_last_input_and_bfloat16(unet):
    """A channels-last sample gives the contiguous sample's output (returned contiguous); in bfloat16 the float32
    added conditioning (as a caller may keep it) is cast, and the result stays near the float32 one."""
    sample, text, added = inputs()
    with torch.no_grad():
        expected = unet(sample, 10, text, added_cond_kwargs=added).sample
        nhwc = unet(sample.to(memory_format=torch.channels_last), 10, text, added_cond_kwargs=added).sample
        assert nhwc.is_contiguous()
        torch.testing.assert_close(nhwc, expected, rtol=1e-5, atol=1e-5)
        unet.to(torch.bfloat16)
        low = unet(sample.bfloat16(), 10, text.bfloat16(), added_cond_kwargs=added).sample
    assert low.dtype == torch.bfloat16 and unet.add_embedding.linear_1.weight.dtype == torch.bfloat16
    assert (low.float() - expected).abs().max() < 0.1 * expected.abs().max()
