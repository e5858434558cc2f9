"""Byte-level byte-pair encoding as CLIP uses it: normalize, split into words, map bytes to characters, merge pairs.

Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with Subword Units")
turns a word into subword units by applying a learned, ranked list of symbol-pair merges. GPT-2 (Radford et al.
2019, "Language Models are Unsupervised Multitask Learners", Sec. 2.2) runs it on UTF-8 *bytes*, each byte shown as a
printable character (:func:`bytes_to_unicode`), so every string is encodable without an unknown token. CLIP (Radford
et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") lowercases the text, splits it
with its own pattern and marks the last symbol of each word with ``</w>``.

The steps follow transformers 5's tokenizers-backed ``CLIPTokenizer`` exactly:

1. :func:`normalize`: NFC (with tokenizers' Unicode 9.0 tables, see :func:`nfc`), every whitespace run -> one
   space, lowercase (character by character).
2. :func:`pre_tokenize`: CLIP's split pattern, then byte-level's GPT-2 pattern inside each piece.
3. :func:`byte_encode` each word, then :meth:`BytePairEncoder.encode` merges it into vocabulary ids.

``\\p{L}`` (letters), ``\\p{N}`` (numbers) and ``\\s`` of the reference's Oniguruma patterns are rebuilt for the
stdlib ``re`` from :mod:`unicodedata` and the Unicode ``White_Space`` property. The reference mixes Unicode versions
(Oniguruma and Rust's lowercase: Unicode 16; its NFC: 9.0), Python 3.11 has 14.0: assigned characters behave the
same (parity sweeps every code point), characters unassigned in Python's version (category ``Cn``) may not.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
import unicodedata

END_OF_WORD = "</w>"
BPE_CACHE_SIZE = 10_000  # words remembered per encoder, as tokenizers' BPE cache

# Unicode's White_Space property (PropList.txt): what Oniguruma's \s matches. Python's own \s also matches
# U+001C..U+001F, which the reference keeps as ordinary characters.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map byte -> printable character (Radford et al. 2019).

    The 188 bytes that are printable Latin-1 characters map to themselves; the other 68 (controls, space, ...) map
    to U+0100 onward, in byte order. Dictionary order is vocabulary order: ids 0..255 are these characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return chars


@functools.cache
def byte_decoder() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def byte_encode(word: str) -> str:
    """A word's UTF-8 bytes as GPT-2's printable characters, one character per byte."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in word.encode("utf-8"))


def byte_decode(tokens: list[str]) -> str:
    """Inverse of :func:`byte_encode` over concatenated tokens; broken UTF-8 becomes U+FFFD."""
    table = byte_decoder()
    return bytes(table[char] for token in tokens for char in token).decode("utf-8", errors="replace")


# tokenizers' NFC uses Unicode 9.0 tables (crate unicode-normalization-alignments). Combining marks added since are
# plain starters there, so nothing reorders or composes across them. The list holds those of Unicode 10-14 (complete
# for Python <= 3.11) plus U+11930, second half of the one newer composition (U+11935 U+11930 -> U+11938).
_MARKS_AFTER_UNICODE_9 = re.compile(
    "([\u07fd\u0898-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b-\u0d3c\u0eba\u1715\u1abf-\u1ace\u1df6-\u1dfa\ua82c"
    "\U00010d24-\U00010d27\U00010eab-\U00010eac\U00010f46-\U00010f50\U00010f82-\U00010f85\U00011070\U0001133b"
    "\U0001145e\U00011839-\U0001183a\U0001193d-\U0001193e\U00011943\U000119e0\U00011a34\U00011a47\U00011a99"
    "\U00011d42\U00011d44-\U00011d45\U00011d97\U00016ff0-\U00016ff1\U0001e130-\U0001e136\U0001e2ae"
    "\U0001e2ec-\U0001e2ef\U00011930])"
)


def nfc(text: str) -> str:
    """Canonical composition (NFC) as the reference computes it: Python's NFC between the marks it does not know."""
    return "".join(unicodedata.normalize("NFC", part) for part in _MARKS_AFTER_UNICODE_9.split(text))


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", then lowercase each character on its own.

    Per character, like Rust's ``char::to_lowercase``: ``str.lower`` would turn a word-final capital sigma into
    "ς", the reference always gives "σ".
    """
    text = _WHITESPACE_RUN.sub(" ", nfc(text))
    return "".join(char.lower() for char in text)


@functools.cache
def _category_classes() -> dict[str, str]:
    """Regex class bodies ("A-Za-z...") holding every code point of each major general category (L, N, ...)."""
    ranges: dict[str, list[str]] = {}
    start = 0
    categories = map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))
    for major, run in itertools.groupby(categories, key=lambda category: category[0]):
        end = start + sum(1 for _ in run) - 1
        first, last = re.escape(chr(start)), re.escape(chr(end))
        ranges.setdefault(major, []).append(first if start == end else f"{first}-{last}")
        start = end + 1
    return {major: "".join(parts) for major, parts in ranges.items()}


@functools.cache
def _split_patterns() -> tuple[re.Pattern, re.Pattern]:
    """CLIP's word pattern and the part of GPT-2's that can apply to CLIP's pieces (which hold no whitespace)."""
    letter, number = _category_classes()["L"], _category_classes()["N"]
    other = f"[^{WHITESPACE}{letter}{number}]+"
    contractions = "'s|'t|'re|'ve|'m|'ll|'d"
    clip = re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|{contractions}|[{letter}]+|[{number}]|{other}")
    gpt2 = re.compile(rf"{contractions}|[{letter}]+|[{number}]+|{other}")
    return clip, gpt2


def pre_tokenize(text: str) -> list[str]:
    """Split normalized text into words; whitespace between them is dropped.

    CLIP's pattern keeps contractions ('s 't 're 've 'm 'll 'd), letter runs, single numerals and runs of other
    characters. The byte-level step then re-splits each piece with GPT-2's pattern, which only changes the
    special-token spellings the first pattern keeps whole: "<|endoftext|>" -> "<|", "endoftext", "|>".
    """
    clip, gpt2 = _split_patterns()
    return [word for piece in clip.findall(text) for word in gpt2.findall(piece)]


class BytePairEncoder:
    """Ranked merges applied to byte-encoded words, the last symbol of each word carrying ``</w>``."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], unk_id: int) -> None:
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.unk_id = unk_id
        self._cache: dict[str, list[int]] = {}

    def merge(self, word: str) -> list[str]:
        """Apply merges to a byte-encoded word until none applies (Sennrich et al. 2016, Sec. 3.2, Algorithm 1).

        Each step takes the adjacent pair of lowest rank and merges all its occurrences, left to right, as GPT-2's
        and CLIP's encoders do. For merges listed in learned order (each joins bytes or tokens of earlier merges, true
        of CLIP's list) this is the order of tokenizers' priority queue: lowest rank first, then leftmost.
        """
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            first, second = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, word: str) -> list[int]:
        """Vocabulary ids of one pre-tokenized word (not yet byte-encoded)."""
        ids = self._cache.get(word)
        if ids is None:
            ids = [self.vocab.get(symbol, self.unk_id) for symbol in self.merge(byte_encode(word))]
            if len(self._cache) < BPE_CACHE_SIZE:
                self._cache[word] = ids
        return ids
