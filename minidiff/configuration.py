"""Configs: dataclasses whose field names are diffusers' config.json keys.

Every scheduler and model keeps its settings in ``self.config``, an instance of a dataclass derived from
:class:`Config`. A config reads like an object (``config.beta_schedule``) and like a read-only mapping
(``config["beta_schedule"]``, ``dict(config)``), so configs move freely between minidiff and diffusers:
``LMSDiscreteScheduler.from_config(pipe.scheduler.config)`` works whichever library built ``pipe``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Iterable

import minidiff


class Config(Mapping):
    """Base of every config dataclass: mapping access plus JSON round trips."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.field_names())

    def __len__(self) -> int:
        return len(self.field_names())

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def explicit_fields(self) -> frozenset[str]:
        """The fields the caller set; the others hold defaults (diffusers' ``_use_default_values``)."""
        return getattr(self, "_explicit", frozenset(self.field_names()))

    def to_dict(self) -> dict[str, Any]:
        return {name: _jsonable(getattr(self, name)) for name in self.field_names()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch arrays (e.g. trained_betas)
        return value.tolist()
    return value


def check_choice(option: str, value: Any, accepted: Iterable[Any]) -> None:
    """Raise a ValueError naming ``option`` and the accepted values when ``value`` is not one of them."""
    accepted = list(accepted)
    if value not in accepted:
        raise ValueError(f"{option}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")


def build_config(config_class: type[Config], owner: str, kwargs: dict[str, Any]) -> Config:
    """Construct ``config_class(**kwargs)``, rejecting unknown keys with the list of accepted ones."""
    known = set(config_class.field_names())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"{owner} got unknown config option(s) {unknown}; accepted options: {sorted(known)}"
        )
    config = config_class(**kwargs)
    object.__setattr__(config, "_explicit", frozenset(kwargs))
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Accept a minidiff Config, a diffusers FrozenDict/dict, or any mapping; return a plain dict of the values that
    were set explicitly. As in diffusers, values that only held their class's default (listed in
    ``_use_default_values``) are left out, so the receiving class applies its own defaults."""
    if config is None:
        raise ValueError("from_config needs a config (a dict, a minidiff config or a diffusers config)")
    if not isinstance(config, Mapping):
        raise TypeError(
            f"from_config expects a mapping such as scheduler.config, got {type(config).__name__}; "
            "to load from a folder use from_pretrained(folder)"
        )
    if isinstance(config, Config):
        return {key: value for key, value in config.items() if key in config.explicit_fields()}
    defaults = set(config.get("_use_default_values", ()))
    return {key: value for key, value in config.items() if key not in defaults and key != "_use_default_values"}


class ConfigMixin:
    """Gives a class ``config``, ``from_config``, ``load_config`` and ``save_config``.

    Subclasses set ``config_class`` (a :class:`Config` dataclass) and ``config_name`` (the JSON file name).
    """

    config_class: type[Config]
    config_name: str = "config.json"

    def register_config(self, kwargs: dict[str, Any]) -> Config:
        self.config = build_config(self.config_class, type(self).__name__, kwargs)
        return self.config

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any):
        """Build from a config mapping; keys this class does not know (other schedulers' options,
        ``_class_name``, ``_diffusers_version``) are ignored, as diffusers does."""
        values = config_to_dict(config)
        values.update(overrides)
        known = set(cls.config_class.field_names())
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def load_config(cls, folder: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any]:
        """Read ``config_name`` from ``folder[/subfolder]`` and return it as a dict."""
        directory = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        path = os.path.join(directory, cls.config_name)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} is not a folder; {cls.__name__} expects a folder with {cls.config_name}")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: {cls.__name__}.from_pretrained needs a folder with {cls.config_name} "
                "(pass subfolder= if the folder is a whole pipeline)"
            )
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(values).__name__}")
        return values

    def save_config(self, folder: str | os.PathLike) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(os.fspath(folder), self.config_name)
        payload = {"_class_name": type(self).__name__, "_diffusers_version": "0.42.1",
                   "_minidiff_version": minidiff.__version__, **self.config.to_dict()}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False)
            handle.write("\n")
        return path
