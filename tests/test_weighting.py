"""Prompt weighting on minidiff alone: the two parsers (properties, fixed cases, errors), prompt_weighting=None
leaving the text alone, A1111 chunk counts for prompts and negative prompts, and every SD pipeline taking it."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff
from minidiff.text.weighting import parse_a1111, parse_compel
from tests.tiny_components import run_tiny, tiny_pipeline
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

LONG = ", ".join(["red cat"] * 40)  # 119 tokens: two A1111 chunks
WORDS = st.lists(st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6), min_size=1, max_size=5)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(minidiff.StableDiffusionPipeline)
    with torch.no_grad():  # a final-norm bias, so the A1111 mean rescale is not 0/0 on the tiny encoder
        pipe.text_encoder.final_layer_norm.bias.normal_(generator=torch.Generator().manual_seed(0))
    return pipe


def embeds(pipe, prompt, negative=None, weighting=None, **kwargs):
    positive, negative = pipe.encode_prompt(prompt, "cpu", 1, negative is not None, negative,
                                            prompt_weighting=weighting, **kwargs)
    return positive.detach(), None if negative is None else negative.detach()


# ---- parsers ---------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(words=WORDS, plus=st.integers(1, 3))
def test_compel_weights_are_powers_and_plain_text_passes(words, plus):
    text = " ".join(words)
    assert parse_compel(text) == [(text, 1.0)]
    assert parse_compel(f"({text}){'+' * plus}") == [(text, pytest.approx(1.1 ** plus))]
    assert parse_compel(f"({text}){'-' * plus}") == [(text, pytest.approx(0.9 ** plus))]
    assert parse_compel(f"x ({text})0.5") == [("x", 1.0), (text, 0.5)]


@settings(max_examples=15, deadline=None)
@given(words=WORDS, depth=st.integers(1, 3))
def test_a1111_brackets_multiply_and_plain_text_passes(words, depth):
    text = " ".join(words)
    assert parse_a1111(text) == [(text, 1.0)]
    assert parse_a1111("(" * depth + text + ")" * depth) == [(text, pytest.approx(1.1 ** depth))]
    assert parse_a1111("[" * depth + text + "]" * depth) == [(text, pytest.approx(1.1 ** -depth))]
    assert parse_a1111(f"({text}:0.25)") == [(text, 0.25)]


@pytest.mark.parametrize("prompt, expected", [
    ("a cat++ (on a mat)0.8", [("a", 1.0), ("cat", 1.1 ** 2), ("on a mat", 0.8)]),
    ("(a (red)1.5 cat)0.8", [("a", 0.8), ("red", 0.8 * 1.5), ("cat", 0.8)]),
    ("cat- dog-", [("cat dog", 0.9)]),  # neighbours of equal weight are one fragment
    ("photo,of a cat+", [("photo, of a", 1.0), ("cat", 1.1)]),
    ("x-ray (a - b)", [("x-ray (a - b)", 1.0)]),  # a group that does not parse is text, as in compel
    ("\\(cat\\)+", [("(cat)", 1.1)]),
    ("", [("", 1.0)]),
])
def test_compel_cases(prompt, expected):
    assert parse_compel(prompt) == [(text, pytest.approx(weight)) for text, weight in expected]


@pytest.mark.parametrize("prompt, expected", [
    ("a (cat:1.5) [dog]", [("a ", 1.0), ("cat", 1.5), (" ", 1.0), ("dog", 1 / 1.1)]),
    ("((a) b:0.5)", [("a", 1.1 * 0.5), (" b", 0.5)]),
    ("\\(x\\) \\[y\\] a\\\\b (z: 2 )", [("(x) [y] a\\b ", 1.0), ("z", 2.0)]),
    ("style: anime BREAK more", [("style: anime BREAK more", 1.0)]),  # ':' outside brackets, BREAK are text
    ("", [("", 1.0)]),
])
def test_a1111_cases(prompt, expected):
    assert parse_a1111(prompt) == [(text, pytest.approx(weight)) for text, weight in expected]


@pytest.mark.parametrize("parse, prompt, message", [
    (parse_compel, "a (red cat", r"'\(' is never closed at character 2 .*near 'a \(red cat'"),
    (parse_compel, "a red) cat", r"'\)' closes nothing at character 5"),
    (parse_compel, "()1.2 cat", "a weight applies to an empty group at character 0"),
    (parse_compel, '("a", "b").blend(1, 1)', "'blend' syntax is not supported by minidiff"),
    (parse_compel, "a cat.swap(dog)", "'swap' syntax is not supported by minidiff"),
    (parse_compel, '("a", "b").and()', "'and' syntax is not supported by minidiff"),
    (parse_compel, "withLora(style, 0.5) a cat", "'withLora' syntax is not supported by minidiff"),
    (parse_compel, 'a "quoted" cat', "quoted fragments"),
    (parse_a1111, "a (red:abc) cat", "the weight 'abc' is not a number at character 7"),
    (parse_a1111, "a [red) cat", r"'\)' closes nothing at character 6"),
    (parse_a1111, "(a (b:1.2)", r"'\(' is never closed at character 0"),
    (parse_a1111, "a (:1.3) cat", "a weight applies to no text at character 2"),
])
def test_syntax_errors_say_where(parse, prompt, message):
    with pytest.raises(ValueError, match=message):
        parse(prompt)


def test_unknown_weighting_fails_before_any_model_work(pipe):
    def refuse(*args):
        raise AssertionError("the text encoder ran")

    hook = pipe.text_encoder.register_forward_pre_hook(refuse)
    try:
        with pytest.raises(ValueError, match="prompt_weighting='A1111' is not supported; accepted values: "
                                             "'compel', 'a1111', None"):
            run_tiny(pipe, prompt_weighting="A1111")
        with pytest.raises(ValueError, match="unbalanced brackets"):
            embeds(pipe, "a (cat", weighting="a1111")
    finally:
        hook.remove()


# ---- embeddings ------------------------------------------------------------------------------------------------
def test_none_leaves_weight_syntax_untouched(pipe):
    prompt = "a cat++ (dog:1.5) [bird] (ball)0.5"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = pipe.text_encoder(ids)[0]
    assert torch.equal(embeds(pipe, prompt)[0], plain)


def test_weights_change_only_what_they_should(pipe):
    plain, _ = embeds(pipe, "a red cat")
    for weighting in ("compel", "a1111"):
        assert torch.equal(embeds(pipe, "a red cat", weighting=weighting)[0], plain)
    up, _ = embeds(pipe, "a red+ cat", weighting="compel")
    assert torch.equal(up[:, :2], plain[:, :2]) and not torch.equal(up[:, 2], plain[:, 2])  # BOS, "a" kept
    assert not torch.equal(embeds(pipe, "a red- cat", weighting="compel")[0], plain)


def test_a1111_rescales_each_chunk_to_its_unweighted_mean(pipe):
    weighted, _ = embeds(pipe, f"a (red:1.6) [cat] {LONG}", weighting="a1111")
    plain, _ = embeds(pipe, f"a red cat {LONG}", weighting="a1111")
    assert weighted.shape == plain.shape == (1, 154, 16)
    for chunk in range(2):
        part = slice(77 * chunk, 77 * (chunk + 1))
        assert torch.allclose(weighted[:, part].mean(), plain[:, part].mean(), atol=1e-6)
    assert not torch.allclose(weighted[:, :77], plain[:, :77])


@pytest.mark.parametrize("tokens, chunks", [(0, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_a1111_chunk_counts(pipe, tokens, chunks):
    prompt = " ".join(["cat"] * tokens)  # one token a word
    positive, negative = embeds(pipe, prompt, "", weighting="a1111")
    assert positive.shape == negative.shape == (1, 77 * chunks, 16)


def test_a1111_negative_and_batch_get_the_same_chunks_padded_with_empty_ones(pipe):
    empty, _ = embeds(pipe, "", weighting="a1111")
    short, _ = embeds(pipe, "a cat", weighting="a1111")
    positive, negative = embeds(pipe, "a cat", LONG, weighting="a1111")
    assert positive.shape == negative.shape == (1, 154, 16)
    torch.testing.assert_close(positive, torch.cat([short, empty], dim=1))
    batch, _ = embeds(pipe, ["a cat", LONG], weighting="a1111")
    assert batch.shape == (2, 154, 16)
    torch.testing.assert_close(batch[:1], positive)


def test_compel_truncates_long_prompts_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="compel weighting keeps the first 77"):
        positive, negative = embeds(pipe, LONG + ", " + LONG, LONG, weighting="compel")
    assert positive.shape == negative.shape == (1, 77, 16)


def test_clip_skip_reaches_weighted_prompts(pipe):
    for weighting in ("compel", "a1111"):
        last, _ = embeds(pipe, "a red+ (cat:1.2)", weighting=weighting)
        skipped, _ = embeds(pipe, "a red+ (cat:1.2)", weighting=weighting, clip_skip=1)
        assert skipped.shape == last.shape and not torch.allclose(skipped, last)


def test_textual_inversion_conversion_applies_to_each_fragment(pipe, monkeypatch):
    seen = []
    monkeypatch.setattr(pipe, "maybe_convert_prompt", lambda text, tokenizer: seen.append(text) or text)
    embeds(pipe, "a (red cat)1.3 on a mat", weighting="compel")
    assert seen == ["a", "red cat", "on a mat"]


# ---- pipelines -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting, prompt", [("compel", "a red+ circle, (blue)0.5"),
                                               ("a1111", f"a (red:1.2) circle {LONG}")])
def test_every_pipeline_takes_prompt_weighting(weighting, prompt):
    image, mask = PIL.Image.new("RGB", (32, 32), "gray"), PIL.Image.new("L", (32, 32), 255)
    runs = [(tiny_pipeline(minidiff.StableDiffusionPipeline), dict(height=32, width=32)),
            (tiny_pipeline(minidiff.StableDiffusionImg2ImgPipeline), dict(image=image, strength=0.9)),
            (tiny_pipeline(minidiff.StableDiffusionInpaintPipeline, in_channels=9), dict(image=image, mask_image=mask))]
    for pipe, extra in runs:
        expected = torch.cat(pipe.encode_prompt(prompt, "cpu", 1, True, "blurry", prompt_weighting=weighting)[::-1])
        seen = []  # the text embeddings the UNet got: [negative, positive]
        out = pipe(prompt, negative_prompt="blurry", num_inference_steps=2, output_type="np",
                   prompt_weighting=weighting, generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=lambda pipe, i, t, tensors: seen.append(tensors["prompt_embeds"]) or tensors,
                   **extra).images
        assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out)).all()
        torch.testing.assert_close(seen[0], expected)
