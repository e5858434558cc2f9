"""minidiff's BaseOutput behaves as diffusers' (an ordered mapping that is also a dataclass): the same operations on
the same dataclass built on either base give the same answers."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import diffusers.utils
import pytest
import torch

from minidiff.outputs import BaseOutput


@dataclass
class Ours(BaseOutput):
    sample: torch.Tensor
    extra: torch.Tensor | None = None


@dataclass
class Theirs(diffusers.utils.BaseOutput):
    sample: torch.Tensor
    extra: torch.Tensor | None = None


def views(out) -> dict:
    """Everything a caller may read off an output."""
    return {"keys": list(out.keys()), "iter": list(out), "len": len(out), "dict": isinstance(out, dict),
            "values": [id(v) for v in out.values()], "items": [(k, id(v)) for k, v in out.items()],
            "first": id(out[0]), "by_key": id(out["sample"]), "tuple": [id(v) for v in out.to_tuple()],
            "contains_extra": "extra" in out, "slice": [id(v) for v in out[0:]]}


SAMPLE, EXTRA = torch.zeros(2), torch.ones(3)


@pytest.mark.parametrize("fields", [dict(sample=SAMPLE), dict(sample=SAMPLE, extra=EXTRA)],
                         ids=["None left out", "all set"])
def test_same_views_as_diffusers(fields):
    assert views(Ours(**fields)) == views(Theirs(**fields))


def test_setting_a_key_updates_the_field_as_diffusers():
    for cls in (Ours, Theirs):
        out = cls(sample=SAMPLE, extra=EXTRA)
        out["sample"] = EXTRA
        assert out.sample is EXTRA and out[0] is EXTRA
        out.extra = SAMPLE
        assert out["extra"] is SAMPLE and out.to_tuple()[1] is SAMPLE


def test_a_field_set_later_becomes_a_key():
    """The one difference: diffusers keeps a field that was None at construction out of the mapping when it is set
    later, so its ``to_tuple()`` and ``out[1]`` miss it; here it becomes a key."""
    out = Ours(sample=SAMPLE)
    out.extra = EXTRA
    assert list(out.keys()) == ["sample", "extra"] and out[1] is EXTRA
    theirs = Theirs(sample=SAMPLE)
    theirs.extra = EXTRA
    assert list(theirs.keys()) == ["sample"]


def test_keys_cannot_be_removed_and_copies_keep_the_fields():
    out = Ours(sample=SAMPLE, extra=EXTRA)
    for remove in (lambda: out.pop("sample"), lambda: out.__delitem__("sample"), lambda: out.setdefault("x", 1),
                   lambda: out.update(sample=EXTRA)):
        with pytest.raises(TypeError, match="keeps one key per field that is set"):
            remove()
    with pytest.raises(Exception):
        Theirs(sample=SAMPLE).pop("sample")  # diffusers refuses too
    for clone in (copy.copy(out), copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert type(clone) is Ours and list(clone.keys()) == ["sample", "extra"]
        assert torch.equal(clone.sample, SAMPLE) and torch.equal(clone["extra"], EXTRA)
