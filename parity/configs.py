"""Comparing a minidiff config with a diffusers one: the same options, and the same fields left at their default."""

from __future__ import annotations

from typing import Any, Mapping


def public(config: Mapping[str, Any]) -> dict:
    """A config's options without bookkeeping keys (``_class_name``, ``_use_default_values``, ...)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def assert_same_config(mine: Mapping[str, Any], ref: Mapping[str, Any]) -> None:
    """Equal options, and equal ``_use_default_values`` as sets (diffusers lists them in set order)."""
    assert public(mine) == public(ref)
    assert set(mine.get("_use_default_values", ())) == set(ref.get("_use_default_values", ()))
