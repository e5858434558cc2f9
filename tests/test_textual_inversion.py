"""Textual inversion in minidiff alone: added tokens in the tokenizer (checked against transformers' ids), load/unload
round trips, and every bad input refused with nothing half-applied."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file

import minidiff
from tests.tiny_components import tiny_pipeline
from tests.training_fixtures import one_thread  # noqa: F401  (autouse: tiny models run fastest single-threaded)

WIDTH = 16  # the tiny text encoder's hidden_size
ADDED = ["<cat-toy>", "<cat-toy>_1", "my tok", "Dog", "<x>", "Été"]
TRICKY = ["a <cat-toy>s", "<cat-toy>,", "A <CAT-TOY> x", "a<cat-toy>b", "  <cat-toy>  <cat-toy>_1",
          "<cat-toy>_1 <cat-toy>_12", "my   tok is", "dog Dog DOG", "<|endoftext|><cat-toy>", "été <x><x>é",
          "x<cat-toy>_1y", "a  \n <cat-toy>\t!"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    minidiff.CLIPTokenizer().save_pretrained(folder)
    mine, theirs = minidiff.CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert mine.add_tokens(ADDED) == theirs.add_tokens(ADDED) == len(ADDED)
    return mine, theirs


def test_added_tokens_match_transformers(tokenizers):
    mine, theirs = tokenizers
    assert len(mine) == len(theirs) == 49408 + len(ADDED) and mine.vocab_size == 49408
    assert mine.convert_tokens_to_ids(ADDED) == theirs.convert_tokens_to_ids(ADDED) == list(range(49408, 49414))
    for text in TRICKY:
        ids = mine(text).input_ids
        assert ids == theirs(text).input_ids, text
        assert mine.tokenize(text) == theirs.tokenize(text), text
        assert mine.decode(ids) == theirs.decode(ids), text
        assert mine.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text


def test_add_tokens_skips_known_tokens_and_refuses_blank():
    tokenizer = minidiff.CLIPTokenizer()
    assert tokenizer.add_tokens(["<new>", "<new>", "cat</w>"]) == 1 and len(tokenizer) == 49409
    with pytest.raises(ValueError, match="non-blank"):
        tokenizer.add_tokens(["<ok>", " "])
    assert len(tokenizer) == 49409


@pytest.mark.parametrize("reader", ["minidiff", "transformers"])
@pytest.mark.parametrize("writer", ["minidiff", "transformers"])
def test_added_tokens_survive_save_and_load(tokenizers, tmp_path, writer, reader):
    """minidiff writes them in tokenizer_config.json's added_tokens_decoder, transformers 5 in tokenizer.json."""
    source = tokenizers[0] if writer == "minidiff" else tokenizers[1]
    source.save_pretrained(tmp_path)
    loaded = (minidiff.CLIPTokenizer if reader == "minidiff" else transformers.CLIPTokenizer).from_pretrained(tmp_path)
    assert len(loaded) == len(source)
    assert [loaded(text).input_ids for text in TRICKY] == [source(text).input_ids for text in TRICKY]


def test_added_token_ids_with_a_gap_are_refused(tmp_path):
    tokenizer = minidiff.CLIPTokenizer()
    tokenizer.add_tokens(["<a>"])
    tokenizer.save_pretrained(tmp_path)
    config = (tmp_path / "tokenizer_config.json").read_text().replace('"49408"', '"49410"')
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ValueError, match=r"'<a>' has id 49410, expected 49408"):
        minidiff.CLIPTokenizer.from_pretrained(tmp_path)


def test_resize_token_embeddings_keeps_rows_and_config():
    encoder = tiny_pipeline(minidiff.StableDiffusionPipeline).text_encoder
    table = encoder.get_input_embeddings().weight.detach().clone()  # (V, D)
    grown = encoder.resize_token_embeddings(49410).weight.detach()  # (V + 2, D)
    assert encoder.config.vocab_size == 49410 and torch.equal(grown[:49408], table)
    assert torch.allclose(grown[49408:], table.mean(dim=0).expand(2, -1))
    assert torch.equal(encoder.resize_token_embeddings(49408).weight, table)
    with pytest.raises(ValueError, match="new_num_tokens=10"):
        encoder.resize_token_embeddings(10)


# ---- the pipeline API ---------------------------------------------------------------------------------------------
@pytest.fixture
def pipe():
    return tiny_pipeline(minidiff.StableDiffusionPipeline)


def vectors(count: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))  # (n, D)


def state_of(pipe) -> tuple:
    """Everything a load may change: the tokenizer's added tokens and the token table."""
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    return list(pipe.tokenizer.added_tokens), len(pipe.tokenizer), pipe.text_encoder.config.vocab_size, table


def assert_same_state(pipe, before: tuple) -> None:
    tokens, length, vocab_size, table = state_of(pipe)
    assert (tokens, length, vocab_size) == before[:3]
    assert torch.equal(table, before[3])


def test_load_multi_vector_then_unload_restores_everything(pipe, tmp_path):
    save_file({"<cat-toy>": vectors(3)}, tmp_path / "learned_embeds.safetensors")
    before = state_of(pipe)
    prompt_embeds = pipe.encode_prompt("a photo", "cpu", 1, False)[0]
    pipe.load_textual_inversion(tmp_path)
    assert pipe.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]) == [49408, 49409, 49410]
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[49408:], vectors(3)) and pipe.text_encoder.config.vocab_size == 49411
    assert pipe.maybe_convert_prompt("a <cat-toy>s", pipe.tokenizer) == "a <cat-toy> <cat-toy>_1 <cat-toy>_2s"
    assert pipe.maybe_convert_prompt(["a", "<cat-toy>"], pipe.tokenizer) == ["a", "<cat-toy> <cat-toy>_1 <cat-toy>_2"]
    pipe.unload_textual_inversion("<cat-toy>")  # with its _1, _2 vectors
    assert_same_state(pipe, before)
    assert torch.equal(pipe.encode_prompt("a photo", "cpu", 1, False)[0], prompt_embeds)


def test_a1111_file_and_several_sources(pipe, tmp_path):
    save_file({"emb_params": vectors(2, seed=1)}, tmp_path / "style.safetensors")
    pipe.load_textual_inversion([str(tmp_path / "style.safetensors"), {"<b>": vectors(1, seed=2)[0]}],
                                token=["<style>", None])
    assert pipe.tokenizer.convert_tokens_to_ids(["<style>", "<style>_1", "<b>"]) == [49408, 49409, 49410]
    pipe.unload_textual_inversion("<style>")  # <b> moves down to 49408 with its row
    assert pipe.tokenizer.convert_tokens_to_ids("<b>") == 49408
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[49408], vectors(1, seed=2)[0])


def torch_saved(path) -> str:
    torch.save({"<t>": vectors(1)}, path)
    return str(path)


@pytest.mark.parametrize(
    "case, source, kwargs, error, message",
    [
        ("token in the vocabulary", {"cat</w>": vectors(1)}, {}, ValueError, "'cat</w>'.*already in the tokenizer"),
        ("multi-vector token in the vocabulary", {"<old>": vectors(2)}, {}, ValueError, "'<old>'.*already"),
        ("width", {"<t>": vectors(1, width=8)}, {}, ValueError, r"shape \(1, 8\); expected \(n, 16\)"),
        ("empty", {"<t>": torch.zeros(0, WIDTH)}, {}, ValueError, r"shape \(0, 16\)"),
        ("NaN", {"<t>": torch.full((2, WIDTH), float("nan"))}, {}, ValueError, "NaN"),
        ("integer", {"<t>": torch.ones(1, WIDTH, dtype=torch.int64)}, {}, ValueError, "float tensor"),
        ("unknown layout", {"a": vectors(1), "b": vectors(1)}, {}, ValueError, r"holds keys \['a', 'b'\]"),
        ("A1111 without token", {"emb_params": vectors(1)}, {}, ValueError, "pass token="),
        ("bare tensor without token", vectors(1)[0], {}, ValueError, "names no token"),
        ("tokens vs sources", [{"<a>": vectors(1)}] * 2, {"token": ["<a>", "<b>", "<c>"]}, ValueError,
         r"2 embedding source\(s\) but 3 tokens"),
        ("tokens vs rows", vectors(3), {"token": ["<a>", "<b>"]}, ValueError, r"shape \(3, 16\) but 2 tokens"),
        ("duplicate tokens", [{"<a>": vectors(1)}, {"<b>": vectors(1)}], {"token": ["<a>", "<a>"]}, ValueError,
         "'<a>' is given twice"),
        ("multi-vector names collide", [{"<a>": vectors(2)}, {"<a>_1": vectors(1)}], {}, ValueError,
         "'<a>_1' is given twice"),
        ("second source bad", [{"<a>": vectors(1)}, {"<b>": vectors(1, width=3)}], {}, ValueError, "the given state"),
        ("blank token", {"<t>": vectors(1)}, {"token": " "}, ValueError, "non-blank"),
        ("unknown option", {"<t>": vectors(1)}, {"cache_dir": "x"}, TypeError, r"unknown option\(s\) \['cache_dir'\]"),
        ("pickle asked for", {"<t>": vectors(1)}, {"use_safetensors": False}, ValueError, "never unpickles"),
    ],
)
def test_bad_input_leaves_the_pipeline_as_it_was(pipe, case, source, kwargs, error, message):
    pipe.load_textual_inversion({"<old>": vectors(1)})
    before = state_of(pipe)
    with pytest.raises(error, match=message):
        pipe.load_textual_inversion(source, **kwargs)
    assert_same_state(pipe, before)


def test_files_that_are_refused(pipe, tmp_path):
    before = state_of(pipe)
    pickled = torch_saved(tmp_path / "embedding.pt")
    with pytest.raises(ValueError, match=r"embedding.pt is a pickle.*never unpickles.*save_file"):
        pipe.load_textual_inversion(pickled, token="<t>")
    renamed = torch_saved(tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match="renamed.safetensors is a pickle"):
        pipe.load_textual_inversion(renamed, token="<t>")
    (tmp_path / "learned_embeds.bin").write_bytes(open(pickled, "rb").read())
    with pytest.raises(FileNotFoundError, match=r"learned_embeds.safetensors does not exist.*\.bin'\] are pickles"):
        pipe.load_textual_inversion(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        pipe.load_textual_inversion(tmp_path, weight_name="missing.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.load_textual_inversion(str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(TypeError, match="path, a state dict or a tensor"):
        pipe.load_textual_inversion(3)
    assert_same_state(pipe, before)


def test_unload_errors(pipe):
    before = state_of(pipe)
    pipe.unload_textual_inversion()  # nothing loaded: a no-op, as in diffusers
    assert_same_state(pipe, before)
    pipe.load_textual_inversion({"<a>": vectors(1)})
    before = state_of(pipe)
    with pytest.raises(ValueError, match=r"\['<b>'\] are not loaded textual-inversion tokens; loaded: \['<a>'\]"):
        pipe.unload_textual_inversion(["<a>", "<b>"])
    assert_same_state(pipe, before)


def test_missing_components_are_named():
    class NoTextEncoder(minidiff.adapters.textual_inversion.TextualInversionLoaderMixin):
        tokenizer = minidiff.CLIPTokenizer()

    with pytest.raises(ValueError, match="NoTextEncoder has no text_encoder; pass text_encoder="):
        NoTextEncoder().load_textual_inversion({"<a>": vectors(1)})
