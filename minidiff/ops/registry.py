"""The kernel seam: named implementations ("backends") of swappable ops, chosen globally or in a ``with`` block.

Models call ``minidiff.ops.attention(q, k, v)`` (or another op of this registry); which function runs is decided
here. Users register their own kernels by name and switch to them without touching model code::

    ops.register_backend("attention", "mine", my_attention)
    with ops.use_backend("attention", "mine"):
        image = pipe(prompt).images[0]

A user kernel's output is checked against the op's contract (shape and dtype) on every call, so a wrong kernel
fails loudly with the op and shapes instead of producing a silently wrong image.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class Op:
    """One swappable op: its backends, the default, and a check of what a backend returns."""

    name: str
    default: str
    expected_output: Callable[..., tuple[tuple[int, ...], torch.dtype]]
    backends: dict[str, Callable] = field(default_factory=dict)
    builtin: set[str] = field(default_factory=set)


_OPS: dict[str, Op] = {}
_state = threading.local()


def define_op(name: str, default: str, expected_output: Callable) -> Op:
    _OPS[name] = Op(name, default, expected_output)
    return _OPS[name]


def _op(name: str) -> Op:
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; ops with backends: {sorted(_OPS)}")
    return _OPS[name]


def register_backend(op: str, name: str, fn: Callable, *, builtin: bool = False, overwrite: bool = False) -> None:
    """Register ``fn`` as backend ``name`` of ``op``. It receives the op's arguments and must return a tensor of
    the shape and dtype the built-in backends return."""
    entry = _op(op)
    if not callable(fn):
        raise TypeError(f"backend {name!r} for op {op!r} must be callable, got {type(fn).__name__}")
    if name in entry.backends and not overwrite:
        raise ValueError(f"op {op!r} already has a backend {name!r}; pass overwrite=True to replace it")
    entry.backends[name] = fn
    if builtin:
        entry.builtin.add(name)


def unregister_backend(op: str, name: str) -> None:
    entry = _op(op)
    if name in entry.builtin:
        raise ValueError(f"{name!r} is a built-in backend of {op!r} and cannot be removed")
    _check_backend(entry, name)
    del entry.backends[name]


def available_backends(op: str) -> list[str]:
    return sorted(_op(op).backends)


def _check_backend(entry: Op, name: str) -> None:
    if name not in entry.backends:
        raise ValueError(f"unknown {entry.name} backend {name!r}; registered backends: {sorted(entry.backends)}")


def _overrides() -> list[dict[str, str]]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def set_backend(op: str, name: str) -> None:
    """Make ``name`` the global default backend of ``op``."""
    entry = _op(op)
    _check_backend(entry, name)
    entry.default = name


def current_backend(op: str, module_choice: str | None = None) -> str:
    """The backend that serves ``op`` now: a ``use_backend`` block wins, then a per-model choice, then the default."""
    for frame in reversed(_overrides()):
        if op in frame:
            return frame[op]
    return module_choice or _op(op).default


@contextlib.contextmanager
def use_backend(op: str, name: str) -> Iterator[None]:
    """Run the ``with`` block with ``op`` served by backend ``name`` (nests; thread-local)."""
    _check_backend(_op(op), name)
    stack = _overrides()
    stack.append({op: name})
    try:
        yield
    finally:
        stack.pop()


def dispatch(op: str, module_choice: str | None, *args, **kwargs) -> torch.Tensor:
    """Call ``op`` with the current backend (see ``current_backend``); outputs of user backends are checked."""
    entry = _op(op)
    name = current_backend(op, module_choice)
    _check_backend(entry, name)
    out = entry.backends[name](*args, **kwargs)
    if name not in entry.builtin:
        shape, dtype = entry.expected_output(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{op} backend {name!r} returned {got}; expected shape {tuple(shape)} dtype {dtype} "
                f"(input shapes {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]})"
            )
    return out
