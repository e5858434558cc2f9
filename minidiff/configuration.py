"""Configs: dataclasses whose field names are diffusers' config.json keys.

Every scheduler and model keeps its settings in ``self.config``, an instance of a dataclass derived from
:class:`Config`. A config reads like an object (``config.beta_schedule``) and like a read-only mapping
(``config["beta_schedule"]``, ``dict(config)``), so configs move freely between minidiff and diffusers:
``LMSDiscreteScheduler.from_config(pipe.scheduler.config)`` works whichever library built ``pipe``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Iterable

import numpy as np
import torch

import minidiff
from minidiff.loading.safetensors_io import read_json_object

USE_DEFAULT_VALUES = "_use_default_values"


class Config(Mapping):
    """Base of every config dataclass: mapping access plus JSON round trips.

    Besides its fields, a scheduler config may carry options of other scheduler classes that it was built from
    (``EulerDiscreteScheduler.from_config(ddim.config)`` keeps ``clip_sample``), as diffusers does: they are
    readable as ``config["clip_sample"]``, appear in ``dict(config)``, ``to_dict()`` and saved files, and are handed
    on by ``from_config``, but they are not attributes (code reads ``getattr(config, option, default)`` for options
    a class may lack) and change nothing in the class that carries them.

    As in diffusers, the mapping also holds ``_use_default_values``, the fields that were not given and hold their
    class's default (absent when every field was given, as in a config read from a file); it is bookkeeping for
    ``from_config`` and is not saved.
    """

    # transformers' configs (CLIPTextConfig) have no ``_use_default_values`` key; diffusers' do
    lists_default_values: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a config equals any mapping with the same items (a dict, diffusers' FrozenDict), as diffusers' configs do;
        # set before @dataclass runs, which then keeps it instead of writing its field-tuple __eq__
        super().__init_subclass__(**kwargs)
        cls.__eq__ = Mapping.__eq__

    def __getitem__(self, key: str) -> Any:
        if key in self.field_names():
            return getattr(self, key)
        if key == USE_DEFAULT_VALUES and self.default_fields():
            return self.default_fields()
        return self.carried_options()[key]

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> list[str]:
        return [*self.field_names(), *self.carried_options(), *([USE_DEFAULT_VALUES] if self.default_fields() else [])]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def explicit_fields(self) -> frozenset[str]:
        """The fields the caller set; the others hold defaults (diffusers' ``_use_default_values``)."""
        return getattr(self, "_explicit", frozenset(self.field_names()))

    def default_fields(self) -> list[str]:
        """The fields left at their default, in field order (empty for configs that do not list them)."""
        if not self.lists_default_values:
            return []
        explicit = self.explicit_fields()
        return [name for name in self.field_names() if name not in explicit]

    def carried_options(self) -> dict[str, Any]:
        """Options of other classes kept for ``from_config`` to hand on (diffusers' "hidden" config keys)."""
        return getattr(self, "_carried", {})

    def to_dict(self) -> dict[str, Any]:
        """The options as a saved file holds them: fields and carried options, JSON-ready (``_use_default_values``
        left out, as diffusers' ``save_config`` leaves it out)."""
        return {name: _jsonable(self[name]) for name in self if name != USE_DEFAULT_VALUES}


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return inspect.Parameter.empty


def config_attribute(owner: Any, name: str) -> Any:
    """``owner.<config key>`` for a ``__getattr__``: the config value with diffusers' FutureWarning (direct config
    access is deprecated there in favour of ``owner.config.<key>``), or the standard AttributeError."""
    config = owner.__dict__.get("config")
    if isinstance(config, Config) and name in config and name != USE_DEFAULT_VALUES:
        cls = type(owner).__name__
        warnings.warn(f"Accessing config attribute `{name}` directly via '{cls}' object attribute is deprecated. "
                      f"Please access '{name}' over '{cls}'s config object instead, e.g. 'x.config.{name}'.",
                      FutureWarning, stacklevel=3)
        return config[name]
    raise AttributeError(f"'{type(owner).__name__}' object has no attribute '{name}'")


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


@functools.cache
def field_types(config_class: type[Config]) -> dict[str, Any]:
    """The evaluated annotation of each field (they are strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(config_class)


def describe_type(annotation: Any) -> str:
    """An annotation in words for error messages: ``tuple[int, ...] | None`` -> "a list of int or None"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in args)
    if annotation in (tuple, list):
        return "a list"
    if origin in (tuple, list):
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {describe_type(args[0])}"
        return f"a list of {len(args)} ({', '.join(map(describe_type, args))})"
    return getattr(annotation, "__name__", str(annotation))


class _WrongType(Exception):
    """Raised inside :func:`checked_value` when a value does not fit its annotation."""


def checked_value(value: Any, annotation: Any) -> Any:
    """``value`` checked against a field annotation (int, float, bool, str, Any, X | None, tuple[...], list[...]);
    returns it with JSON lists turned into tuples for tuple fields. Raises _WrongType if it does not fit.
    bool is not an int here, an int is a float, and an integral float such as 4.0 is not an int: real configs
    written by diffusers or transformers hold JSON integers for integer options."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return value
    elif origin in (typing.Union, types.UnionType):
        for member in args:
            try:
                return checked_value(value, member)
            except _WrongType:
                pass
    elif annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif annotation is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation in (tuple, list) or origin in (tuple, list):
        return _checked_sequence(value, annotation, origin, args)
    raise _WrongType


def _checked_sequence(value: Any, annotation: Any, origin: Any, args: tuple) -> Any:
    """A list/tuple field: items checked; tuple fields get tuples. Arrays are accepted for list fields of numbers
    (``trained_betas`` may be a numpy array or tensor, as in diffusers) and kept as they are."""
    is_tuple = tuple in (annotation, origin)
    if isinstance(value, (np.ndarray, torch.Tensor)) and not is_tuple:
        if value.ndim == 1 and (value.dtype.is_floating_point if isinstance(value, torch.Tensor)
                                else np.issubdtype(value.dtype, np.number)):
            return value
        raise _WrongType
    if not isinstance(value, (list, tuple)):
        raise _WrongType
    if not args:
        return tuple(value) if is_tuple else value
    item_types = [args[0]] * len(value) if origin is list or args[-1] is Ellipsis else list(args)
    if len(item_types) != len(value):
        raise _WrongType
    items = [checked_value(item, item_type) for item, item_type in zip(value, item_types)]
    return tuple(items) if is_tuple else items


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def build_config(config_class: type[Config], owner: str, kwargs: dict[str, Any]) -> Config:
    """Construct ``config_class(**kwargs)``, rejecting unknown keys with the list of accepted ones and values whose
    type does not fit the field's annotation (naming the option, the value and the expected type). Private keys
    (``_use_default_values``, ``_class_name``: bookkeeping, not options) are dropped, as diffusers' constructors
    drop them, so ``Model(**dict(other.config))`` builds the same model."""
    kwargs = {key: value for key, value in kwargs.items() if not key.startswith("_")}
    known = set(config_class.field_names())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"{owner} got unknown config option(s) {unknown}; accepted options: {sorted(known)}"
        )
    annotations = field_types(config_class)
    checked = {}
    for key, value in kwargs.items():
        try:
            checked[key] = checked_value(value, annotations[key])
        except _WrongType:
            raise TypeError(
                f"{owner} config option {key}={_short_repr(value)} has the wrong type {type(value).__name__}; "
                f"expected {describe_type(annotations[key])}"
            ) from None
    config = config_class(**checked)
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
        explicit = config.explicit_fields() | set(config.carried_options())
        return {key: value for key, value in config.items() if key in explicit}
    defaults = set(config.get(USE_DEFAULT_VALUES, ()))
    return {key: value for key, value in config.items() if key not in defaults and key != USE_DEFAULT_VALUES}


class ConfigMixin:
    """Gives a class ``config``, ``from_config``, ``load_config`` and ``save_config``.

    Subclasses set ``config_class`` (a :class:`Config` dataclass) and ``config_name`` (the JSON file name).
    """

    config_class: type[Config]
    config_name: str = "config.json"
    # from_config keeps options this class does not use (other classes' keys) and hands them on (schedulers)
    carries_other_options: bool = False
    # diffusers' list of constructor keywords kept only for old configs; minidiff's constructors take none
    _deprecated_kwargs: list[str] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give ``cls.__init__(self, **kwargs)`` the signature of its config (keyword-only options with their
        defaults), so ``help()``, editors and ``inspect.signature`` list the options, as for diffusers' classes."""
        super().__init_subclass__(**kwargs)
        if not dataclasses.is_dataclass(cls.__dict__.get("config_class")):
            return
        init = cls.__dict__.get("__init__")
        if init is None:  # inherited: a forwarding __init__ of this class's own, to carry this class's signature
            parent_init = cls.__init__

            def init(self, **options: Any) -> None:
                parent_init(self, **options)

            cls.__init__ = init
        parameters = list(inspect.signature(init).parameters.values())
        if [p.kind for p in parameters] != [inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_KEYWORD]:
            return  # a constructor with its own arguments (CLIPTextModel(config)) keeps its signature
        options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_field_default(f))
                   for f in dataclasses.fields(cls.config_class)]
        init.__signature__ = inspect.Signature([parameters[0], *options], return_annotation=None)

    def register_config(self, kwargs: dict[str, Any]) -> Config:
        self.config = build_config(self.config_class, type(self).__name__, kwargs)
        return self.config

    def register_to_config(self, **kwargs: Any) -> None:
        """Set config entries after construction, as diffusers' ``register_to_config``: options of this class are
        type-checked and replace their values in ``config``; other keys are kept as carried options (readable as
        ``config[key]`` and saved). What the constructor derived from the old values (a scheduler's betas, a
        model's layers) stays as it was, as in diffusers."""
        config = self.config
        fields = set(config.field_names())
        values = {name: config[name] for name in config.explicit_fields()}
        values.update({key: value for key, value in kwargs.items() if key in fields})
        updated = build_config(self.config_class, type(self).__name__, values)
        carried = {**config.carried_options(),
                   **{key: value for key, value in kwargs.items() if key not in fields and not key.startswith("_")}}
        object.__setattr__(updated, "_carried", carried)
        self.config = updated

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any):
        """Build from a config mapping plus ``overrides`` (which must be options of this class). Keys of the mapping
        that this class does not know are not passed to the constructor: private keys (``_class_name``, ...) are
        dropped, other classes' options are carried in ``config`` when ``carries_other_options`` (schedulers, as in
        diffusers) and ignored otherwise. Values that only held their class's default are left out, so this class
        applies its own defaults."""
        known = set(cls.config_class.field_names())
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_config got unknown option(s) {unknown}; accepted: {sorted(known)}")
        values = {**config_to_dict(config), **overrides}
        instance = cls(**{key: value for key, value in values.items() if key in known})
        if cls.carries_other_options:
            carried = {key: value for key, value in values.items() if key not in known and not key.startswith("_")}
            object.__setattr__(instance.config, "_carried", carried)
        return instance

    @classmethod
    def load_config(cls, folder: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any]:
        """Read ``config_name`` from ``folder[/subfolder]`` and return it as a dict."""
        directory = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        path = os.path.join(directory, cls.config_name)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} is not a folder; {cls.__name__} expects a folder with {cls.config_name}")
        if not os.path.lexists(path):
            raise FileNotFoundError(
                f"{path} does not exist: {cls.__name__}.from_pretrained needs a folder with {cls.config_name} "
                "(pass subfolder= if the folder is a whole pipeline)"
            )
        return read_json_object(path, "config")  # a directory, FIFO (never opened) or device is named as such

    def save_config(self, folder: str | os.PathLike) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(os.fspath(folder), self.config_name)
        payload = {"_class_name": type(self).__name__, "_diffusers_version": "0.42.1",
                   "_minidiff_version": minidiff.__version__, **self.config.to_dict()}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False)
            handle.write("\n")
        return path
