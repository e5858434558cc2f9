"""Output containers that behave as diffusers' ones: a dataclass that is also an ordered mapping of its fields.

``out.sample``, ``out["sample"]``, ``out[0]``, ``out.to_tuple()``, ``dict(out)``, ``out.values()`` and
``isinstance(out, dict)`` all work. Fields that are None are not keys and are left out of the tuple view, as in
diffusers; iterating yields the keys (a mapping's iteration), so take values with ``out.to_tuple()`` or
``return_dict=False``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any


class BaseOutput(collections.OrderedDict):
    """Base of the output dataclasses: setting a field sets its key (None leaves it out), and setting a key sets
    its attribute. Keys cannot be removed (``del``, ``pop``, ``setdefault``, ``update`` are refused). Unlike
    diffusers', a field that was None at construction becomes a key when it is set later (diffusers leaves it out
    of the mapping and the tuple)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() or (value is not None and name in self.__dataclass_fields__):
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        return tuple(self[key] for key in self.keys())

    def __reduce__(self):
        """Pickle and copy as the dataclass it is (its fields), not as a bare mapping."""
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} keeps one key per field that is set; set fields (out.sample = ...) "
                        "instead of removing or adding keys")

    __delitem__ = pop = popitem = setdefault = update = _refuse
