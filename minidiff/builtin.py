"""The built-in text-to-image model shipped inside the package (used when no --model is given)."""

from __future__ import annotations

import os

BUILTIN_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny-shapes")


def builtin_model_folder() -> str:
    """The diffusers-layout folder of the built-in model, or a FileNotFoundError saying what to pass instead."""
    if not os.path.isfile(os.path.join(BUILTIN_FOLDER, "model_index.json")):
        raise FileNotFoundError(
            f"no built-in model is installed at {BUILTIN_FOLDER}; pass --model with a diffusers folder "
            "or a single-file .safetensors checkpoint"
        )
    return BUILTIN_FOLDER
