"""diffusers' attention-processor API on minidiff's kernel seam.

diffusers swaps an attention's implementation by setting a *processor* object (``unet.set_attn_processor(...)``);
minidiff swaps it by naming a backend of ``minidiff.ops`` (``set_attention_backend``). The processors that only
choose a kernel map onto backends, both ways, so code written for diffusers runs:

| diffusers processor          | minidiff                                            |
|------------------------------|-----------------------------------------------------|
| ``AttnProcessor``            | the ``math`` backend (scores, softmax, matmul)      |
| ``AttnProcessor2_0``         | the ``sdpa`` backend (``F.scaled_dot_product_attention``), the default |
| ``SlicedAttnProcessor(n)``   | head slicing, ``n`` batch x heads matrices at a time (``set_attention_slice``) |
| ``BackendProcessor(name)``   | any other registered backend (``chunked``, your own kernel) |

Processors with code of their own (IP-Adapter, Custom Diffusion, xFormers, a user's class) cannot run here: the
error says so and points to ``minidiff.ops.register_backend``, where a custom kernel plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minidiff import ops


@dataclass(frozen=True)
class AttnProcessor:
    """diffusers' plain attention: minidiff's ``math`` backend."""

    backend = "math"


@dataclass(frozen=True)
class AttnProcessor2_0:
    """diffusers' PyTorch-2 attention: minidiff's ``sdpa`` backend."""

    backend = "sdpa"


@dataclass(frozen=True)
class SlicedAttnProcessor:
    """diffusers' sliced attention: ``slice_size`` batch x heads score matrices at a time (on the default kernel)."""

    slice_size: int
    backend = None


@dataclass(frozen=True)
class BackendProcessor:
    """A registered ``minidiff.ops`` attention backend by name (``chunked``, or a kernel of your own)."""

    name: str

    @property
    def backend(self) -> str:
        return self.name


def processor_of(module: Any) -> Any:
    """The processor object that describes an ``Attention`` module's current kernel: the one last set with
    ``apply_processor`` while the module still runs what it chose (so diffusers' own objects come back), else one
    of minidiff's classes above."""
    stored = getattr(module, "processor", None)
    if stored is not None and kernel_of(stored, "processor") == (module.backend, module.slice_size):
        return stored
    if module.slice_size is not None:
        return SlicedAttnProcessor(module.slice_size)
    backend = ops.current_backend("attention", module.backend)
    return {"math": AttnProcessor(), "sdpa": AttnProcessor2_0()}.get(backend, BackendProcessor(backend))


def kernel_of(processor: Any, key: str) -> tuple[str | None, int | None]:
    """The (backend, slice_size) a processor chooses: minidiff's classes above, or diffusers' classes of the same
    names (matched by class name, so diffusers' own processor objects work too)."""
    name = type(processor).__name__
    if name == "SlicedAttnProcessor":
        return None, processor.slice_size
    if name in ("AttnProcessor", "AttnProcessor2_0", "BackendProcessor"):
        backend = AttnProcessor2_0.backend if name == "AttnProcessor2_0" else getattr(processor, "backend", "math")
        if backend not in ops.available_backends("attention"):
            raise ValueError(f"{key}: attention backend {backend!r} is not registered; registered: "
                             f"{ops.available_backends('attention')}")
        return backend, None
    raise ValueError(f"{key}: the attention processor {name} runs code of its own, which minidiff's attention does "
                     "not call; only processors that choose a kernel map (AttnProcessor, AttnProcessor2_0, "
                     "SlicedAttnProcessor). Plug a custom kernel in with minidiff.ops.register_backend('attention', "
                     "name, fn) and select it with set_attention_backend(name) or BackendProcessor(name)")


def apply_processor(module: Any, processor: Any, key: str) -> None:
    """Set ``module``'s kernel from a processor (see ``kernel_of``) and remember the processor object."""
    backend, slice_size = kernel_of(processor, key)
    module.set_attention_slice(slice_size)
    module.backend, module.processor = backend, processor
