"""LoRA runtime (placeholder being written for issue 12)."""

from contextlib import contextmanager


@contextmanager
def scaled_lora(module, scale):
    yield
