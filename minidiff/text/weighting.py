"""Weighted prompts: the compel and AUTOMATIC1111 syntaxes, and long prompts in 77-token chunks.

Each syntax has a small parser from prompt text to ``[(text fragment, weight), ...]``, and an embedding rule:

- ``"compel"`` (compel 2.5.1 with its default settings): ``word+`` x1.1, ``word++`` x1.21, ``word-`` x0.9,
  ``(several words)1.3``, ``(words)++``, nested groups multiply. A weight w > 1 moves the token's embedding away
  from the empty prompt's, ``e + (z - e) * w``; a fragment with w < 1 is also blended towards the prompt encoded
  with that fragment masked out of attention, with lerp weight ``tan((1 - w) * pi / 2)``. Prompts are truncated to
  75 tokens, as compel does by default.
- ``"a1111"``: ``(word)`` x1.1, ``((word))`` x1.21, ``[word]`` /1.1, ``(word:1.5)``, escapes ``\\( \\) \\[ \\] \\\\``.
  The weights multiply the token embeddings, which are then rescaled to their unweighted mean,
  ``z' = z * w * mean(z) / mean(z * w)``. Prompts of any length are cut into 75-token chunks, each wrapped in
  BOS/EOS, padded to 77 and encoded separately; the chunks are concatenated along the token axis (77·k tokens).

Where AUTOMATIC1111 differs in detail, this module follows the simpler rule: chunks are cut at exactly 75 tokens
(A1111 looks back up to 20 tokens for a comma), the mean is taken per prompt and chunk (A1111 takes it over the
whole batch of a chunk), ``BREAK`` is plain text, and brackets must balance (A1111 closes them silently).
"""

from __future__ import annotations

import math
import re
import string
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from minidiff.configuration import check_choice

PROMPT_WEIGHTINGS = ("compel", "a1111")

# (ids (B, N), attention mask (B, N) or None) -> hidden states (B, N, D): the pipeline's text encoder call
Encoder = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Fragments = list[tuple[str, float]]


def check_prompt_weighting(prompt_weighting) -> None:
    check_choice("prompt_weighting", prompt_weighting, (*PROMPT_WEIGHTINGS, None))


def syntax_error(prompt: str, index: int, message: str) -> ValueError:
    """A ValueError naming the character index and showing the text around it."""
    around = prompt[max(0, index - 15): index + 15]
    return ValueError(f"{message} at character {index} of the prompt (near {around!r}): {prompt!r}")


def merge_equal_weights(fragments: Fragments, separator: str) -> Fragments:
    """Join neighbouring fragments of equal weight (compel joins with a space, A1111 without)."""
    merged: Fragments = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + separator + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


# ---- compel syntax ---------------------------------------------------------------------------------------------
COMPEL_SYNTAX = set('()",.+-=')
COMPEL_UNSUPPORTED = re.compile(r"\.(blend|and|add|swap|attend)\(|\b(withLora|useLora)\(")
COMPEL_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)|-?\d+")  # compel's real, then its integer form


@dataclass
class Weighted:
    """A group of nodes (fragment texts or Weighted groups) whose weights are multiplied by ``weight``."""
    weight: float
    children: list


class CompelParser:
    """compel's prompt grammar, for the weighting subset: at the top level a word or group followed at once by a
    weight is weighted, a group is a group, anything else up to the next space is literal text; inside a group
    only words, groups, commas and periods may appear, otherwise the whole group is read as literal text (as
    compel's parser falls back)."""

    def __init__(self, prompt: str) -> None:
        self.text = prompt
        self.groups: dict[int, tuple | None] = {}  # group parses by start index (each is tried more than once)

    def skip_space(self, i: int) -> int:
        while i < len(self.text) and self.text[i] in string.whitespace:
            i += 1
        return i

    def word(self, i: int):
        """A word without syntax characters (escaped ones and inner ``+``/``-`` allowed): (text, end) or None."""
        start, text = i, self.text
        while i < len(text):
            here, after = text[i], text[i + 1] if i + 1 < len(text) else ""
            if here == "\\" and after and after in COMPEL_SYNTAX:
                i += 2
            elif here in "+-" and after and after not in string.whitespace and after not in COMPEL_SYNTAX:
                i += 1
            elif here not in string.whitespace and here not in COMPEL_SYNTAX:
                i += 1
            else:
                break
        return (text[start:i], i) if i > start else None

    def weight(self, i: int, numbers: bool):
        """``+``/``-`` runs (1.1**n, 0.9**n) or, after a group, a number: (weight, end) or None."""
        for sign, base in (("+", 1.1), ("-", 0.9)):
            end = i
            while end < len(self.text) and self.text[end] == sign:
                end += 1
            if end > i:
                return pow(base, end - i), end
        number = COMPEL_NUMBER.match(self.text, i) if numbers else None
        return (float(number.group()), number.end()) if number else None

    def group(self, start: int):
        """``( ... )``: (children, end) or None when the group does not parse."""
        if start not in self.groups:
            self.groups[start] = self.parse_group(start)
        return self.groups[start]

    def parse_group(self, i: int):
        if i >= len(self.text) or self.text[i] != "(":
            return None
        children, i = [], i + 1
        while True:
            i = self.skip_space(i)
            if i >= len(self.text):
                return None
            if self.text[i] == ")":
                return children, i + 1
            item = self.weighted(i) or self.group(i) or self.word(i)
            if item is None and self.text[i] in ",.":
                item = (self.text[i], i + 1)
            if item is None:
                return None
            node, i = item
            children += node if isinstance(node, list) else [node]

    def weighted(self, i: int):
        """A group followed by a weight, or a word followed by ``+``/``-`` runs: (Weighted, end) or None."""
        for target, numbers in ((self.group(i), True), (self.word(i), False)):
            if target is None:
                continue
            node, end = target
            weight = self.weight(end, numbers)
            if weight is not None:
                if node == []:
                    raise syntax_error(self.text, i, "a weight applies to an empty group")
                return Weighted(weight[0], node if isinstance(node, list) else [node]), weight[1]
        return None

    def parse(self) -> list:
        nodes, i = [], self.skip_space(0)
        while i < len(self.text):
            item = self.weighted(i) or self.group(i)
            if item is None:  # a free word: everything up to the next space, as it is
                end = i
                while end < len(self.text) and self.text[end] not in string.whitespace:
                    end += 1
                item = (self.text[i:end], end)
            node, i = item
            nodes += node if isinstance(node, list) else [node]
            i = self.skip_space(i)
        return nodes


def compel_unescape(text: str) -> str:
    return text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


def flatten(nodes: list, scale: float = 1.0) -> Fragments:
    """Multiply weights down the tree (outer group first, as compel does) into (text, weight) pairs."""
    fragments: Fragments = []
    for node in nodes:
        if isinstance(node, Weighted):
            fragments += flatten(node.children, scale * node.weight)
        else:
            fragments.append((compel_unescape(node), 1.0 * scale))
    return fragments


def check_brackets(prompt: str, pairs: dict[str, str], escaped: str) -> None:
    """Every closing bracket matches the last open one, and none is left open; a backslash before a character of
    ``escaped`` makes it text."""
    stack: list[tuple[str, int]] = []
    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == "\\" and prompt[i + 1: i + 2] and prompt[i + 1] in escaped:
            i += 2
            continue
        if char in pairs:
            stack.append((char, i))
        elif char in pairs.values():
            if not stack or pairs[stack[-1][0]] != char:
                raise syntax_error(prompt, i, f"unbalanced brackets: {char!r} closes nothing")
            stack.pop()
        i += 1
    if stack:
        raise syntax_error(prompt, stack[-1][1], f"unbalanced brackets: {stack[-1][0]!r} is never closed")


def parse_compel(prompt: str) -> Fragments:
    """compel syntax -> [(text, weight), ...]: ``parse_compel("a cat++ (on a mat)0.8")`` ->
    ``[("a", 1.0), ("cat", 1.21), ("on a mat", 0.8)]``."""
    unsupported = COMPEL_UNSUPPORTED.search(prompt)
    if unsupported:
        raise syntax_error(prompt, unsupported.start(), f"compel's {unsupported.group().strip('.(')!r} syntax is "
                           "not supported by minidiff (only word+/word-/(words)1.3 weights are)")
    if '"' in prompt:
        raise syntax_error(prompt, prompt.index('"'), 'quoted fragments ("...") are not supported by minidiff; '
                           "group words with parentheses: (a red cat)1.2")
    check_brackets(prompt, {"(": ")"}, "()")
    prompt = re.sub(r",(\S)", r", \1", prompt)  # compel puts a space after every comma
    return merge_equal_weights(flatten(CompelParser(prompt).parse()), " ")


# ---- A1111 syntax ----------------------------------------------------------------------------------------------
A1111_TOKEN = re.compile(r"\\[()\[\]\\]|\\|[()\[\]]|:|[^\\()\[\]:]+")
A1111_WEIGHT = re.compile(r":([^()\[\]]*)\)")
NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*")


def parse_a1111(prompt: str) -> Fragments:
    """AUTOMATIC1111 syntax -> [(text, weight), ...]: ``parse_a1111("a (cat:1.5) [dog]")`` ->
    ``[("a ", 1.0), ("cat", 1.5), (" ", 1.0), ("dog", 1/1.1)]``."""
    check_brackets(prompt, {"(": ")", "[": "]"}, "()[]\\")
    fragments: list[list] = []  # [text, weight] pairs, weights multiplied in place as brackets close
    open_brackets: list[tuple[str, int, int]] = []  # (bracket, character index, first fragment inside)

    def close(multiplier: float) -> None:
        _, index, first = open_brackets.pop()
        if first == len(fragments):
            raise syntax_error(prompt, index, "a weight applies to no text")
        for fragment in fragments[first:]:
            fragment[1] *= multiplier

    i = 0
    while i < len(prompt):
        token = A1111_TOKEN.match(prompt, i).group()
        in_round = bool(open_brackets) and open_brackets[-1][0] == "("
        weight = A1111_WEIGHT.match(prompt, i) if token == ":" and in_round else None  # "(text:1.5)"
        if weight is not None:
            if not NUMBER.fullmatch(weight.group(1)):
                raise syntax_error(prompt, i + 1, f"the weight {weight.group(1).strip()!r} is not a number")
            close(float(weight.group(1)))
            i = weight.end()
            continue
        if token in ("(", "["):
            open_brackets.append((token, i, len(fragments)))
        elif token in (")", "]"):
            close(1.1 if token == ")" else 1 / 1.1)
        else:
            fragments.append([token[1:] if token.startswith("\\") and len(token) == 2 else token, 1.0])
        i += len(token)
    return merge_equal_weights([(text, weight) for text, weight in fragments], "")


PARSERS = {"compel": parse_compel, "a1111": parse_a1111}


# ---- tokens ----------------------------------------------------------------------------------------------------
def fragment_token_ids(fragments: Fragments, tokenizer, convert: Callable[[str], str]) -> list[list[int]]:
    """Token ids of each fragment (no BOS/EOS); ``convert`` expands textual-inversion tokens in each text."""
    texts = [convert(text) for text, _ in fragments]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def wrap_chunk(ids: list[int], tokenizer, length: int) -> list[int]:
    """[BOS, ids..., EOS, pad...] of ``length`` tokens."""
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (length - 2 - len(ids))


# ---- compel embeddings -----------------------------------------------------------------------------------------
def compel_embedding(fragments: Fragments, tokenizer, encode: Encoder, length: int,
                     convert: Callable[[str], str]) -> torch.Tensor:
    """One prompt's compel embedding (1, length, D); see the module docstring for the rule."""
    per_fragment = fragment_token_ids(fragments, tokenizer, convert)
    ids = [i for fragment in per_fragment for i in fragment]
    weights = [weight for fragment, (_, weight) in zip(per_fragment, fragments) for _ in fragment]
    if len(ids) > length - 2:
        warnings.warn(f"prompt is {len(ids) + 2} tokens long; compel weighting keeps the first {length} (as compel "
                      "truncates by default); prompt_weighting='a1111' encodes long prompts in chunks", stacklevel=4)
    ids, weights = ids[: length - 2], weights[: length - 2]
    token_ids = torch.tensor([wrap_chunk(ids, tokenizer, length)])  # (1, L)
    token_weights = torch.tensor([1.0, *weights] + [1.0] * (length - 1 - len(weights)))  # (L,)
    mask = torch.ones_like(token_ids)  # compel attends to padding too (padding_attention_mask_value=1)
    if bool((token_weights == 1).all()):
        return encode(token_ids, mask)
    empty = encode(torch.tensor([wrap_chunk([], tokenizer, length)]), None)  # (1, L, D)

    def weighted(attention_mask: torch.Tensor) -> torch.Tensor:
        z = encode(token_ids, attention_mask)  # (1, L, D)
        w = token_weights[None, :, None].to(z)  # (1, L, 1)
        return torch.where(w == 1, z, empty + (z - empty) * w)

    embeddings, lerp_weights = [weighted(mask)], [1.0]
    for (start, end), (_, weight) in zip(fragment_spans(per_fragment, length), fragments):
        if weight < 1 and end >= start:
            without = mask.clone()
            without[0, start: end + 1] = 0  # the fragment masked out of attention
            embeddings.append(weighted(without))
            lerp_weights.append(math.tan((1.0 - max(1e-5, weight)) * math.pi / 2))
    stacked = torch.stack(embeddings, dim=1)  # (1, n, L, D)
    lerp = torch.tensor(lerp_weights, dtype=stacked.dtype, device=stacked.device)
    lerp = (lerp / lerp.sum()).reshape(-1, 1, 1)  # (n, 1, 1)
    return (stacked * lerp).sum(dim=1)  # (1, L, D)


def fragment_spans(per_fragment: list[list[int]], length: int) -> list[tuple[int, int]]:
    """Inclusive token positions of each fragment after BOS. As in compel, a fragment cut by truncation reaches the
    last position (the EOS), and fragments starting beyond it get no span (end < start)."""
    spans, start = [], 1
    for ids in per_fragment:
        if start >= length - 1:
            spans.append((start, start - 1))
            continue
        spans.append((start, min(start + len(ids) - 1, length - 1)))
        start += len(ids)
    return spans


# ---- A1111 embeddings ------------------------------------------------------------------------------------------
def a1111_embeddings(prompts: list[Fragments], tokenizer, encode: Encoder, length: int, min_chunks: int,
                     convert: Callable[[str], str]) -> torch.Tensor:
    """(B, length·k, D) for B prompts; k is the most chunks any prompt needs (at least ``min_chunks``), shorter
    prompts get empty chunks ([BOS, EOS, pad...], as an empty prompt)."""
    per_token = []
    for fragments in prompts:
        per_fragment = fragment_token_ids(fragments, tokenizer, convert)
        per_token.append([(i, weight) for ids, (_, weight) in zip(per_fragment, fragments) for i in ids])
    size = length - 2
    chunks = max([min_chunks] + [math.ceil(len(tokens) / size) for tokens in per_token])
    ids, weights = [], []
    for tokens in per_token:
        for c in range(chunks):
            piece = tokens[c * size: (c + 1) * size]
            ids.append(wrap_chunk([i for i, _ in piece], tokenizer, length))
            weights.append([1.0] + [w for _, w in piece] + [1.0] * (length - 1 - len(piece)))
    z = encode(torch.tensor(ids), None)  # (B·k, L, D)
    w = torch.tensor(weights).to(z)[..., None]  # (B·k, L, 1)
    weighted = z * w
    ratio = z.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)  # (B·k, 1, 1)
    unweighted = (w == 1).all(dim=1, keepdim=True)  # (B·k, 1, 1): ratio 1 (0/0 when a chunk's mean is 0)
    rescaled = weighted * torch.where(unweighted, torch.ones_like(ratio), ratio)
    return rescaled.reshape(len(prompts), chunks * length, -1)  # (B, k·L, D)


# ---- entry point -----------------------------------------------------------------------------------------------
def weighted_prompt_embeds(texts: list[str], prompt_weighting: str, tokenizer, encode: Encoder, length: int,
                           min_length: int, convert: Callable[[str], str] = lambda text: text) -> torch.Tensor:
    """Prompt embeddings (B, N, D) read from each text's weight syntax: N = ``length`` for compel; for A1111 the
    77·k tokens of the longest prompt, at least ``min_length`` (so a negative prompt matches the positive's)."""
    check_prompt_weighting(prompt_weighting)
    prompts = [PARSERS[prompt_weighting](text) for text in texts]  # every text parsed before any encoding
    if prompt_weighting == "a1111":
        return a1111_embeddings(prompts, tokenizer, encode, length, math.ceil(min_length / length), convert)
    return torch.cat([compel_embedding(fragments, tokenizer, encode, length, convert) for fragments in prompts])
