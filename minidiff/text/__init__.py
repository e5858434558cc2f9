"""Text side of Stable Diffusion: minidiff's own CLIP tokenizer (the text encoder lives in minidiff.models.clip)."""

from minidiff.text.tokenizer import BatchEncoding, CLIPTokenizer

__all__ = ["BatchEncoding", "CLIPTokenizer"]
