"""CLIPTokenizer: text -> CLIP token ids, the same ids as transformers 5's ``CLIPTokenizer``.

    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")   # or CLIPTokenizer() (shipped vocab)
    tokenizer(["a photo of a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    -> {"input_ids": (1, 77) long tensor, "attention_mask": (1, 77)}

Byte-level BPE with ``</w>`` word ends (Sennrich et al. 2016; Radford et al. 2019, 2021), see :mod:`.bpe`. A
sequence is ``<|startoftext|> ... <|endoftext|>`` (ids 49406, 49407), truncated to ``max_length`` (77: 75 tokens plus
the two) and padded on the right with ``pad_token``: ``<|endoftext|>`` for SD 1.x, ``"!"`` (id 0) for SD 2.x.

Special-token strings typed in a prompt become their ids before any normalization; ones flagged ``normalized``
(SD folders mark bos/eos so) are also found after normalization, e.g. in uppercase. With pad ``"!"`` every ``!`` of a
prompt therefore becomes id 0, as in transformers (diffusers #4153).

``add_tokens(["<cat-toy>"])`` (textual inversion) adds tokens with the ids after the vocabulary (49408, ...). As in
transformers they are ``normalized``: found in the normalized text (any case, any whitespace run), anywhere, even
inside a word (``a <cat-toy>s`` -> ``a</w> <cat-toy> s</w>``), the longest first.

The shipped vocabulary ``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT; see VOCAB_LICENSE.txt).
"""

from __future__ import annotations

import gzip
import json
import numbers
import os
import re
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from minidiff.configuration import check_choice
from minidiff.loading.safetensors_io import read_json_object, require_regular_file
from minidiff.text.bpe import (
    END_OF_WORD, BytePairEncoder, byte_decode, byte_decoder, byte_encode, bytes_to_unicode, normalize, pre_tokenize,
)

SHIPPED_MERGES_FILE = os.path.join(os.path.dirname(__file__), "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49408 - 2 * 256 - 2  # vocab 49408 = 256 byte chars + 256 with </w> + merges + 2 specials
MODEL_MAX_LENGTH = 77  # CLIP's position table
UNSET_MAX_LENGTH = 10**20  # transformers' LARGE_INTEGER: it saves VERY_LARGE_INTEGER (1e30) for "no limit"; we use 77
MAX_TOKENS = 1_000_000  # no CLIP has this many positions: a longer max_length is a typo that would pad to GiBs
TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}
PADDING_CHOICES = (False, True, "longest", "max_length", "do_not_pad")
TRUNCATION_CHOICES = (None, False, True, "longest_first", "only_first", "do_not_truncate")
RETURN_TENSORS_CHOICES = (None, "pt", "np")


class SpecialToken(NamedTuple):
    """A special token's string and whether it is also found in normalized text ("<|ENDOFTEXT|>" then counts too)."""

    content: str
    normalized: bool = False

    def to_json(self) -> dict[str, Any]:
        """transformers' AddedToken fields."""
        flags = {"lstrip": False, "normalized": self.normalized, "rstrip": False, "single_word": False}
        return {"content": self.content, **flags}


class BatchEncoding(dict):
    """What a tokenizer call returns: ``input_ids`` and ``attention_mask`` as keys or attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer with transformers' call API (see the module docstring).

    ``vocab`` maps token -> id and ``merges`` lists ranked pairs ("a b" or ("a", "b")); both default to the shipped
    CLIP vocabulary. Special tokens are strings or ``{"content": ..., "normalized": ...}`` and must be in ``vocab``.
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[str] | list[tuple[str, str]] | None = None,
        bos_token: str | dict = DEFAULT_TOKENS["bos_token"],
        eos_token: str | dict = DEFAULT_TOKENS["eos_token"],
        unk_token: str | dict = DEFAULT_TOKENS["unk_token"],
        pad_token: str | dict = DEFAULT_TOKENS["pad_token"],
        model_max_length: int = MODEL_MAX_LENGTH,
    ) -> None:
        if (vocab is None) != (merges is None):
            raise ValueError("pass both vocab and merges, or neither for the shipped CLIP vocabulary")
        if vocab is None:
            vocab, merges = shipped_vocabulary()
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        _check_merges(vocab, merges)
        self.encoder = dict(vocab)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merges = merges
        given = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token)
        tokens = {role: _as_special_token(role, value, self.encoder) for role, value in given.items()}
        normalized = {token.content: token.normalized for token in tokens.values()}  # shared: the last role's flag wins
        self.special_tokens = {role: t._replace(normalized=normalized[t.content]) for role, t in tokens.items()}
        self.model_max_length = _check_max_length(model_max_length, 2, "model_max_length")
        self.bpe = BytePairEncoder(self.encoder, merges, unk_id=self.unk_token_id)
        self.added_tokens: list[SpecialToken] = []  # non-special tokens added after the vocabulary, in id order
        self._index_tokens()

    def _index_tokens(self) -> None:
        """Rebuild the lookups of the tokens found before BPE: special tokens and added tokens (ids from vocab_size).

        Non-normalized ones are matched in the raw text, normalized ones by their normalized form in normalized text;
        a special token wins over an added token of the same form."""
        added = list(enumerate(self.added_tokens, start=self.vocab_size))
        found = [*((t, i) for i, t in added), *((t, self.encoder[t.content]) for t in self.special_tokens.values())]
        self._raw_ids = {t.content: i for t, i in found if not t.normalized}
        self._normalized_ids = {normalize(t.content): i for t, i in found if t.normalized}
        self._added_encoder = {t.content: i for i, t in added}
        # id -> the token as tokenize/decode show it: normalized ones in normalized form ("Dog" -> "dog")
        self._added_decoder = {i: normalize(t.content) if t.normalized else t.content for i, t in added}
        self._raw_special = _alternation(list(self._raw_ids))
        self._normalized_special = _alternation(list(self._normalized_ids))

    # ---- construction and files ---------------------------------------------------------------------------------
    @classmethod
    def from_default(cls, **kwargs: Any) -> "CLIPTokenizer":
        """The shipped CLIP vocabulary; ``pad_token="!"`` for the SD 2.x (OpenCLIP) convention."""
        return cls(**kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **overrides: Any
    ) -> "CLIPTokenizer":
        """Read vocab.json + merges.txt (or transformers 5's tokenizer.json) and the token settings of a folder.

        Settings come from tokenizer_config.json and special_tokens_map.json as transformers reads them;
        ``overrides`` (``pad_token="!"``, ``model_max_length=...``) replace them.
        """
        from minidiff.loading.hub import resolve_folder

        folder = resolve_folder(pretrained_model_name_or_path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder} does not exist: no {subfolder!r} subfolder")
        vocab, merges, added_tokens = _read_vocab_and_merges(folder)
        settings, added_tokens = _read_token_settings(folder, added_tokens)
        settings.update(overrides)
        try:
            tokenizer = cls(vocab, merges, **settings)
        except ValueError as error:  # a bad merge or special token: say which folder holds it
            raise ValueError(f"tokenizer in {folder}: {error}") from None
        tokenizer._restore_added_tokens(added_tokens, folder)
        return tokenizer

    def _restore_added_tokens(self, added_tokens: list[dict], folder: str) -> None:
        """The non-special added tokens of a saved folder, which must follow the vocabulary without gaps."""
        added = sorted((t for t in added_tokens if not t.get("special") and t["content"] not in self.encoder),
                       key=lambda t: t["id"])
        for expected, token in enumerate(added, start=self.vocab_size):
            if token["id"] != expected:
                raise ValueError(
                    f"tokenizer in {folder}: added token {token['content']!r} has id {token['id']}, expected "
                    f"{expected}: added tokens follow the vocabulary of {self.vocab_size} tokens without gaps"
                )
        self.added_tokens = [SpecialToken(t["content"], bool(t.get("normalized", True))) for t in added]
        self._index_tokens()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (transformers' layout)."""
        os.makedirs(save_directory, exist_ok=True)
        added = {self.encoder[t.content]: {**t.to_json(), "special": True} for t in self.special_tokens.values()}
        added.update({i: {**t.to_json(), "special": False} for i, t in enumerate(self.added_tokens, self.vocab_size)})
        config = {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, "do_lower_case": True,
            "errors": "replace", "add_prefix_space": False,
            "added_tokens_decoder": {str(i): added[i] for i in sorted(added)},
            **{role: token.content for role, token in self.special_tokens.items()},
        }
        special_map = {role: token.to_json() for role, token in self.special_tokens.items()}
        vocab = dict(sorted(self.encoder.items(), key=lambda item: item[1]))
        files = {
            "vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special_map, indent=2),
        }
        for name, text in files.items():
            with open(os.path.join(save_directory, name), "w", encoding="utf-8") as handle:
                handle.write(text)

    # ---- vocabulary ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (transformers' meaning)."""
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder) + len(self.added_tokens)

    def get_vocab(self) -> dict[str, int]:
        return {**self.encoder, **self.added_tokens_encoder}

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """Special and added tokens -> ids, as transformers' ``added_tokens_encoder``."""
        special = {t.content: self.encoder[t.content] for t in self.special_tokens.values()}
        return {**special, **self._added_encoder}

    def add_tokens(self, new_tokens: str | list[str]) -> int:
        """Add tokens after the vocabulary (ids ``len(self)``, ...), normalized as transformers adds them; tokens
        already in the vocabulary are skipped. Returns the number added."""
        tokens = [new_tokens] if isinstance(new_tokens, str) else new_tokens
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in tokens):
            raise ValueError(f"add_tokens takes a non-blank str or a list of them, got {new_tokens!r}")
        vocab = self.get_vocab()
        new = [t for t in dict.fromkeys(tokens) if t not in vocab]
        self.added_tokens += [SpecialToken(t, normalized=True) for t in new]
        self._index_tokens()
        return len(new)

    def remove_added_tokens(self, tokens: list[str]) -> list[int]:
        """Remove added tokens; the remaining ones move down to close the gaps (as diffusers' unload does).
        Returns the ids the removed tokens had."""
        ids = self._added_encoder
        unknown = [t for t in tokens if t not in ids]
        if unknown:
            raise ValueError(f"{unknown} are not added tokens of this tokenizer; added tokens: {list(ids)}")
        self.added_tokens = [t for t in self.added_tokens if t.content not in tokens]
        self._index_tokens()
        return sorted(ids[t] for t in set(tokens))

    bos_token = property(lambda self: self.special_tokens["bos_token"].content)
    eos_token = property(lambda self: self.special_tokens["eos_token"].content)
    unk_token = property(lambda self: self.special_tokens["unk_token"].content)
    pad_token = property(lambda self: self.special_tokens["pad_token"].content)
    bos_token_id = property(lambda self: self.encoder[self.bos_token])
    eos_token_id = property(lambda self: self.encoder[self.eos_token])
    unk_token_id = property(lambda self: self.encoder[self.unk_token])
    pad_token_id = property(lambda self: self.encoder[self.pad_token])

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(token.content for token in self.special_tokens.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.encoder[token] for token in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Token string(s) -> id(s); unknown tokens give the unk id."""
        def id_of(token: str) -> int:
            return self._added_encoder.get(token, self.encoder.get(token, self.unk_token_id))

        return id_of(tokens) if isinstance(tokens, str) else [id_of(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._token_of(self._check_ids([ids])[0])
        return [self._token_of(i) for i in self._check_ids(ids)]

    def _token_of(self, token_id: int) -> str:
        return self._added_decoder.get(token_id) or self.decoder[token_id]

    # ---- text -> ids --------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text``, without bos/eos: ``tokenize("A cat!") -> ["a</w>", "cat</w>", "!</w>"]``.
        A special or added token appears as the text it matched (normalized: ``<CAT-TOY>`` gives ``<cat-toy>``)."""
        tokens: list[str] = []
        for piece, token_id in self._split_tokens(_check_text(text, "text")):
            tokens += [piece] if token_id is not None else [self.decoder[i] for i in self._bpe_ids(piece)]
        return tokens

    def _text_to_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, token_id in self._split_tokens(text):
            ids += [token_id] if token_id is not None else self._bpe_ids(piece)
        return ids

    def _split_tokens(self, text: str) -> list[tuple[str, int | None]]:
        """Special/added tokens found in the raw text, then in each normalized stretch between them:
        (matched text, id) for each token found, (normalized stretch, None) for the text left to BPE."""
        pieces: list[tuple[str, int | None]] = []
        for raw, is_token in _split_around(text, self._raw_special):
            if is_token:
                pieces.append((raw, self._raw_ids[raw]))
                continue
            for piece, is_token in _split_around(normalize(raw), self._normalized_special):
                pieces.append((piece, self._normalized_ids[piece] if is_token else None))
        return pieces

    def _bpe_ids(self, stretch: str) -> list[int]:
        return [i for word in pre_tokenize(stretch) for i in self.bpe.encode(word)]

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Token ids and attention mask of one text or a batch, with transformers' padding/truncation rules.

        ``padding``: False, True/"longest" (to the longest in the batch) or "max_length". ``truncation``: True
        cuts each sequence to ``max_length`` (bos/eos included) and warns how many tokens it dropped; None
        truncates only when ``max_length`` is given without padding. ``max_length`` (at most MAX_TOKENS) defaults
        to ``model_max_length`` where needed.
        ``return_tensors``: None (lists), "pt" (long tensors) or "np" (int64 arrays), shaped (batch, length).
        """
        texts = [_check_text(text, "text")] if isinstance(text, str) else _check_texts(text)
        check_choice("return_tensors", return_tensors, RETURN_TENSORS_CHOICES)
        sequences, masks = self._encode_batch(texts, padding, truncation, max_length, add_special_tokens)
        if return_tensors is not None:
            return BatchEncoding(input_ids=_as_tensor(sequences, return_tensors),
                                 attention_mask=_as_tensor(masks, return_tensors))
        if isinstance(text, str):
            return BatchEncoding(input_ids=sequences[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=sequences, attention_mask=masks)

    def _encode_batch(self, texts: list[str], padding, truncation, max_length, add_special_tokens: bool):
        """(ids, attention masks) of each text, truncated and padded as transformers decides from the options."""
        check_choice("padding", padding, PADDING_CHOICES)
        check_choice("truncation", truncation, TRUNCATION_CHOICES)
        if truncation is None:
            truncation = max_length is not None and padding is False
        truncate = truncation not in (False, "do_not_truncate")
        pad_to = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        if max_length is None and (truncate or pad_to == "max_length"):
            max_length = self.model_max_length
        if max_length is not None:
            _check_max_length(max_length, 2 if add_special_tokens else 1, "max_length")

        sequences = []
        for text in texts:  # a loop, not a comprehension, so the truncation warning's stacklevel holds
            sequences.append(self._encode_one(text, add_special_tokens, max_length if truncate else None))
        length = {"longest": max(map(len, sequences)), "max_length": max_length, None: 0}[pad_to]
        masks = [[1] * len(ids) + [0] * (length - len(ids)) for ids in sequences]
        return [ids + [self.pad_token_id] * (length - len(ids)) for ids in sequences], masks

    def _encode_one(self, text: str, add_special_tokens: bool, max_length: int | None) -> list[int]:
        ids = self._text_to_ids(text)
        if max_length is not None:
            keep = max_length - (2 if add_special_tokens else 0)
            if len(ids) > keep:
                total = len(ids) + max_length - keep
                warnings.warn(
                    f"prompt is {total} tokens long; this tokenizer takes {max_length}, the last {len(ids) - keep} "
                    "were truncated",
                    stacklevel=4,  # the caller of __call__ / encode
                )
                ids = ids[:keep]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def encode(self, text: str, add_special_tokens: bool = True, padding: bool | str = False,
               truncation: bool | str | None = None, max_length: int | None = None) -> list[int]:
        """The id list of one text: ``encode("a cat") -> [49406, 320, 2368, 49407]``."""
        text = _check_text(text, "text")
        return self._encode_batch([text], padding, truncation, max_length, add_special_tokens)[0][0]

    # ---- ids -> text --------------------------------------------------------------------------------------------
    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        """Text of a list/1-D tensor of ids: bytes back to UTF-8, each ``</w>`` a space, outer spaces stripped."""
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        ids = self._check_ids([ids] if isinstance(ids, int) else ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return byte_decode([self._byte_chars_of(i) for i in ids]).replace(END_OF_WORD, " ").strip()

    def _byte_chars_of(self, token_id: int) -> str:
        """A token as byte characters for :func:`byte_decode`. Added tokens hold plain text, which transformers'
        byte-level decoder reads the same way: a character of the byte alphabet stands for its byte (so "é"
        decodes to U+FFFD, as there), any other character for its UTF-8 bytes."""
        if token_id not in self._added_decoder:
            return self.decoder[token_id]
        alphabet = byte_decoder()
        return "".join(c if c in alphabet else byte_encode(c) for c in self._added_decoder[token_id])

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` of each row of a list of id lists or a 2-D tensor."""
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def _check_ids(self, ids) -> list[int]:
        for i in ids:
            if not isinstance(i, numbers.Integral) or not (i in self.decoder or i in self._added_decoder):
                raise ValueError(f"token id {i!r} is not in this vocabulary of {len(self)} tokens")
        return [int(i) for i in ids]

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"special_tokens={ {role: t.content for role, t in self.special_tokens.items()} })")


# ---- helpers ------------------------------------------------------------------------------------------------------
def shipped_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary from the shipped merge list, built as OpenAI CLIP's simple_tokenizer does: 256 byte
    characters, the same with ``</w>``, one token per merge, ``<|startoftext|>``, ``<|endoftext|>`` (49408 in all)."""
    with gzip.open(SHIPPED_MERGES_FILE, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + END_OF_WORD for c in chars), *(a + b for a, b in merges)]
    tokens += [DEFAULT_TOKENS["bos_token"], DEFAULT_TOKENS["eos_token"]]
    return {token: i for i, token in enumerate(tokens)}, merges


def _check_merges(vocab: dict[str, int], merges: list[tuple[str, ...]]) -> None:
    for rank, merge in enumerate(merges):
        if len(merge) != 2 or any(part not in vocab for part in (*merge, "".join(merge))):
            raise ValueError(f"merge {rank} {merge!r}: a merge is two vocabulary tokens whose concatenation is one too")


def _as_special_token(role: str, value: str | dict, vocab: dict[str, int]) -> SpecialToken:
    if isinstance(value, str):
        token = SpecialToken(value)
    else:
        token = SpecialToken(value["content"], bool(value.get("normalized", False)))
    if token.content not in vocab:
        raise ValueError(
            f"{role}={token.content!r} is not in the vocabulary; CLIP uses '<|endoftext|>' or '!' as pad_token"
        )
    return token


def _alternation(tokens: list[str]) -> re.Pattern | None:
    """A pattern finding any of ``tokens``, the longest first where several start at one place."""
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def _split_around(text: str, tokens: re.Pattern | None) -> list[tuple[str, bool]]:
    """``text`` cut around every special token: (piece, is_special_token) pairs in order, empty pieces dropped."""
    parts = tokens.split(text) if tokens is not None else [text]
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]  # the capture group puts tokens at odd places


def _check_text(text: Any, name: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str or a list of str, got {type(text).__name__}")
    return text


def _check_texts(texts: Any) -> list[str]:
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"text must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError("text is an empty list; pass at least one prompt")
    return [_check_text(t, f"text[{i}]") for i, t in enumerate(texts)]


def _check_max_length(max_length: Any, minimum: int, name: str) -> int:
    """``max_length`` / ``model_max_length``: an int from ``minimum`` to MAX_TOKENS (padding allocates that many)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < minimum:
        why = " (bos and eos take two places)" if minimum == 2 else ""
        raise ValueError(f"{name}={max_length!r}: must be an int >= {minimum}{why}")
    if max_length > MAX_TOKENS:
        raise ValueError(f"{name}={max_length}: must be at most {MAX_TOKENS:,} tokens (CLIP text encoders take "
                         f"{MODEL_MAX_LENGTH}); padding to it would allocate gigabytes")
    return max_length


def _as_tensor(rows: list[list[int]], return_tensors: str):
    if len({len(row) for row in rows}) > 1:
        lengths = sorted({len(row) for row in rows})
        raise ValueError(
            f"return_tensors={return_tensors!r} needs sequences of one length, got lengths {lengths}; "
            "pass padding='max_length' (or 'longest') and truncation=True"
        )
    array = np.array(rows, dtype=np.int64)
    return torch.from_numpy(array) if return_tensors == "pt" else array


def _read_json(path: str) -> dict | None:
    """A JSON object file, None when absent, else a ValueError naming the file (directory, FIFO, bad JSON...)."""
    if not os.path.lexists(path):
        return None
    return read_json_object(path, "tokenizer file")


def _read_merges(path: str) -> list[tuple[str, str]]:
    """merges.txt: an optional ``#version`` line, then one merge ``a b`` per line."""
    require_regular_file(path, "tokenizer file")
    merges = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\n")
                if not line or line.startswith("#version"):
                    continue
                if line.count(" ") != 1:
                    raise ValueError(f"{path} line {number}: {line!r} is not a merge 'a b'")
                merges.append(tuple(line.split(" ")))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); fix or re-download it") from None
    return merges


def _check_vocab(vocab: Any, path: str) -> dict[str, int]:
    if not all(isinstance(token, str) and isinstance(i, int) and not isinstance(i, bool) for token, i in vocab.items()):
        raise ValueError(f"{path}: the vocabulary must map token strings to integer ids")
    return vocab


def _read_vocab_and_merges(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """vocab.json + merges.txt, else the BPE model inside tokenizer.json (what transformers 5 saves alone).

    Also returns tokenizer.json's "added_tokens" (their ``normalized`` flags), empty for the two-file layout.
    """
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    tokenizer_json = _read_json(os.path.join(folder, "tokenizer.json"))
    if tokenizer_json is not None and not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
        model, path = tokenizer_json.get("model"), os.path.join(folder, "tokenizer.json")
        if (not isinstance(model, dict) or model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD
                or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list)):
            raise ValueError(f"{path} is not a CLIP tokenizer (a BPE model with '</w>' word ends, vocab and merges)")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return _check_vocab(model["vocab"], path), merges, tokenizer_json.get("added_tokens", [])
    for path in (vocab_path, merges_path):
        if not os.path.lexists(path):
            raise FileNotFoundError(
                f"{path} does not exist: a CLIP tokenizer folder needs vocab.json and merges.txt (or tokenizer.json)"
            )
    return _check_vocab(_read_json(vocab_path), vocab_path), _read_merges(merges_path), []


def _read_token_settings(folder: str, added_tokens: list[dict]) -> tuple[dict[str, Any], list[dict]]:
    """Special tokens and model_max_length from tokenizer_config.json / special_tokens_map.json, as transformers 5
    resolves them: a token's ``normalized`` flag comes from the config's ``added_tokens_decoder`` (else from
    tokenizer.json's added tokens, else from the token's own dict); special_tokens_map.json counts only when the
    config has no ``added_tokens_decoder``. Also returns those added tokens, each with an int ``id``."""
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) or {}
    tokens = {role: config[role] for role in TOKEN_ROLES if config.get(role) is not None}
    if "added_tokens_decoder" in config:
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise ValueError(f"{config_path}: added_tokens_decoder must be an object of id -> token")
        added_tokens = [{**t, "id": key} if isinstance(t, dict) else t for key, t in decoder.items()]
    else:
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json")) or {}
        tokens.update({role: special_map[role] for role in TOKEN_ROLES if special_map.get(role) is not None})
    for where, token in [*tokens.items(), *(("added token", t) for t in added_tokens)]:
        if not (isinstance(token, dict) and isinstance(token.get("content"), str)
                or isinstance(token, str) and where != "added token"):
            raise ValueError(f"{folder}: {where} is {token!r}; a token is {{\"content\": string, ...}} "
                             "(or, for a special token role, a string)")
        if where == "added token" and not str(token.get("id")).isdigit():
            raise ValueError(f"{folder}: added token {token['content']!r} has id {token.get('id')!r}, not a token id")
    added_tokens = [{**t, "id": int(t["id"])} for t in added_tokens]
    flags = {t["content"]: t.get("normalized", False) for t in added_tokens}
    settings: dict[str, Any] = {}
    for role, value in tokens.items():
        content = value if isinstance(value, str) else value["content"]
        normalized = flags.get(content, False if isinstance(value, str) else value.get("normalized", False))
        settings[role] = {"content": content, "normalized": normalized}
    settings["model_max_length"] = _model_max_length(config.get("model_max_length"), folder)
    return settings, added_tokens


def _model_max_length(value: Any, folder: str) -> int:
    """tokenizer_config.json's model_max_length: absent, or transformers' "no limit" (>= 1e20, it writes 1e30),
    gives CLIP's 77 (transformers would then neither pad nor truncate); else a positive int up to MAX_TOKENS."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= UNSET_MAX_LENGTH):
        return MODEL_MAX_LENGTH
    if isinstance(value, float) and value.is_integer():  # 77.0 written by some JSON tools
        value = int(value)
    try:
        return _check_max_length(value, 2, "model_max_length")
    except ValueError as error:
        raise ValueError(f"{os.path.join(folder, 'tokenizer_config.json')}: {error}; CLIP tokenizers use 77") from None
