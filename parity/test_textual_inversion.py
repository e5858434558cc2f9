"""Textual inversion parity: the same embedding files loaded by diffusers' ``load_textual_inversion`` and by minidiff
give the same prompts, token ids, prompt embeddings and images (tiny seeded SD1 and SD2 pipelines)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from safetensors.torch import save_file

import minidiff
from parity.pipeline_fixtures import save_reference_pipeline
from parity.report import compare, compare_exact
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

COMPONENT = "textual inversion"
EMBED_TOL = 1e-5  # relative, fp32 text encoder forward
NP_TOL = 1e-4  # absolute, images in [0, 1]
WIDTH = 16  # the tiny text encoder's hidden_size
PROMPTS = ["a photo of <cat-toy> on a table", "<cat-toy>s, two <CAT-TOY> toys,<cat-toy>"]
NEGATIVES = ["blurry <cat-toy>", ""]


def embedding_file(folder, layout: str, vectors: int):
    """(path, token= argument) of a seeded embedding of ``vectors`` vectors, in diffusers' or A1111's layout."""
    embedding = torch.randn(vectors, WIDTH, generator=torch.Generator().manual_seed(vectors)) * 0.5  # (n, D)
    if layout == "diffusers":  # a folder with learned_embeds.safetensors, as diffusers' training script saves it
        (folder / "embeds").mkdir(exist_ok=True)
        single_or_multi = embedding[0] if vectors == 1 else embedding  # (D,) or (n, D): diffusers writes both
        save_file({"<cat-toy>": single_or_multi}, folder / "embeds/learned_embeds.safetensors")
        return folder / "embeds", None
    save_file({"emb_params": embedding}, folder / "cat-toy.safetensors")  # A1111: the token is the file name
    return folder / "cat-toy.safetensors", "<cat-toy>"


@pytest.fixture(scope="module", params=["SD1", "SD2"])
def pipes(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference, saved = save_reference_pipeline(folder, sd2=request.param == "SD2")
    mine = minidiff.StableDiffusionPipeline.from_pretrained(saved)
    mine.set_progress_bar_config(disable=True)
    return request.param, reference, mine, folder


def embeddings_of(pipe, prompts=PROMPTS, negatives=NEGATIVES):
    with torch.no_grad():
        return torch.cat(pipe.encode_prompt(prompts, "cpu", 1, True, negatives))  # (2B, 77, D)


def image_of(pipe):
    return pipe(PROMPTS[1], negative_prompt=NEGATIVES[0], num_inference_steps=2, height=32, width=32,
                guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("vectors", [1, 3])
@pytest.mark.parametrize("layout", ["diffusers", "A1111"])
def test_load_matches_diffusers(pipes, layout, vectors):
    model, reference, mine, folder = pipes
    case = f"{model} {layout} {vectors}-vector"
    base_table = mine.text_encoder.get_input_embeddings().weight.detach().clone()
    base_embeddings = embeddings_of(mine)
    path, token = embedding_file(folder, layout, vectors)
    reference.load_textual_inversion(str(path), token=token)
    mine.load_textual_inversion(str(path), token=token)
    try:
        expanded = mine.maybe_convert_prompt(PROMPTS, mine.tokenizer)
        assert expanded == reference.maybe_convert_prompt(PROMPTS, reference.tokenizer)
        ids = mine.tokenizer(expanded, padding="max_length", max_length=77, return_tensors="pt").input_ids
        theirs = reference.tokenizer(expanded, padding="max_length", max_length=77, return_tensors="pt").input_ids
        compare_exact(COMPONENT, f"{case}: token ids", ids, theirs)
        compare(COMPONENT, f"{case}: token table", mine.text_encoder.get_input_embeddings().weight.detach(),
                reference.text_encoder.get_input_embeddings().weight.detach(), 0.0, "abs")
        assert not torch.allclose(embeddings_of(mine), base_embeddings), "the loaded token changed nothing"
        compare(COMPONENT, f"{case}: prompt embeddings", embeddings_of(mine), embeddings_of(reference), EMBED_TOL)
        compare(COMPONENT, f"{case}: txt2img np", image_of(mine), image_of(reference), NP_TOL, "abs")
    finally:
        reference.unload_textual_inversion()
        mine.unload_textual_inversion()
    compare(COMPONENT, f"{model} unload: token table as before", mine.text_encoder.get_input_embeddings().weight,
            base_table, 0.0, "abs")
    assert len(mine.tokenizer) == len(reference.tokenizer) == mine.tokenizer.vocab_size


def test_several_tokens_one_tensor_and_partial_unload(pipes):
    """A list of tokens with one (n, D) tensor (one row each), then unloading one token: ids move down as in
    diffusers, so the other token keeps its vector."""
    model, reference, mine, _ = pipes
    rows = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(5))  # (2, D)
    prompts, negatives = ["<a> and <b>", "only <b>"], ["<a>", "<b>"]
    for pipe in (reference, mine):
        pipe.load_textual_inversion(rows, token=["<a>", "<b>"])
        pipe.unload_textual_inversion("<a>")
    try:
        compare_exact(COMPONENT, f"{model} unload one of two: <b>'s id", mine.tokenizer.convert_tokens_to_ids("<b>"),
                      reference.tokenizer.convert_tokens_to_ids("<b>"))
        compare(COMPONENT, f"{model} unload one of two: prompt embeddings", embeddings_of(mine, prompts, negatives),
                embeddings_of(reference, prompts, negatives), EMBED_TOL)
    finally:
        reference.unload_textual_inversion()
        mine.unload_textual_inversion()


@pytest.mark.parametrize("writer", ["minidiff", "diffusers"])
def test_saved_pipeline_loads_in_the_other_library(pipes, tmp_path, writer):
    """A pipeline saved after loading a multi-vector embedding keeps its tokens and rows in both libraries."""
    model, reference, mine, folder = pipes
    path, token = embedding_file(folder, "diffusers", 3)
    source = mine if writer == "minidiff" else reference
    source.load_textual_inversion(str(path), token=token)
    try:
        source.save_pretrained(tmp_path / "saved")
        expected = embeddings_of(source)
    finally:
        source.unload_textual_inversion()
    if writer == "minidiff":
        loaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None,
                                                                   requires_safety_checker=False)
    else:
        loaded = minidiff.StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    compare(COMPONENT, f"{model} saved by {writer}, loaded by the other: prompt embeddings", embeddings_of(loaded),
            expected, EMBED_TOL)
