"""Which classes a pipeline folder may name for each component: an explicit allow-list, so no name in a
``model_index.json`` or ``scheduler_config.json`` can reach any other attribute of minidiff (or of Python)."""

from __future__ import annotations

import importlib

from minidiff.schedulers.base import SCHEDULER_NAMES

# The only names a folder's files can resolve to, per component: (module, class names); nothing else is reachable.
COMPONENT_CLASSES = {
    "unet": ("minidiff.models", ("UNet2DConditionModel", "UNet2DModel")),
    "vae": ("minidiff.models", ("AutoencoderKL",)),
    "text_encoder": ("minidiff.models", ("CLIPTextModel", "CLIPTextModelWithProjection")),
    "text_encoder_2": ("minidiff.models", ("CLIPTextModelWithProjection", "CLIPTextModel")),
    "tokenizer": ("minidiff.text", ("CLIPTokenizer",)),
    "tokenizer_2": ("minidiff.text", ("CLIPTokenizer",)),
    "scheduler": ("minidiff.schedulers", SCHEDULER_NAMES),  # every scheduler minidiff has
}


def component_class(kind: str, class_name: str, source: str = "model_index.json") -> type:
    """The minidiff class for a diffusers/transformers class name found in ``source`` (a model_index.json or a
    scheduler_config.json), looked up only in the allow-list of ``kind``'s classes (any of them for a component
    name not in COMPONENT_CLASSES)."""
    allowed = [COMPONENT_CLASSES[kind]] if kind in COMPONENT_CLASSES else list(COMPONENT_CLASSES.values())
    for module_name, names in allowed:
        if class_name in names:
            cls = getattr(importlib.import_module(module_name), class_name)
            if isinstance(cls, type):
                return cls
    supported = sorted({name for _, names in allowed for name in names})
    raise ValueError(
        f"{source} names {class_name} for {kind!r}, which is not a minidiff {kind} class; supported: "
        f"{supported}. Fix the entry or pass the component yourself: from_pretrained(folder, {kind}=...)"
    )
