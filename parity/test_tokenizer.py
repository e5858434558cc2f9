"""CLIPTokenizer parity with transformers 5.23: both load the same vocab.json/merges.txt (minidiff's shipped CLIP
vocabulary, written by its save_pretrained) and must give identical ids, masks and decoded text.

Folder conventions: "sd1" (pad <|endoftext|>, specials matched in raw text only), "sd2" (pad "!", bos/eos also
matched after normalization, as SD folders flag them), "hub-legacy" (openai/clip-vit-large-patch14's
tokenizer_config.json with AddedToken dicts + special_tokens_map.json) and "transformers-saved" (tokenizer.json only,
what transformers 5 writes). Drawn text leaves out code points unassigned in Python's Unicode database (see
minidiff.text.bpe); a sweep checks every assigned code point but private-use ones.
"""

from __future__ import annotations

import json
import shutil
import sys
import unicodedata

import numpy as np
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.text import CLIPTokenizer
from parity.report import compare_exact

COMPONENT = "CLIPTokenizer"
CONVENTIONS = ("sd1", "sd2", "hub-legacy", "transformers-saved")


def _legacy_token(content: str) -> dict:
    flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", "content": content, **flags}


def _write_hub_legacy(folder) -> None:
    """openai/clip-vit-large-patch14's files: eos/unk flagged normalized, pad a plain string (which wins: not)."""
    shutil.copytree(folder.parent / "sd1", folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    tokens = {"bos_token": _legacy_token("<|startoftext|>"), "eos_token": _legacy_token("<|endoftext|>"),
              "unk_token": _legacy_token("<|endoftext|>"), "pad_token": "<|endoftext|>"}
    config = {**tokens, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special_map = {role: ({k: v for k, v in token.items() if k != "__type"} if isinstance(token, dict) else token)
                   for role, token in tokens.items()}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """convention -> (minidiff tokenizer, transformers tokenizer), both read from one folder."""
    root = tmp_path_factory.mktemp("tokenizers")
    CLIPTokenizer().save_pretrained(root / "sd1")
    normalized = {role: {"content": content, "normalized": True} for role, content in
                  (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"))}
    CLIPTokenizer(pad_token="!", **normalized).save_pretrained(root / "sd2")
    _write_hub_legacy(root / "hub-legacy")
    transformers.CLIPTokenizer.from_pretrained(root / "sd2").save_pretrained(root / "transformers-saved")
    assert not (root / "transformers-saved" / "vocab.json").exists()  # minidiff must read tokenizer.json here
    return {
        name: (CLIPTokenizer.from_pretrained(root / name), transformers.CLIPTokenizer.from_pretrained(root / name))
        for name in CONVENTIONS
    }


def codepoints(text: str) -> np.ndarray:
    return np.array([ord(c) for c in text], dtype=np.int64)


FRAGMENTS = [
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|StartOfText|>", "<|end\u00a0oftext|>", "!", "!!!", "?!",
    "'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "'x", "''s", "\u2019s", "don't", "e\u0301", "\u00e9",
    "A\u030a", "\u212b", "\u0130stanbul", "\u039f\u0394\u039f\u03a3", "Stra\u00dfe", "\ufb01", "\u6f22\u5b57",
    "\u65e5\u672c\u8a9e", "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "\U0001f1eb\U0001f1f7", "\u00bd", "\u0663", "\u216b", "1234", "3.14", "\x1c", "\u200b", "</w>", "\ufffd",
    "a painting of a", "flooble", "ultra-detailed, 8k, trending on artstation", "(masterpiece:1.2)", "[cat|dog]",
    "#hashtag", "@user", "q\u0323\u0307", "q\u0307\u0323", "\u1100\u1161\u11a8", "\u0915\u093c", "x" * 300,
    "ha" * 40, "!" * 30,
]
SEPARATOR_LIST = ["", " ", "  ", "\t", "\n", "\r\n", " \t\n ", "\u00a0", "\u3000", "\u2028", "\x85", "\x0b"]
SEPARATORS = st.sampled_from(SEPARATOR_LIST)
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))  # Cn: unassigned in Python's Unicode, see minidiff.text.bpe
WORDS = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(st.sampled_from("abcxyzABCXYZ!?.,:'-_0123456789"), min_size=1, max_size=10),
    st.text(ASSIGNED, min_size=1, max_size=6),
)
TEXTS = st.lists(st.tuples(WORDS, SEPARATORS), max_size=24).map(lambda parts: "".join(w + s for w, s in parts))
LONG_TEXTS = st.lists(st.tuples(WORDS, SEPARATORS), min_size=30, max_size=60).map(
    lambda parts: "".join(w + s for w, s in parts)
)


def test_tutorial_prompt(pairs):
    ours, theirs = pairs["sd1"]
    expected = [49406, 320, 3086, 539, 320, 4062, 1059, 49407]
    prompt = "A painting of a flooble"
    compare_exact(COMPONENT, "tutorial prompt ids", ours(prompt).input_ids, theirs(prompt).input_ids)
    assert ours(prompt).input_ids == expected


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_curated_fragments(pairs, convention):
    """Each fragment alone, after a letter, and all of them joined by each separator."""
    ours, theirs = pairs[convention]
    texts = FRAGMENTS + ["x" + f for f in FRAGMENTS] + [sep.join(FRAGMENTS) for sep in SEPARATOR_LIST]
    for a, b in zip(ours(texts).input_ids, theirs(texts).input_ids):
        compare_exact(COMPONENT, f"curated fragments ({convention})", a, b)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_special_token_ids(pairs, convention):
    ours, theirs = pairs[convention]
    names = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "model_max_length", "vocab_size")
    case = f"special ids, model_max_length, vocab_size ({convention})"
    compare_exact(COMPONENT, case, [getattr(ours, n) for n in names], [getattr(theirs, n) for n in names])
    compare_exact(COMPONENT, case, sorted(ours.all_special_ids), sorted(theirs.all_special_ids))
    assert ours.pad_token_id == (0 if convention in ("sd2", "transformers-saved") else 49407)


@pytest.mark.parametrize("convention", CONVENTIONS)
@settings(max_examples=45, deadline=None)
@given(text=TEXTS)
def test_ids_and_decode(pairs, convention, text):
    ours, theirs = pairs[convention]
    ids = ours(text).input_ids
    compare_exact(COMPONENT, f"ids ({convention})", ids, theirs(text).input_ids)
    compare_exact(COMPONENT, f"tokenize ({convention})", ours.convert_tokens_to_ids(ours.tokenize(text)),
                  theirs.convert_tokens_to_ids(theirs.tokenize(text)))
    for skip in (False, True):
        compare_exact(COMPONENT, f"decode skip_special_tokens={skip} ({convention})",
                      codepoints(ours.decode(ids, skip_special_tokens=skip)),
                      codepoints(theirs.decode(ids, skip_special_tokens=skip)))


@pytest.mark.filterwarnings("ignore:The following part of your input was truncated")
@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
@settings(max_examples=30, deadline=None)
@given(
    convention=st.sampled_from(CONVENTIONS),
    batch=st.lists(st.one_of(TEXTS, LONG_TEXTS), min_size=1, max_size=3),
    padding=st.sampled_from([False, True, "longest", "max_length"]),
    truncation=st.sampled_from([None, False, True]),
    max_length=st.one_of(st.none(), st.integers(2, 80)),
)
def test_padding_truncation_mask(pairs, convention, batch, padding, truncation, max_length):
    ours, theirs = pairs[convention]
    options = dict(padding=padding, truncation=truncation, max_length=max_length)
    a, b = ours(batch, **options), theirs(batch, **options)
    for ids_a, ids_b, mask_a, mask_b in zip(a.input_ids, b.input_ids, a.attention_mask, b.attention_mask):
        compare_exact(COMPONENT, f"padding/truncation ids ({convention})", ids_a, ids_b)
        compare_exact(COMPONENT, f"padding/truncation attention_mask ({convention})", mask_a, mask_b)
    assert len(a.input_ids) == len(b.input_ids) == len(batch)


@pytest.mark.filterwarnings("ignore:The following part of your input was truncated")
@settings(max_examples=20, deadline=None)
@given(convention=st.sampled_from(CONVENTIONS), batch=st.lists(st.one_of(TEXTS, LONG_TEXTS), min_size=1, max_size=3))
def test_diffusers_call(pairs, convention, batch):
    """The pipelines' call: padding="max_length", max_length=77, truncation=True, return_tensors="pt"."""
    ours, theirs = pairs[convention]
    options = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    a, b = ours(batch, **options), theirs(batch, **options)
    assert a.input_ids.shape == (len(batch), 77) and a.input_ids.dtype == b.input_ids.dtype
    compare_exact(COMPONENT, f"pipeline call input_ids ({convention})", a.input_ids, b.input_ids)
    compare_exact(COMPONENT, f"pipeline call attention_mask ({convention})", a.attention_mask, b.attention_mask)
    decoded_a, decoded_b = "\n".join(ours.batch_decode(a.input_ids)), "\n".join(theirs.batch_decode(b.input_ids))
    compare_exact(COMPONENT, f"batch_decode ({convention})", codepoints(decoded_a), codepoints(decoded_b))


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 49407), max_size=30), skip=st.booleans())
def test_decode_arbitrary_ids(pairs, ids, skip):
    """Any id sequence, including ones whose bytes are not valid UTF-8 (replaced by U+FFFD the same way)."""
    ours, theirs = pairs["sd2"]
    decoded_a, decoded_b = ours.decode(ids, skip_special_tokens=skip), theirs.decode(ids, skip_special_tokens=skip)
    compare_exact(COMPONENT, "decode of arbitrary ids", codepoints(decoded_a), codepoints(decoded_b))


def test_every_assigned_code_point(pairs):
    """Every code point Python's Unicode database assigns (private use left out for time), each alone and in runs of
    8 neighbours: letter/number/space classes, lowercase, NFC (combining-mark order, compositions)."""
    ours, theirs = pairs["sd1"]
    chars = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cs", "Cn", "Co")]
    texts = [" ".join(chars[i : i + 4000]) for i in range(0, len(chars), 4000)]
    texts += [" ".join("".join(chars[j : j + 8]) for j in range(i, i + 4000, 8)) for i in range(0, len(chars), 4000)]
    for a, b in zip(ours(texts).input_ids, theirs(texts).input_ids):
        compare_exact(COMPONENT, "every assigned code point", a, b)
