"""Pipeline LoRA API (placeholder being written for issue 12)."""


class StableDiffusionLoraLoaderMixin:
    pass
