"""Output containers that read like diffusers' ones: ``out.sample``, ``out[0]``, ``out["sample"]`` and unpacking."""

from __future__ import annotations

import dataclasses


class BaseOutput:
    """Mixin for output dataclasses. Fields that are None are left out of the tuple view, as in diffusers."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())

    def __getitem__(self, index):
        if isinstance(index, str):
            if index not in {f.name for f in dataclasses.fields(self)} or getattr(self, index) is None:
                raise KeyError(index)
            return getattr(self, index)
        return self.to_tuple()[index]

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
