"""Textual inversion: new words for the text encoder (Gal et al. 2022, "An Image is Worth One Word: Personalizing
Text-to-Image Generation using Textual Inversion", Sec. 3: a pseudo-word S* whose embedding v* is learned while the
models stay frozen).

Loading one is plain bookkeeping: the token ``<cat-toy>`` joins the tokenizer (id ``len(tokenizer)``) and its vector
v* becomes that row of the text encoder's token table. An embedding of n vectors (n, D) becomes n tokens
``<cat-toy> <cat-toy>_1 ... <cat-toy>_{n-1}``, and :meth:`maybe_convert_prompt` writes all n where a prompt says
``<cat-toy>`` (diffusers' rule). Files: diffusers ``{token: (D,) or (n, D)}`` and A1111 ``{"emb_params": (n, D)}``
safetensors (A1111 names the token by the file name, so pass ``token=``). Pickles (.pt/.bin) are refused.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from minidiff.loading.hub import resolve_folder
from minidiff.loading.safetensors_io import PICKLE_SUFFIXES, load_safetensors, looks_like_pickle, require_regular_file

TEXT_INVERSION_NAME_SAFE = "learned_embeds.safetensors"  # diffusers' default file name in a folder
A1111_KEYS = ("emb_params", "string_to_param.*")  # one-tensor A1111 files: the key names no token
CONVERT_HINT = ("convert it where you trust it: safetensors.torch.save_file({'emb_params': "
                "torch.load(path, weights_only=True)['string_to_param']['*']}, 'embedding.safetensors')")
LOAD_OPTIONS = ("subfolder", "use_safetensors")


class TextualInversionLoaderMixin:
    """``load_textual_inversion`` / ``unload_textual_inversion`` / ``maybe_convert_prompt`` for a pipeline with
    ``tokenizer`` and ``text_encoder`` (diffusers' names and signatures)."""

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer) -> str | list[str]:
        """Write every multi-vector token of ``prompt`` (a str or a list of them) as its n tokens:
        ``"a <cat-toy>s"`` -> ``"a <cat-toy> <cat-toy>_1s"``; other prompts come back unchanged."""
        if not isinstance(prompt, list):
            return _expand_multi_vector_tokens(prompt, tokenizer)
        return [_expand_multi_vector_tokens(text, tokenizer) for text in prompt]

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str] | None = None,
                               tokenizer=None, text_encoder=None, weight_name: str | None = None,
                               **kwargs: Any) -> None:
        """Add the token(s) and vector(s) of one source or a list of them to the tokenizer and text encoder.

        A source is a safetensors file, a folder (holding ``weight_name``, default ``learned_embeds.safetensors``),
        a hub id in the local cache, a state dict, or a tensor (then ``token`` names it; an (n, D) tensor with a
        list of n tokens gives one token per row). ``token`` (a str, or a list as long as the sources) overrides the
        file's own token. Everything is checked before anything changes, so a failed load leaves both as they were.
        """
        tokenizer, text_encoder = self._textual_inversion_parts(tokenizer, text_encoder)
        unknown = sorted(set(kwargs) - set(LOAD_OPTIONS))
        if unknown:
            raise TypeError(f"load_textual_inversion got unknown option(s) {unknown}; accepted: "
                            f"token, tokenizer, text_encoder, weight_name, {', '.join(LOAD_OPTIONS)}")
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False asks for a pickled embedding; minidiff never unpickles: "
                             f"{CONVERT_HINT}")
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        names = token if isinstance(token, list) else [token] * len(sources)
        states = [_read_source(source, weight_name, kwargs.get("subfolder")) for source in sources]
        if len(states) == 1 and len(names) > 1 and isinstance(states[0][0], torch.Tensor):
            states = _one_row_per_token(states[0], len(names))
        if len(states) != len(names):
            raise ValueError(f"{len(sources)} embedding source(s) but {len(names)} tokens {names}; "
                             "pass one token per source (or one token per row of a single (n, D) tensor)")
        embeddings = [_token_and_vectors(state, name, where) for (state, where), name in zip(states, names)]
        rows = _check_new_tokens(embeddings, tokenizer, text_encoder)

        table = text_encoder.resize_token_embeddings(len(tokenizer) + len(rows)).weight  # (V + n, D)
        tokenizer.add_tokens(list(rows))
        with torch.no_grad():
            for new_token, vector in rows.items():
                table[tokenizer.convert_tokens_to_ids(new_token)] = vector.to(table.dtype)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None, tokenizer=None,
                                 text_encoder=None) -> None:
        """Remove the given added tokens (with their ``_1 ...`` tokens, for a multi-vector one), or all of them,
        from the tokenizer and their rows from the token table; the remaining added tokens move down. Unloading
        everything restores the tokenizer and the table exactly."""
        tokenizer, text_encoder = self._textual_inversion_parts(tokenizer, text_encoder)
        added = [t.content for t in tokenizer.added_tokens]
        if not added and not tokens:
            return  # nothing loaded: a no-op, as in diffusers
        names = list(added) if not tokens else [tokens] if isinstance(tokens, str) else list(tokens)
        unknown = [name for name in names if name not in added]
        if unknown:
            raise ValueError(f"{unknown} are not loaded textual-inversion tokens; loaded: {added}")
        names += [name for name in added if any(_is_vector_of(name, base) for base in names)]
        removed = set(tokenizer.remove_added_tokens(names))
        table = text_encoder.get_input_embeddings().weight  # (V, D)
        kept = table.detach()[[i for i in range(table.shape[0]) if i not in removed]]  # (V - removed, D)
        with torch.no_grad():
            text_encoder.resize_token_embeddings(kept.shape[0]).weight.copy_(kept)

    def _textual_inversion_parts(self, tokenizer, text_encoder):
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self, "text_encoder", None)
        for name, part in (("tokenizer", tokenizer), ("text_encoder", text_encoder)):
            if part is None:
                raise ValueError(f"{type(self).__name__} has no {name}; pass {name}=... to use textual inversion")
        return tokenizer, text_encoder


# ---- prompts ------------------------------------------------------------------------------------------------------
def _expand_multi_vector_tokens(prompt: str, tokenizer) -> str:
    """diffusers' ``_maybe_convert_prompt``: each added token the tokenizer finds in ``prompt`` is replaced, as text,
    by itself and its ``_1``, ``_2`` ... tokens. Like diffusers, this replaces the text the tokenizer matched
    (normalized: lowercase), so a multi-vector token typed in another case keeps only its first vector."""
    added = tokenizer.added_tokens_encoder
    for found in dict.fromkeys(tokenizer.tokenize(prompt)):
        if found in added:
            count = next(i for i in range(1, len(added) + 2) if f"{found}_{i}" not in added)
            prompt = prompt.replace(found, " ".join([found, *(f"{found}_{i}" for i in range(1, count))]))
    return prompt


def _is_vector_of(name: str, base: str) -> bool:
    """``<cat-toy>_2`` is a vector token of ``<cat-toy>``."""
    return name.startswith(f"{base}_") and name[len(base) + 1:].isdigit()


# ---- reading ------------------------------------------------------------------------------------------------------
def _read_source(source, weight_name: str | None, subfolder: str | None) -> tuple[Any, str]:
    """(a state dict or a tensor, where it came from for messages)."""
    if isinstance(source, torch.Tensor):
        return source, "the given tensor"
    if isinstance(source, dict):
        return source, "the given state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a textual-inversion source is a path, a state dict or a tensor, got {type(source).__name__}")
    path = _resolve_file(os.fspath(source), weight_name, subfolder)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise _pickle_refused(path)
    require_regular_file(path, "textual-inversion file")
    try:
        return load_safetensors(path), path
    except ValueError:
        if looks_like_pickle(path):
            raise _pickle_refused(path) from None
        raise


def _resolve_file(path: str, weight_name: str | None, subfolder: str | None) -> str:
    if os.path.isfile(path):
        if weight_name is not None or subfolder is not None:
            raise ValueError(f"weight_name/subfolder name a file inside a folder, but {path} is a file; pass the "
                             "file alone")
        return path
    folder = os.path.join(resolve_folder(path), subfolder or "")
    file = os.path.join(folder, weight_name or TEXT_INVERSION_NAME_SAFE)
    if not os.path.lexists(file):
        present = sorted(name for name in os.listdir(folder) if name.endswith((".safetensors", *PICKLE_SUFFIXES))) \
            if os.path.isdir(folder) else []
        pickles = [name for name in present if name.endswith(PICKLE_SUFFIXES)]
        hint = f"; {pickles} are pickles, which minidiff never unpickles: {CONVERT_HINT}" if pickles else ""
        raise FileNotFoundError(f"textual-inversion file {file} does not exist; {folder} holds {present or 'none'} "
                                f"(pass weight_name=... for another file){hint}")
    return file


def _pickle_refused(path: str) -> ValueError:
    return ValueError(f"textual-inversion file {path} is a pickle (torch.save); minidiff never unpickles: "
                      f"{CONVERT_HINT}")


def _one_row_per_token(state: tuple[torch.Tensor, str], count: int) -> list[tuple[torch.Tensor, str]]:
    """An (n, D) tensor given with n tokens: one (D,) vector each (diffusers' special case)."""
    tensor, where = state
    if tensor.dim() != 2 or tensor.shape[0] != count:
        raise ValueError(f"{where} has shape {tuple(tensor.shape)} but {count} tokens were given; "
                         f"pass an ({count}, D) tensor, one row per token")
    return [(row, f"{where} row {i}") for i, row in enumerate(tensor)]


def _token_and_vectors(state, token: str | None, where: str) -> tuple[str, torch.Tensor, str]:
    """(token, its vectors (n, D), where) of one source in diffusers' or A1111's layout."""
    if isinstance(state, torch.Tensor):
        if token is None:
            raise ValueError(f"{where} is a bare tensor, which names no token: pass token='<my-token>'")
        return token, state, where
    if "string_to_param" in state:  # A1111's .pt dict, already unpickled by the caller
        params = state["string_to_param"]
        loaded_token, vectors = state.get("name"), params.get("*") if isinstance(params, dict) else params
    elif len(state) == 1:
        loaded_token, vectors = next(iter(state.items()))
    else:
        keys = sorted(map(str, state))[:8]
        raise ValueError(f"{where} holds keys {keys}: not a textual-inversion embedding, which is one tensor "
                         f"({{token: (D,) or (n, D)}} as diffusers saves it, or {{'emb_params': (n, D)}} from A1111)")
    if token is None and loaded_token in A1111_KEYS:
        raise ValueError(f"{where} is an A1111 embedding (key {loaded_token!r}), which names no token; pass "
                         "token='<name>' (A1111 uses the file name)")
    return token if token is not None else loaded_token, vectors, where


def _check_new_tokens(embeddings: list[tuple[str, Any, str]], tokenizer, text_encoder) -> dict[str, torch.Tensor]:
    """token -> (D,) vector for every token to add (``tok``, ``tok_1`` ... for n vectors), all checked first."""
    width = text_encoder.get_input_embeddings().weight.shape[1]
    vocab = tokenizer.get_vocab()
    rows: dict[str, torch.Tensor] = {}
    for token, vectors, where in embeddings:
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"token {token!r} for {where}: a token is a non-blank string")
        vectors = _check_vectors(vectors, width, where)
        names = [token, *(f"{token}_{i}" for i in range(1, vectors.shape[0]))]
        for name in (*names, f"{token}_1"):
            if name in vocab:
                raise ValueError(f"token {name!r} ({where}) is already in the tokenizer's vocabulary; choose another "
                                 "token=... or unload_textual_inversion() the loaded one first")
        for name, vector in zip(names, vectors):
            if name in rows:
                raise ValueError(f"token {name!r} is given twice in this call ({where}); each token loads once")
            rows[name] = vector
    return rows


def _check_vectors(vectors: Any, width: int, where: str) -> torch.Tensor:
    """An embedding as (n, D) floats: (D,) or (n, D) with n >= 1, D the text encoder's width, all finite."""
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        got = f"a {vectors.dtype} tensor" if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"{where}: an embedding is a float tensor, got {got}")
    vectors = vectors[None] if vectors.dim() == 1 else vectors  # (n, D)
    if vectors.dim() != 2 or vectors.shape[0] == 0 or vectors.shape[1] != width:
        raise ValueError(f"{where}: embedding of shape {tuple(vectors.shape)}; expected (n, {width}) or ({width},), "
                         f"{width} being the text encoder's hidden_size (an embedding trained for another model?)")
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{where}: the embedding holds NaN or infinite values")
    return vectors.detach()
