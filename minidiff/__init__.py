"""minidiff: a small, readable, plain-PyTorch Stable Diffusion stack, checked numerically against diffusers."""

__version__ = "0.1.0"
