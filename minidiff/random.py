"""Noise drawn exactly as diffusers draws it, so one seed gives the same numbers in both libraries."""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def check_generator(generator) -> None:
    """None, a torch.Generator, or a list of them (one per sample)."""
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        bad = next(g for g in generators if not isinstance(g, torch.Generator))
        raise TypeError(f"generator must be a torch.Generator or a list of them (one per image), "
                        f"got {type(bad).__name__} {bad!r}"[:200])
    if isinstance(generator, list) and not generator:
        raise ValueError("generator is an empty list; pass a torch.Generator or one per image")


def randn_tensor(shape, generator: Generator = None, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape``.

    A CPU generator draws on the CPU and the result moves to ``device`` (so CPU and GPU runs share seeds);
    a list of generators draws one ``(1, ...)`` slice per batch element and concatenates them.
    The draw is made in ``dtype`` (fp16 and fp32 draws differ, as in diffusers).
    """
    check_generator(generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        draw_device = generator[0].device
        slices = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(slices, dim=0).to(device)
    draw_device = generator.device if generator is not None else device
    if draw_device.type != device.type and draw_device.type != "cpu":
        raise ValueError(f"cannot make a {device} tensor from a generator on {draw_device}; use a CPU generator")
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
