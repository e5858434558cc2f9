"""The kernel seam: swappable implementations of the hot ops (see registry.py)."""

from minidiff.ops.attention import attention, chunked_attention, math_attention, sdpa_attention
from minidiff.ops.geglu import geglu, torch_geglu
from minidiff.ops.registry import (
    available_backends,
    current_backend,
    register_backend,
    set_backend,
    unregister_backend,
    use_backend,
)

__all__ = [
    "attention", "math_attention", "sdpa_attention", "chunked_attention", "geglu", "torch_geglu",
    "available_backends", "current_backend", "register_backend", "set_backend", "unregister_backend", "use_backend",
]
