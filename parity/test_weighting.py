"""Prompt weighting parity: compel syntax against the compel package itself, A1111 syntax and long prompts against an
independent per-token reference written here from the rules, and whole txt2img images against diffusers fed the
reference embeddings (tiny seeded SD1 pipeline, transformers' text encoder and tokenizer)."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from compel import Compel, ReturnedEmbeddingsType
from compel.prompt_parser import PromptParser
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minidiff
from minidiff.text.weighting import parse_compel
from parity.pipeline_fixtures import save_reference_pipeline
from parity.report import compare, compare_exact
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

COMPONENT = "prompt weighting"
EMBED_TOL = 1e-5  # relative, fp32 text encoder forward
NP_TOL = 1e-4  # absolute, images in [0, 1]

COMPEL_PROMPTS = [
    "a red cat playing with a ball++",
    "a cat+ on a mat",
    "a cat- on a mat",
    "(a red cat)1.3 with a ball--",
    "(a (red)1.5 cat)0.8, (blue ball)++",
    "cat- dog- and a bird",
    "(masterpiece)1.4, best quality+++, (blurry)0.0",
    "((nested words)+ here)1.2- text",
    "x-ray photo, (x-ray)0.5 of a hand",
    "photo,of,a cat+",
    "plain prompt without weights",
    "",
]
# a downweighted fragment cut by truncation (compel masks through the EOS), and upweights past the cut
LONG_COMPEL = " ".join(["a red cat"] * 24) + " (a blue dog)0.6 (green bird)1.3"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    reference, saved = save_reference_pipeline(tmp_path_factory.mktemp("sd"))
    mine = minidiff.StableDiffusionPipeline.from_pretrained(saved)
    mine.set_progress_bar_config(disable=True)
    return reference, mine


def minidiff_embeds(mine, prompt, negative=None, weighting="compel", clip_skip=None):
    positive, negative = mine.encode_prompt(prompt, "cpu", 1, negative is not None, negative, clip_skip=clip_skip,
                                            prompt_weighting=weighting)
    return positive.detach(), None if negative is None else negative.detach()


PIECES = ["cat", "red", "x-ray", "dog-", "+", "++", "-", "(", ")", "1.3", "0.5", "2", ",", ".", ", ", " ", "\\(", "="]


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=10))
def test_compel_parser_matches_compels_parser(pieces):
    """Drawn prompts, syntax and all: the same fragments and weights as compel's own parser (prompts minidiff
    refuses, unbalanced or with a weight on an empty group, are left out)."""
    prompt = "".join(pieces)
    try:
        ours = parse_compel(prompt)
    except ValueError:
        assume(False)
    flattened = PromptParser().parse_conjunction(prompt).prompts
    theirs = [(f.text, f.weight) for f in flattened[0].children] if flattened else [("", 1.0)]
    assert [text for text, _ in ours] == [text for text, _ in theirs], prompt
    compare_exact(COMPONENT, "compel parser vs compel's PromptParser (drawn prompts)",
                  [weight for _, weight in ours], [weight for _, weight in theirs])


@pytest.mark.parametrize("prompt", COMPEL_PROMPTS + [LONG_COMPEL])
def test_compel_syntax_matches_compel(pipes, prompt):
    reference, mine = pipes
    theirs = Compel(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder)(prompt)
    with pytest.warns(UserWarning, match="compel weighting keeps") if prompt == LONG_COMPEL else nullcontext():
        ours, _ = minidiff_embeds(mine, prompt)
    compare(COMPONENT, f"compel {prompt[:40]!r}", ours, theirs, EMBED_TOL)


def test_compel_clip_skip_matches_compel_penultimate_layer(pipes, monkeypatch):
    reference, mine = pipes
    # compel 2.5.1 reads text_encoder.text_model.final_layer_norm, which transformers 5 no longer nests
    monkeypatch.setattr(reference.text_encoder, "text_model",
                        SimpleNamespace(final_layer_norm=reference.text_encoder.final_layer_norm), raising=False)
    prompt = "(a red cat)1.3 with a ball-- on a mat+"
    compel = Compel(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder,
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED)
    ours, _ = minidiff_embeds(mine, prompt, clip_skip=1)
    compare(COMPONENT, "compel clip_skip=1 (penultimate layer, normed)", ours, compel(prompt), EMBED_TOL)


@pytest.mark.parametrize("prompt", ["a red cat playing with a ball++", "(a (red)1.5 cat)0.8, (blue ball)--"])
def test_compel_package_runs_on_minidiff_components(pipes, prompt):
    """The issue's measurement, kept: compel itself on minidiff's tokenizer and text encoder gives the embeddings
    it gives on transformers' components."""
    reference, mine = pipes
    theirs = Compel(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder)(prompt)
    on_minidiff = Compel(tokenizer=mine.tokenizer, text_encoder=mine.text_encoder)(prompt)
    compare(COMPONENT, f"compel package on minidiff components {prompt[:30]!r}", on_minidiff, theirs, EMBED_TOL)


# ---- A1111: an independent reference ---------------------------------------------------------------------------
LONG_WORDS = ", ".join(["red cat"] * 40)  # 119 tokens: two chunks
A1111_CASES = [  # (prompt, its fragments and weights written out by hand from the rules)
    ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]),
    ("((masterpiece)), [blurry] photo", [("masterpiece", 1.1 * 1.1), (", ", 1.0), ("blurry", 1 / 1.1),
                                         (" photo", 1.0)]),
    ("(a (small:0.5) dog:1.3) \\(literal\\) [[x]]", [("a ", 1.3), ("small", 0.5 * 1.3), (" dog", 1.3),
                                                    (" (literal) ", 1.0), ("x", 1 / 1.1 / 1.1)]),
    ("plain prompt", [("plain prompt", 1.0)]),
    (f"start (of a long:1.2) {LONG_WORDS} (end:0.7)", [("start ", 1.0), ("of a long", 1.2),
                                                       (f" {LONG_WORDS} ", 1.0), ("end", 0.7)]),
    (f"({LONG_WORDS}:1.1)", [(LONG_WORDS, 1.1)]),  # weights across the chunk boundary
]


def reference_a1111(reference, fragments, chunks: int) -> torch.Tensor:
    """A1111's rule, token by token: tokens of each fragment with its weight, 75 per chunk between BOS and EOS,
    padded to 77; each chunk's token embeddings times their weights, rescaled to the chunk's unweighted mean."""
    tokenizer, encoder = reference.tokenizer, reference.text_encoder
    tokens, weights = [], []
    for text, weight in fragments:
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            tokens.append(token)
            weights.append(weight)
    out = []
    for c in range(chunks):
        ids = [tokenizer.bos_token_id] + tokens[75 * c: 75 * (c + 1)] + [tokenizer.eos_token_id]
        token_weights = [1.0] + weights[75 * c: 75 * (c + 1)] + [1.0]
        while len(ids) < 77:
            ids.append(tokenizer.pad_token_id)
            token_weights.append(1.0)
        with torch.no_grad():
            z = encoder(torch.tensor([ids])).last_hidden_state[0]  # (77, D)
        weighted = torch.stack([z[t] * token_weights[t] for t in range(77)])
        out.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(out)[None]  # (1, 77 * chunks, D)


@pytest.mark.parametrize("prompt, fragments", A1111_CASES)
def test_a1111_syntax_matches_reference(pipes, prompt, fragments):
    reference, mine = pipes
    ours, _ = minidiff_embeds(mine, prompt, weighting="a1111")
    theirs = reference_a1111(reference, fragments, ours.shape[1] // 77)
    assert ours.shape[1] == (154 if LONG_WORDS in prompt else 77)
    compare(COMPONENT, f"a1111 {prompt[:40]!r}", ours, theirs, EMBED_TOL)


def test_a1111_negative_prompt_gets_the_same_chunks(pipes):
    """A short prompt with a long negative prompt: both have 2 chunks; the prompt's second chunk is empty."""
    reference, mine = pipes
    positive, negative = minidiff_embeds(mine, "a (red:1.4) cat", f"[{LONG_WORDS}]", weighting="a1111")
    compare(COMPONENT, "a1111 prompt padded to the long negative's chunks", positive,
            reference_a1111(reference, [("a ", 1.0), ("red", 1.4), (" cat", 1.0)], 2), EMBED_TOL)
    compare(COMPONENT, "a1111 long negative prompt", negative,
            reference_a1111(reference, [(LONG_WORDS, 1 / 1.1)], 2), EMBED_TOL)


# ---- whole pipelines -------------------------------------------------------------------------------------------
def images(pipe, **kwargs):
    args = dict(num_inference_steps=3, height=32, width=32, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(0))
    return pipe(**args, **kwargs).images


def test_txt2img_compel_prompt_embeds_in_diffusers(pipes):
    reference, mine = pipes
    prompt, negative = "a (red circle)1.3 on a blue+ background", "blurry-, (dark)0.5"
    compel = Compel(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder)
    theirs = images(reference, prompt_embeds=compel(prompt), negative_prompt_embeds=compel(negative))
    ours = images(mine, prompt=prompt, negative_prompt=negative, prompt_weighting="compel")
    compare(COMPONENT, "txt2img compel vs diffusers with compel prompt_embeds", ours, theirs, NP_TOL, "abs")


def test_txt2img_a1111_long_prompt_in_diffusers(pipes):
    reference, mine = pipes
    prompt, fragments = A1111_CASES[4]
    theirs = images(reference, prompt_embeds=reference_a1111(reference, fragments, 2),
                    negative_prompt_embeds=reference_a1111(reference, [("", 1.0)], 2))
    ours = images(mine, prompt=prompt, prompt_weighting="a1111")
    compare(COMPONENT, "txt2img a1111 154-token prompt vs diffusers with reference prompt_embeds", ours, theirs,
            NP_TOL, "abs")
