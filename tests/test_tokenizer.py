"""CLIPTokenizer on its own: shipped vocabulary, round trips, truncation, padding, pad conventions, files, errors."""

from __future__ import annotations

import json
import string
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.text import CLIPTokenizer
from minidiff.text.bpe import BytePairEncoder, bytes_to_unicode, normalize, pre_tokenize

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def sd1() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def sd2() -> CLIPTokenizer:
    return CLIPTokenizer.from_default(pad_token="!")


# ---- building blocks ---------------------------------------------------------------------------------------------
def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert list(table.values())[0] == "!" and table[ord("a")] == "a"
    assert table[ord(" ")] == "\u0120" and table[0] == "\u0100"  # shifted bytes count up from U+0100 in byte order


def test_normalize_and_pre_tokenize():
    assert normalize("ΟΔΟΣ\u00a0\t Cafe\u0301") == "οδοσ café"  # whitespace run -> " ", NFC, no final-sigma rule
    assert normalize("a\x1cb") == "a\x1cb"  # U+001C is not White_Space (Python's \s would say it is)
    words = pre_tokenize("<|endoftext|>!x's 12 ab,.")
    assert words == ["<|", "endoftext", "|>", "!", "x", "'s", "1", "2", "ab", ",."]


def test_merge_order_lowest_rank_then_leftmost():
    vocab = {"a": 0, "a</w>": 1, "aa": 2, "aa</w>": 3}
    assert BytePairEncoder(vocab, [("a", "a")], unk_id=0).merge("aaa") == ["aa", "a</w>"]
    assert BytePairEncoder(vocab, [("a", "a</w>"), ("a", "a")], unk_id=0).merge("aaa") == ["a", "aa</w>"]


def test_shipped_merges_are_in_learned_order(sd1):
    """What makes BytePairEncoder.merge's merge-all-occurrences loop equal tokenizers' one-pair-at-a-time order."""
    known = {token for token, i in sd1.get_vocab().items() if i < 512}  # bytes, and bytes ending a word
    for first, second in sd1.merges:
        assert first in known and second in known
        known.add(first + second)


def test_shipped_vocabulary(sd1):
    assert sd1.vocab_size == len(sd1) == 49408
    assert (sd1.bos_token_id, sd1.eos_token_id, sd1.pad_token_id, sd1.model_max_length) == (BOS, EOS, EOS, 77)
    tokens = ["!", "!</w>", "in", "<|startoftext|>", "<|endoftext|>"]
    assert sd1.convert_ids_to_tokens([0, 256, 512, BOS, EOS]) == tokens
    assert sd1("A painting of a flooble").input_ids == [BOS, 320, 3086, 539, 320, 4062, 1059, EOS]
    assert sd1.tokenize("A cat's") == ["a</w>", "cat</w>", "'s</w>"]
    assert sd1.convert_tokens_to_ids(["cat</w>", "no-such-token"]) == [2368, EOS]


# ---- round trips and lengths -------------------------------------------------------------------------------------
ASCII_WORD = st.text(st.sampled_from(string.ascii_letters), min_size=1, max_size=12)
ASCII_WORDS = st.lists(ASCII_WORD, min_size=1, max_size=20)
GAPS = st.lists(st.sampled_from([" ", "  ", "\t", "\n", " \r\n "]), min_size=21, max_size=21)


@settings(max_examples=25, deadline=None)
@given(words=ASCII_WORDS, gaps=GAPS)
def test_decode_encode_round_trip(sd1, words, gaps):
    text = gaps[0] + "".join(word + gap for word, gap in zip(words, gaps[1:]))
    normalized = " ".join(words).lower()
    ids = sd1.encode(text)
    assert ids[0] == BOS and ids[-1] == EOS
    assert sd1.decode(ids, skip_special_tokens=True) == normalized
    assert sd1.decode(ids) == f"<|startoftext|>{normalized} <|endoftext|>"
    assert sd1.decode(torch.tensor(ids[1:-1])) == normalized


def test_truncation_keeps_77_and_warns_in_one_line_how_many_were_cut(sd1):
    prompt = "cat " * 75 + "small dog"
    one_line = r"^prompt is 79 tokens long; this tokenizer takes 77, the last 2 were truncated$"
    with pytest.warns(UserWarning, match=one_line) as caught:
        ids = sd1(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert caught[0].filename == __file__
    assert len(ids) == 77 and ids[0] == BOS and ids[-1] == EOS and ids[1:-1] == [2368] * 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing is cut
        assert len(sd1("cat " * 75, truncation=True).input_ids) == 77
    assert len(sd1(prompt).input_ids) == 79  # no truncation unless asked


@settings(max_examples=15, deadline=None)
@given(word_counts=st.lists(st.integers(0, 90), min_size=1, max_size=4))
def test_padding_lengths_and_masks(sd1, word_counts):
    batch = ["cat " * n for n in word_counts]
    lengths = [min(n, 75) + 2 for n in word_counts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings
        full = sd1(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        longest = sd1(batch, padding="longest", truncation=True)
    assert full.input_ids.shape == full.attention_mask.shape == (len(batch), 77)
    assert full.attention_mask.sum(dim=1).tolist() == lengths
    assert all(len(row) == max(lengths) for row in longest.input_ids)
    assert [sum(mask) for mask in longest.attention_mask] == lengths


def test_pad_ids_sd1_and_sd2_conventions(sd1, sd2):
    sd1_ids = sd1("hello world!", padding="max_length").input_ids
    sd2_ids = sd2("hello world!", padding="max_length").input_ids
    assert sd1_ids[:5] == [BOS, 3306, 1002, 256, EOS] and sd1_ids[5:] == [EOS] * 72
    assert sd2_ids[:5] == [BOS, 3306, 1002, 0, EOS] and sd2_ids[5:] == [0] * 72  # "!" is the pad token: id 0
    assert sd2.decode(sd2_ids, skip_special_tokens=True) == "hello world"


def test_return_types(sd1):
    single = sd1("a cat")
    assert single.input_ids == single["input_ids"] == [BOS, 320, 2368, EOS] and single.attention_mask == [1, 1, 1, 1]
    assert sd1(["a cat"]).input_ids == [[BOS, 320, 2368, EOS]]
    pt, np_ = sd1("a cat", return_tensors="pt"), sd1(("a cat",), return_tensors="np")
    assert pt.input_ids.dtype == torch.long and pt.input_ids.shape == (1, 4)
    assert np_.input_ids.dtype == np.int64 and np_.input_ids.tolist() == [[BOS, 320, 2368, EOS]]
    assert sd1.batch_decode(pt.input_ids, skip_special_tokens=True) == ["a cat"]
    assert sd1("a cat", add_special_tokens=False).input_ids == [320, 2368]
    with pytest.warns(UserWarning, match="prompt is 5 tokens long; this tokenizer takes 3, the last 2 were") as caught:
        assert sd1.encode("a cat dog", max_length=3) == [BOS, 320, EOS]
    assert caught[0].filename == __file__  # the warning points at the caller


def test_normalized_special_tokens_match_any_case():
    flagged = CLIPTokenizer(eos_token={"content": "<|endoftext|>", "normalized": True},
                            unk_token={"content": "<|endoftext|>", "normalized": True},
                            pad_token={"content": "<|endoftext|>", "normalized": True})
    assert flagged.encode("<|ENDOFTEXT|>", add_special_tokens=False) == [EOS]
    assert CLIPTokenizer().encode("<|ENDOFTEXT|>", add_special_tokens=False) != [EOS]
    assert CLIPTokenizer().encode("<|endoftext|>", add_special_tokens=False) == [EOS]


# ---- files -------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(sd2, tmp_path):
    sd2.save_pretrained(tmp_path / "tokenizer")
    files = sorted(p.name for p in (tmp_path / "tokenizer").iterdir())
    assert files == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "!" and config["model_max_length"] == 77
    loaded = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    assert loaded.special_tokens == sd2.special_tokens and loaded.get_vocab() == sd2.get_vocab()
    assert loaded.merges == sd2.merges
    prompt = "An astronaut riding a horse!"
    assert loaded(prompt, padding="max_length").input_ids == sd2(prompt, padding="max_length").input_ids
    assert CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", pad_token="<|endoftext|>").pad_token_id == EOS


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda t: t(123), TypeError, "text must be a str or a list of str, got int"),
        (lambda t: t(["ok", 5]), TypeError, r"text\[1\] must be a str.*got int"),
        (lambda t: t(None), TypeError, "got NoneType"),
        (lambda t: t([]), ValueError, "empty list"),
        (lambda t: t.encode(["a"]), TypeError, "got list"),
        (lambda t: t("a", padding="maximum"), ValueError, "padding='maximum' is not supported; accepted.*'max_length'"),
        (lambda t: t("a", return_tensors="tf"), ValueError, "return_tensors='tf'.*accepted.*'pt'"),
        (lambda t: t("a", truncation="yes"), ValueError, "truncation='yes'"),
        (lambda t: t("a", max_length=1, truncation=True), ValueError, "max_length=1: must be an int >= 2"),
        (lambda t: t("a", max_length="77", padding="max_length"), ValueError, "max_length='77'"),
        (lambda t: t(["a", "a b"], return_tensors="pt"), ValueError, "lengths \\[3, 4\\].*padding='max_length'"),
        (lambda t: t.decode([49408]), ValueError, "token id 49408 is not in this vocabulary of 49408"),
        (lambda t: t.decode([[1, 2]]), ValueError, "token id \\[1, 2\\]"),
    ],
)
def test_bad_calls(sd1, call, error, match):
    with pytest.raises(error, match=match):
        call(sd1)


def test_bad_construction():
    with pytest.raises(ValueError, match="pad_token='<pad>' is not in the vocabulary"):
        CLIPTokenizer(pad_token="<pad>")
    with pytest.raises(ValueError, match="pass both vocab and merges"):
        CLIPTokenizer(vocab={"a": 0})
    with pytest.raises(ValueError, match="merge 0 \\('a', 'b'\\)"):
        CLIPTokenizer(vocab={"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, merges=["a b"])


def test_bad_folders(sd1, tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json does not exist"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no 'tokenizer' subfolder"):
        CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_pretrained(tmp_path / "missing")
    sd1.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\ni n\nnot a merge\n")
    with pytest.raises(ValueError, match="merges.txt line 3: 'not a merge'"):
        CLIPTokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt does not exist"):
        CLIPTokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match="tokenizer.json is not a CLIP tokenizer"):
        CLIPTokenizer.from_pretrained(tmp_path / "tok")
